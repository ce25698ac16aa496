"""InternVL3 checkpoint conversion: both HF layouts to the same mm shards, split as MindSpeed-MM
splits them (ViT by heads, unevenly; the vocabulary unevenly), and back bit for bit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from internvl3_tiny import VIT_6B_STYLE, hf_model, original_state_dict, tiny_config
from safetensors.torch import load_file, save_file

from mmzoo.checkpoint import conversion as convert
from mmzoo_internvl3.hf_config import config_to_hf

QUIET = dict(report=lambda line: None)
# Five ViT heads of 8 (rank 0 gets 3, rank 1 gets 2) and an odd vocabulary (151 and 150 rows).
CONFIG = tiny_config(VIT_6B_STYLE, text=dataclasses.replace(tiny_config().text, vocab_size=301))
LAYER = "image_encoder.encoder.encoder.layers.{}."


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same tiny model saved by transformers and in OpenGVLab's layout."""
    root = tmp_path_factory.mktemp("internvl3")
    model = hf_model(CONFIG)
    model.save_pretrained(root / "hf")
    original = root / "original"
    original.mkdir()
    save_file(
        {k: v.contiguous() for k, v in original_state_dict(model).items()}, original / "model.safetensors"
    )
    hf = config_to_hf(dataclasses.replace(CONFIG, hf_layout="opengvlab"))
    (original / "config.json").write_text(json.dumps(hf))
    return root / "hf", original


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_hf_to_mm_at_tp2_pp2_and_back_is_bitwise(layout, checkpoints, tmp_path):
    hf = checkpoints[0] if layout == "hf" else checkpoints[1]
    mm = convert.hf_to_mm(hf, tmp_path / "mm", tp=2, vit_pp_layers=[2, 0], llm_pp_layers=[1, 1], **QUIET)
    back = convert.mm_to_hf(mm, tmp_path / "back", **QUIET)
    expected, got = tensors(hf), tensors(back)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    whole = convert.resplit(mm, tmp_path / "tp1", tp=1, **QUIET)
    again = convert.resplit(
        whole, tmp_path / "tp2", tp=2, vit_pp_layers=[2, 0], llm_pp_layers=[1, 1], **QUIET
    )
    for shard in ("mp_rank_00_000", "mp_rank_01_000", "mp_rank_01_001"):
        first, second = load_file(_weights(mm, shard)), load_file(_weights(again, shard))
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _weights(mm: Path, shard: str) -> Path:
    return next((mm / "release" / shard).glob("model*"))


def test_both_layouts_give_the_same_shards(checkpoints, tmp_path):
    out = [
        convert.hf_to_mm(hf, tmp_path / name, tp=2, weights_format="safetensors", **QUIET)
        for hf, name in zip(checkpoints, ("a", "b"), strict=True)
    ]
    for shard in ("mp_rank_00", "mp_rank_01"):
        a, b = (load_file(_weights(mm, shard)) for mm in out)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shards_split_vit_by_heads_and_the_vocabulary_unevenly(checkpoints, tmp_path):
    hf = tensors(checkpoints[0])
    mm = convert.hf_to_mm(checkpoints[0], tmp_path / "mm", tp=2, weights_format="safetensors", **QUIET)
    ranks = [load_file(_weights(mm, f"mp_rank_0{r}")) for r in range(2)]
    q, k, v = (hf[f"vision_tower.encoder.layer.1.attention.{p}_proj.weight"] for p in "qkv")
    for rank, rows in ((0, slice(0, 24)), (1, slice(24, 40))):  # heads 0-2 and 3-4 of 8 rows
        qkv = ranks[rank][LAYER.format(1) + "self_attention.linear_qkv.weight"]
        assert torch.equal(qkv, torch.cat([q[rows], k[rows], v[rows]]))
        proj = ranks[rank][LAYER.format(1) + "self_attention.linear_proj.weight"]
        assert torch.equal(
            proj, hf["vision_tower.encoder.layer.1.attention.projection_layer.weight"][:, rows]
        )
        norm = ranks[rank][LAYER.format(1) + "self_attention.q_layernorm.weight"]
        assert norm.shape == (40,)  # the 6B's qk-norm spans the full width on every rank
    embedding = "text_decoder.embedding.word_embeddings.weight"
    assert [r[embedding].shape[0] for r in ranks] == [151, 150]
    assert torch.equal(
        ranks[1]["text_decoder.output_layer.weight"], hf["language_model.lm_head.weight"][151:]
    )
