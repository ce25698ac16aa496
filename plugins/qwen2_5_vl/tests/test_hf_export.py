"""mmzoo -> Hugging Face export: transformers loads what ``save_hf`` writes, with the same logits."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from tiny_hf import IMAGE, V_END, V_START, VIDEO, make_sample, token_types

import mmzoo
from mmzoo.checkpoint.hf_export import save_hf
from mmzoo_qwen2_5_vl.compat import hf_forward
from mmzoo_qwen2_5_vl.config import VARIANTS, config_from_hf, config_to_hf

SAMPLE = dict(images=[(1, 12, 10)], videos=[(2, 8, 4)], seconds=[0.5])


def hf_from(path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()


def hf_logits(model, batch):
    with torch.no_grad():
        return model(**batch, mm_token_type_ids=token_types(batch["input_ids"])).logits


def file_keys(path):
    keys = set()
    for file in path.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            keys.update(f.keys())
    return keys


def siblings(path):
    """Entries beside ``path`` other than itself (temporary directories would show here)."""
    return sorted(p.name for p in path.parent.iterdir() if p != path)


@pytest.fixture(scope="module")
def mm_model(hf_dir):
    return mmzoo.load_model(hf_dir).eval()


@pytest.fixture(scope="module")
def exported(mm_model, tmp_path_factory):
    return save_hf(mm_model, tmp_path_factory.mktemp("export") / "out")


def test_export_reloads_bitwise_in_transformers(hf_model, hf_dir, exported):
    assert file_keys(exported) == file_keys(hf_dir)  # the on-disk layout transformers writes
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = hf_from(exported)
    expected = hf_model.state_dict()
    got = reloaded.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_export_logits_match(hf_model, mm_model, exported):
    batch = make_sample(**SAMPLE)
    logits = hf_logits(hf_from(exported), batch)
    assert torch.equal(logits, hf_logits(hf_model, batch))
    with torch.no_grad():
        ours = hf_forward(mm_model, **batch).logits
    torch.testing.assert_close(logits, ours, atol=1e-5, rtol=1e-4)


def test_config_json(exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert config["dtype"] == "float32"
    assert config["text_config"]["rope_parameters"] == {
        "rope_type": "default",
        "rope_theta": 1e6,
        "mrope_section": [2, 3, 3],
    }
    assert (config["image_token_id"], config["video_token_id"]) == (IMAGE, VIDEO)


def tied_model():
    torch.manual_seed(1)
    model = mmzoo.build_model(
        "qwen2_5_vl",
        "tiny",
        text={"vocab_size": 1000, "tie_word_embeddings": True},
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=V_START,
        vision_end_token_id=V_END,
    )
    with torch.no_grad():  # unit norms and zero biases would hide mapping mistakes
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_tied_embeddings_export(tmp_path):
    model = tied_model()
    out = save_hf(model, tmp_path / "tied")
    assert "lm_head.weight" not in file_keys(out)
    reloaded = hf_from(out)
    assert reloaded.config.tie_word_embeddings
    assert torch.equal(reloaded.lm_head.weight, model.text_decoder.embedding.word_embeddings.weight)
    batch = make_sample(**SAMPLE)
    with torch.no_grad():
        ours = hf_forward(model, **batch).logits
    torch.testing.assert_close(hf_logits(reloaded, batch), ours, atol=1e-5, rtol=1e-4)


def test_sharded_export_reloads_bitwise(mm_model, tmp_path):
    out = save_hf(mm_model, tmp_path / "sharded", max_shard_bytes=150_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2
    assert sorted(set(index["weight_map"].values())) == shards
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    for shard in shards:  # within the limit, unless one oversized tensor group fills the shard
        with safe_open(out / shard, framework="pt") as f:
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
        assert sum(sizes) <= 150_000 or len(sizes) <= 3, shard
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in mm_model.state_dict().values())
    reloaded = mmzoo.load_model(out)
    expected = mm_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_dtype_and_auto_reload(mm_model, tmp_path):
    out = save_hf(mm_model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = mmzoo.load_model(out, dtype="auto")
    expected = mm_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected[name].to(torch.bfloat16)), name


def test_tokenizer_and_template_files(mm_model, tmp_path):
    from mmzoo.data.tokenizer import default_qwen_tokenizer, load_tokenizer

    template = tmp_path / "template"
    template.mkdir()
    for name in ("preprocessor_config.json", "chat_template.json", "generation_config.json", "config.json"):
        (template / name).write_text(json.dumps({"from": "template", "name": name}))
    (template / "tokenizer_config.json").write_text('{"from": "template"}')
    tokenizer = default_qwen_tokenizer()
    out = save_hf(mm_model, tmp_path / "full", tokenizer=tokenizer, template_dir=template)
    for name in ("preprocessor_config.json", "chat_template.json", "generation_config.json"):
        assert json.loads((out / name).read_text())["from"] == "template"
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    # The tokenizer's own files win over the template's.
    assert json.loads((out / "tokenizer_config.json").read_text()) != {"from": "template"}
    assert load_tokenizer(out).encode("hello world") == tokenizer.encode("hello world")


def test_existing_dir_is_an_error(mm_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(mmzoo.MmzooError, match="already exists"):
        save_hf(mm_model, out)
    assert (out / "keep.txt").read_text() == "mine"
    assert siblings(out) == []
    save_hf(mm_model, out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert siblings(out) == []


def test_failed_write_leaves_nothing(mm_model, tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        save_hf(mm_model, out, tokenizer=BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []


def test_a_killed_exports_temporary_is_removed_by_the_next_export(mm_model, exported, tmp_path):
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    assert killed.wait() == 0
    partial = tmp_path / f".out.tmp-{killed.pid}-0123abcd@{socket.gethostname()}"  # its writer is gone
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"partial")
    out = save_hf(mm_model, tmp_path / "out")
    assert siblings(out) == []
    assert file_keys(out) == file_keys(exported)


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_round_trip(variant):
    from transformers import Qwen2_5_VLConfig

    config = VARIANTS[variant]
    hf = config_to_hf(config)
    assert config_from_hf(hf) == config
    # transformers reads the dict the same way (its defaults fill in what we leave out).
    assert config_from_hf(Qwen2_5_VLConfig(**hf).to_dict()) == config
