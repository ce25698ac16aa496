"""mm checkpoints are interchangeable with MindSpeed-MM's: names, shapes, splits and its
``model_optim_rng.pt`` files, both ways; mmzoo's own format-1 checkpoints still load."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_hf import assert_bitwise, make_sample, tensors, token_types

import mmzoo
from mmzoo.checkpoint import conversion as convert
from mmzoo.cli import main as mmzoo_main
from mmzoo.commands.mm_convert import main as mm_convert_main
from mmzoo.errors import MmzooError
from mmzoo_qwen2_5_vl.compat import hf_forward

QUIET = dict(report=lambda line: None)
PT = "model_optim_rng.pt"
TP2_PP2 = dict(tp=2, vit_pp_layers=[4, 0], llm_pp_layers=[1, 2])

# --- the golden table ----------------------------------------------------------------------------
# What MindSpeed-MM's `mm-convert Qwen2_5_VLConverter hf_to_mm` writes for tiny_hf's config
# (ViT: 4 layers, width 64, 4 heads, MLP 96; LLM: 3 layers, width 64, 4 heads, 2 KV heads, MLP
# 128, vocab 1000) with tp_size 2, vit_pp_layers [[4,0]], llm_pp_layers [[1,2]]. Both tp ranks of
# a stage hold the same names and shapes; tied and untied models too (with pp > 1 the last stage
# holds output_layer either way). Layer rows are per layer, renumbered from 0 on each stage.
VIT_LAYERS = "image_encoder.encoder.blocks.layers."
VIT = VIT_LAYERS + "{i}."
LLM = "text_decoder.decoder.layers.{i}."
VIT_LAYER = {
    "fused": {
        "input_layernorm.weight": (64,),
        "self_attention.linear_qkv.weight": (96, 64),  # heads 2r, 2r+1, each [q; k; v]
        "self_attention.linear_qkv.bias": (96,),
        "self_attention.linear_proj.weight": (64, 32),
        "self_attention.linear_proj.bias": (64,),
        "pre_mlp_layernorm.weight": (64,),
        "mlp.linear_fc1.weight": (96, 64),  # [gate_r; up_r]
        "mlp.linear_fc1.bias": (96,),
        "mlp.linear_fc2.weight": (64, 48),
        "mlp.linear_fc2.bias": (64,),
    },
    "canonical": {
        "input_layernorm.weight": (64,),
        "self_attention.linear_qkv.weight": (96, 64),  # rows 96r.. of HF's [Q; K; V]
        "self_attention.linear_qkv.bias": (96,),
        "self_attention.linear_proj.weight": (64, 32),
        "self_attention.linear_proj.bias": (64,),
        "pre_mlp_layernorm.weight": (64,),
        "mlp.gate_proj.weight": (48, 64),
        "mlp.gate_proj.bias": (48,),
        "mlp.up_proj.weight": (48, 64),
        "mlp.up_proj.bias": (48,),
        "mlp.linear_fc2.weight": (64, 48),
        "mlp.linear_fc2.bias": (64,),
    },
}
LLM_LAYER = {
    "fused": {
        "input_layernorm.weight": (64,),
        "self_attention.linear_qkv.weight": (64, 64),  # KV group r: [q (2 heads); k; v]
        "self_attention.linear_qkv.bias": (64,),
        "self_attention.linear_proj.weight": (64, 32),
        "pre_mlp_layernorm.weight": (64,),
        "mlp.linear_fc1.weight": (128, 64),
        "mlp.linear_fc2.weight": (64, 64),
    },
    "canonical": {
        "input_layernorm.weight": (64,),
        "self_attention.q_proj.weight": (32, 64),
        "self_attention.q_proj.bias": (32,),
        "self_attention.k_proj.weight": (16, 64),
        "self_attention.k_proj.bias": (16,),
        "self_attention.v_proj.weight": (16, 64),
        "self_attention.v_proj.bias": (16,),
        "self_attention.linear_proj.weight": (64, 32),
        "pre_mlp_layernorm.weight": (64,),
        "mlp.gate_proj.weight": (64, 64),
        "mlp.up_proj.weight": (64, 64),
        "mlp.linear_fc2.weight": (64, 64),
    },
}
STAGE0_OTHERS = {
    "image_encoder.encoder.patch_embed.proj.weight": (64, 3, 2, 14, 14),
    "image_encoder.projector.layernorm.weight": (64,),
    "image_encoder.projector.encoder.linear_fc1.weight": (128, 256),
    "image_encoder.projector.encoder.linear_fc1.bias": (128,),
    "image_encoder.projector.encoder.linear_fc2.weight": (64, 128),
    "image_encoder.projector.encoder.linear_fc2.bias": (64,),
    "text_decoder.embedding.word_embeddings.weight": (500, 64),
}
STAGE1_OTHERS = {
    "text_decoder.decoder.final_layernorm.weight": (64,),
    "text_decoder.output_layer.weight": (500, 64),
}
# Tensors per shard of MindSpeed-MM's tp 1 / pp 1 output (no output_layer when tied).
TP1_COUNTS = {("fused", False): 70, ("fused", True): 69, ("canonical", False): 93, ("canonical", True): 92}


def golden(layout: str) -> dict[str, dict[str, tuple[int, ...]]]:
    def layers(prefix: str, rows: dict[str, tuple[int, ...]], count: int) -> dict[str, tuple[int, ...]]:
        return {prefix.format(i=i) + k: v for i in range(count) for k, v in rows.items()}

    stage0 = {**layers(VIT, VIT_LAYER[layout], 4), **layers(LLM, LLM_LAYER[layout], 1), **STAGE0_OTHERS}
    stage1 = {**layers(LLM, LLM_LAYER[layout], 2), **STAGE1_OTHERS}
    return {f"mp_rank_{t:02d}_{p:03d}": stage for t in range(2) for p, stage in enumerate((stage0, stage1))}


def read_pt(file: Path) -> dict[str, torch.Tensor]:
    """A model_optim_rng.pt as MindSpeed-MM writes it: exactly {'model': ..., 'checkpoint_version': 3.0}."""
    obj = torch.load(file, map_location="cpu", weights_only=True)
    assert set(obj) == {"model", "checkpoint_version"} and obj["checkpoint_version"] == 3.0
    for name, tensor in obj["model"].items():  # each tensor its own compact storage
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name
    return obj["model"]


def shard_tensors(shard: Path) -> dict[str, torch.Tensor]:
    return read_pt(shard / PT) if (shard / PT).is_file() else load_file(shard / "model.safetensors")


def assert_same_model(a, b) -> None:
    assert_bitwise(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("weights_format", ["megatron", "safetensors"])
@pytest.mark.parametrize("layout", ["fused", "canonical"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_shards_match_the_golden_table(tied, layout, weights_format, hf_untied, hf_tied, tmp_path):
    hf = hf_tied if tied else hf_untied
    mm = convert.hf_to_mm(
        hf, tmp_path / "mm", layout=layout, weights_format=weights_format, **TP2_PP2, **QUIET
    )
    release = mm / "release"
    got = {
        shard: {name: tuple(t.shape) for name, t in shard_tensors(release / shard).items()}
        for shard in golden(layout)
    }
    assert got == golden(layout)
    assert sorted(p.name for p in release.iterdir() if p.name.startswith("mp_rank")) == sorted(golden(layout))
    weights = {p.name for p in release.glob("mp_rank_*/*") if p.name != "mm_meta.json"}
    assert weights == {PT if weights_format == "megatron" else "model.safetensors"}

    tp1 = convert.hf_to_mm(hf, tmp_path / "tp1", layout=layout, weights_format=weights_format, **QUIET)
    assert len(shard_tensors(tp1 / "release" / "mp_rank_00")) == TP1_COUNTS[layout, tied]


def test_shard_contents_are_mindspeed_splits(hf_untied, tmp_path):
    """Which rows each tp rank holds, fused and canonical, as MindSpeed-MM splits them."""
    hf = tensors(hf_untied)
    fused = convert.hf_to_mm(hf_untied, tmp_path / "f", weights_format="megatron", **TP2_PP2, **QUIET)
    canon = convert.hf_to_mm(hf_untied, tmp_path / "c", layout="canonical", **TP2_PP2, **QUIET)
    qkv = hf["visual.blocks.2.attn.qkv.weight"]  # [Q; K; V], 4 heads of 16 rows each
    gate, up = hf["visual.blocks.2.mlp.gate_proj.weight"], hf["visual.blocks.2.mlp.up_proj.weight"]
    q_text = hf["model.layers.2.self_attn.q_proj.weight"]
    for r in range(2):
        f0 = read_pt(fused / "release" / f"mp_rank_{r:02d}_000" / PT)
        heads = [torch.cat([qkv[j * 64 + h * 16 :][:16] for j in range(3)]) for h in (2 * r, 2 * r + 1)]
        assert torch.equal(f0[VIT.format(i=2) + "self_attention.linear_qkv.weight"], torch.cat(heads))
        c0 = load_file(canon / "release" / f"mp_rank_{r:02d}_000" / "model.safetensors")
        assert torch.equal(
            c0[VIT.format(i=2) + "self_attention.linear_qkv.weight"], qkv[96 * r : 96 * (r + 1)]
        )
        assert torch.equal(c0[VIT.format(i=2) + "mlp.gate_proj.weight"], gate[48 * r : 48 * (r + 1)])
        assert torch.equal(c0[VIT.format(i=2) + "mlp.up_proj.weight"], up[48 * r : 48 * (r + 1)])
        c1 = load_file(canon / "release" / f"mp_rank_{r:02d}_001" / "model.safetensors")
        assert torch.equal(
            c1[LLM.format(i=1) + "self_attention.q_proj.weight"], q_text[32 * r : 32 * (r + 1)]
        )


def test_tied_output_layer_is_a_copy_on_the_last_stage(hf_tied, tmp_path):
    mm = convert.hf_to_mm(hf_tied, tmp_path / "mm", weights_format="megatron", **TP2_PP2, **QUIET)
    for r in range(2):
        first = read_pt(mm / "release" / f"mp_rank_{r:02d}_000" / PT)
        last = read_pt(mm / "release" / f"mp_rank_{r:02d}_001" / PT)
        assert torch.equal(
            last["text_decoder.output_layer.weight"], first["text_decoder.embedding.word_embeddings.weight"]
        )


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["fused", "canonical"])
@pytest.mark.parametrize("split", [{}, TP2_PP2], ids=["tp1", "tp2-pp2"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_hf_pt_hf_is_bitwise(tied, split, layout, hf_untied, hf_tied, tmp_path):
    hf = hf_tied if tied else hf_untied
    mm = convert.hf_to_mm(hf, tmp_path / "mm", layout=layout, weights_format="megatron", **split, **QUIET)
    assert_bitwise(tensors(convert.mm_to_hf(mm, tmp_path / "hf", **QUIET)), tensors(hf))


def strip_to_mindspeed(mm: Path, keep_assets: bool = False) -> Path:
    """Leave what MindSpeed-MM writes: the tracker and mp_rank_*/model_optim_rng.pt only."""
    for meta in (mm / "release").glob("mp_rank_*/mm_meta.json"):
        meta.unlink()
    if not keep_assets:
        shutil.rmtree(mm / "release" / "hf_assets")
    return mm


def test_pt_without_meta_loads_with_the_same_logits(hf_model, hf_dir, tmp_path):
    mm = convert.hf_to_mm(
        hf_dir, tmp_path / "mm", layout="canonical", weights_format="megatron", **TP2_PP2, **QUIET
    )
    strip_to_mindspeed(mm, keep_assets=True)  # the config comes from hf_assets/config.json
    model = mmzoo.load_model(mm).eval()
    assert model.config == mmzoo.load_model(hf_dir).config
    batch = make_sample(images=[(1, 12, 10)], videos=[(2, 8, 4)], seconds=[0.5])
    with torch.no_grad():
        expected = hf_model(**batch, mm_token_type_ids=token_types(batch["input_ids"])).logits
        torch.testing.assert_close(hf_forward(model, **batch).logits, expected, atol=1e-5, rtol=1e-4)


def test_pt_without_meta_or_config_needs_the_hf_template(hf_untied, tmp_path):
    mm = strip_to_mindspeed(
        convert.hf_to_mm(hf_untied, tmp_path / "mm", weights_format="megatron", **TP2_PP2, **QUIET)
    )
    # Its vocabulary of 1000 matches no registered variant: the error says what to pass.
    with pytest.raises(MmzooError) as info:
        mmzoo.load_model(mm)
    message = str(info.value)
    assert "has no mm_meta.json" in message and "match no registered variant (" in message
    assert "qwen2_5_vl 3b, qwen2_5_vl 7b" in message
    assert "pass the HF checkpoint it came from (--hf-template)" in message and "\n" not in message
    back = convert.mm_to_hf(mm, tmp_path / "hf", template=hf_untied, **QUIET)
    assert_bitwise(tensors(back), tensors(hf_untied))
    re = convert.resplit(mm, tmp_path / "re", template=hf_untied, **QUIET)  # tp 1, still .pt
    assert (re / "release" / "mp_rank_00" / PT).is_file()
    assert json.loads((re / "release" / "mp_rank_00" / "mm_meta.json").read_text())["variant"] is None


def test_pt_without_meta_takes_the_registered_variant_its_shapes_match(tmp_path):
    from mmzoo.checkpoint.hf_export import save_hf

    torch.manual_seed(0)
    model = mmzoo.build_model("qwen2_5_vl", "tiny").eval()
    hf = save_hf(model, tmp_path / "hf")
    mm = strip_to_mindspeed(
        convert.hf_to_mm(hf, tmp_path / "mm", weights_format="megatron", tp=2, llm_pp_layers=[1, 1], **QUIET)
    )
    loaded = mmzoo.load_model(mm).eval()
    assert loaded.config == mmzoo.get_model("qwen2_5_vl").variant("tiny")
    assert_same_model(loaded, model)
    batch = mmzoo.get_model("qwen2_5_vl").example_batch(model.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "first, second",
    [("safetensors", "megatron"), ("megatron", "safetensors")],
    ids=["st-to-pt", "pt-to-st"],
)
def test_resplit_between_formats_equals_direct_conversion(first, second, hf_untied, tmp_path):
    src = convert.hf_to_mm(hf_untied, tmp_path / "a", weights_format=first, **TP2_PP2, **QUIET)
    target = dict(tp=2, vit_pp_layers=[4, 0, 0], llm_pp_layers=[1, 1, 1], layout="canonical")
    out = convert.resplit(src, tmp_path / "b", weights_format=second, **target, **QUIET)
    direct = convert.hf_to_mm(hf_untied, tmp_path / "d", weights_format=second, **target, **QUIET)
    shards = sorted(p.name for p in (direct / "release").glob("mp_rank_*"))
    assert sorted(p.name for p in (out / "release").glob("mp_rank_*")) == shards and len(shards) == 6
    for shard in shards:
        assert_bitwise(shard_tensors(out / "release" / shard), shard_tensors(direct / "release" / shard))
    # Without --format, resplit keeps the source's.
    kept = convert.resplit(out, tmp_path / "c", **QUIET)
    assert (kept / "release" / "mp_rank_00" / (PT if second == "megatron" else "model.safetensors")).is_file()


# --- format 1: mmzoo's own earlier names ---------------------------------------------------------

LEGACY_PREFIXES = {  # today's prefix -> format 1's
    "image_encoder.encoder.": "vision_encoder.",
    "image_encoder.projector.layernorm.": "projector.layernorm.",
    "image_encoder.projector.encoder.": "projector.",
}
LEGACY_PARTS = {  # canonical parts: today's -> format 1's "<module>.<part>"
    "self_attention.q_proj.": "self_attention.linear_qkv.q.",
    "self_attention.k_proj.": "self_attention.linear_qkv.k.",
    "self_attention.v_proj.": "self_attention.linear_qkv.v.",
    "mlp.gate_proj.": "mlp.linear_fc1.gate.",
    "mlp.up_proj.": "mlp.linear_fc1.up.",
}


def legacy_name(name: str) -> str:
    new = next((p for p in LEGACY_PREFIXES if name.startswith(p)), None)
    if new is not None:
        name = LEGACY_PREFIXES[new] + name[len(new) :]
    for part, old in LEGACY_PARTS.items():
        name = name.replace(part, old)
    return name


def to_format_1(mm: Path) -> Path:
    """Rewrite a safetensors mm checkpoint as mmzoo's format 1 wrote it: the old names, and in the
    canonical layout the ViT's qkv as q, k, v parts each split by rows over the tp ranks."""
    shards = sorted((mm / "release").glob("mp_rank_*"))
    tensors = {s: load_file(s / "model.safetensors") for s in shards}
    meta = json.loads((shards[0] / "mm_meta.json").read_text())
    for shard, state in tensors.items():
        out = {legacy_name(k): v for k, v in state.items()}
        if meta["layout"] == "canonical":
            stage = shard.name[len("mp_rank_00") :]
            ranks = [tensors[mm / "release" / f"mp_rank_{t:02d}{stage}"] for t in range(meta["tp"])]
            rank = int(shard.name[8:10])
            for name in [k for k in state if k.startswith(VIT_LAYERS) and ".linear_qkv." in k]:
                q, k, v = torch.cat([r[name] for r in ranks]).chunk(3)  # HF's [Q; K; V]
                module, _, param = legacy_name(name).rpartition(".")
                del out[legacy_name(name)]
                for part, full in zip("qkv", (q, k, v), strict=True):
                    out[f"{module}.{part}.{param}"] = full.chunk(meta["tp"])[rank].contiguous()
        save_file(out, shard / "model.safetensors")
    for file in (mm / "release").glob("mp_rank_*/mm_meta.json"):
        file.write_text(json.dumps({**json.loads(file.read_text()), "format_version": 1}))
    return mm


@pytest.mark.parametrize(
    "split",
    [dict(layout="fused"), dict(layout="canonical", **TP2_PP2)],
    ids=["fused-tp1", "canonical-tp2-pp2"],
)
def test_format_1_checkpoints_still_load(split, hf_untied, tmp_path):
    legacy = to_format_1(convert.hf_to_mm(hf_untied, tmp_path / "v1", **split, **QUIET))
    first = load_file(
        legacy
        / "release"
        / sorted(p.name for p in (legacy / "release").glob("mp_rank_*"))[0]
        / "model.safetensors"
    )
    assert "vision_encoder.patch_embed.proj.weight" in first and "projector.linear_fc1.weight" in first
    assert_same_model(mmzoo.load_model(legacy), mmzoo.load_model(hf_untied))
    assert_bitwise(tensors(convert.mm_to_hf(legacy, tmp_path / "hf", **QUIET)), tensors(hf_untied))
    # Rewriting it gives today's format.
    new = convert.resplit(legacy, tmp_path / "v2", **QUIET)
    shard = new / "release" / "mp_rank_00"
    assert json.loads((shard / "mm_meta.json").read_text())["format_version"] == 2
    with safe_open(shard / "model.safetensors", framework="pt") as f:
        assert "image_encoder.encoder.patch_embed.proj.weight" in f.keys()


# --- model_optim_rng.pt that mmzoo does not read -------------------------------------------------


def test_unreadable_pt_files_are_one_line_errors(hf_untied, tmp_path):
    mm = convert.hf_to_mm(hf_untied, tmp_path / "mm", weights_format="megatron", **QUIET)
    strip_to_mindspeed(mm, keep_assets=True)
    file = mm / "release" / "mp_rank_00" / PT
    good = file.read_bytes()
    state = torch.load(file, weights_only=True)["model"]
    cases = [
        (lambda: file.write_bytes(good[: len(good) // 2]), "not a torch.save zip archive"),
        (lambda: file.write_bytes(good[:-100]), "not a torch.save zip archive"),
        (lambda: file.write_bytes(b"not a checkpoint"), "not a torch.save zip archive"),
        (
            lambda: torch.save({"model": state, "args": argparse.Namespace(tp=1), "iteration": 5}, file),
            "holds more than a model state dict",
        ),
        (
            lambda: torch.save({"model": state, "checkpoint_version": 3.0, "iteration": 5}, file),
            "holds more than a model state dict (iteration) (a training checkpoint with args",
        ),
        (
            lambda: torch.save({"model0": state, "model1": state, "checkpoint_version": 3.0}, file),
            "holds virtual-pipeline chunks (model0, model1)",
        ),
        (
            lambda: torch.save({"weights": state}, file),
            "expected {'model': state_dict, 'checkpoint_version': ...}",
        ),
        (
            lambda: torch.save({"model": {**state, "step": 3}, "checkpoint_version": 3.0}, file),
            "'model' holds non-tensor values under step",
        ),
    ]
    for write, message in cases:
        write()
        with pytest.raises(MmzooError) as info:
            mmzoo.load_model(mm)
        assert str(info.value).startswith(f"{file}: ") and message in str(info.value), str(info.value)
        assert "\n" not in str(info.value)
    torch.save({"model": {**state, "x._extra_state": None}, "checkpoint_version": 3.0}, file)
    mmzoo.load_model(mm, dtype=None)  # Megatron's empty _extra_state entries are skipped


def test_inferred_meta_errors(hf_untied, tmp_path):
    mm = strip_to_mindspeed(
        convert.hf_to_mm(hf_untied, tmp_path / "mm", weights_format="megatron", **TP2_PP2, **QUIET)
    )
    shutil.rmtree(mm / "release" / "mp_rank_01_001")
    with pytest.raises(MmzooError, match=r"do not form a tp x pp grid \(mp_rank_01_001\)"):
        convert.mm_to_hf(mm, tmp_path / "hf", template=hf_untied, **QUIET)
    config = json.loads((hf_untied / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 4
    (other := tmp_path / "other").mkdir()
    (other / "config.json").write_text(json.dumps(config))
    mm2 = strip_to_mindspeed(
        convert.hf_to_mm(hf_untied, tmp_path / "mm2", weights_format="megatron", **QUIET)
    )
    with pytest.raises(
        MmzooError, match=r"does not hold the qwen2_5_vl model .*the shards hold 3 text layers, the config 4"
    ):
        convert.mm_to_hf(mm2, tmp_path / "hf", template=other, **QUIET)


# --- command lines -------------------------------------------------------------------------------


def test_mmzoo_convert_format_option(hf_untied, tmp_path):
    mm, re, hf = tmp_path / "mm", tmp_path / "re", tmp_path / "hf"
    argv = ["convert", "hf-to-mm", "--hf-dir", str(hf_untied), "--mm-dir", str(mm), "--format", "megatron"]
    assert mmzoo_main([*argv, "--tp", "2", "--llm-pp-layers", "1,2", "--vit-pp-layers", "4,0"]) == 0
    assert (mm / "release" / "mp_rank_01_001" / PT).is_file()
    assert (
        mmzoo_main(["convert", "resplit", "--src", str(mm), "--dst", str(re), "--format", "safetensors"]) == 0
    )
    assert (re / "release" / "mp_rank_00" / "model.safetensors").is_file()
    assert mmzoo_main(["convert", "mm-to-hf", "--mm-dir", str(re), "--hf-dir", str(hf)]) == 0
    assert_bitwise(tensors(hf), tensors(hf_untied))


def mm_convert(op: str, *cfg: str) -> int:
    return mm_convert_main(["Qwen2_5_VLConverter", op, *cfg])


def test_mm_convert_enable_canonical_hf_struct(hf_untied, tmp_path, capsys):
    hf_args = ["--cfg.hf_config.hf_dir", str(hf_untied)]
    split = [
        "--cfg.parallel_config.llm_pp_layers",
        "[[1,2]]",
        "--cfg.parallel_config.vit_pp_layers",
        "[[4,0]]",
    ]
    split += ["--cfg.parallel_config.tp_size", "2"]
    key = "--cfg.common_model_config.enable_canonical_hf_struct"
    for value, layout in (("true", "canonical"), ("false", "fused"), (None, "fused")):
        out = tmp_path / f"mm_{value}"
        flag = [key, value] if value else []
        assert mm_convert("hf_to_mm", "--cfg.mm_dir", str(out), *hf_args, *split, *flag) == 0
        got = {n: tuple(t.shape) for n, t in read_pt(out / "release" / "mp_rank_01_001" / PT).items()}
        assert got == golden(layout)["mp_rank_01_001"]  # MindSpeed's default file: model_optim_rng.pt
    canonical = tmp_path / "mm_true"
    # mm_to_hf accepts the flag (the layout is read from the shards; a contradiction is an error).
    assert (
        mm_convert(
            "mm_to_hf",
            "--cfg.mm_dir",
            str(canonical),
            "--cfg.save_hf_dir",
            str(tmp_path / "hf"),
            *hf_args,
            key,
            "true",
        )
        == 0
    )
    assert_bitwise(tensors(tmp_path / "hf"), tensors(hf_untied))
    assert (
        mm_convert(
            "mm_to_hf", "--cfg.mm_dir", str(canonical), "--cfg.save_hf_dir", str(tmp_path / "x"), key, "false"
        )
        == 2
    )
    assert (
        "holds the canonical layout, but --cfg.common_model_config.enable_canonical_hf_struct says fused"
        in capsys.readouterr().err
    )
    # resplit: the flag picks the target layout; --cfg.format the shard file.
    target = [
        "--cfg.target_parallel_config.llm_pp_layers",
        "[3]",
        "--cfg.target_parallel_config.vit_pp_layers",
        "[4]",
    ]
    re = tmp_path / "re"
    assert (
        mm_convert(
            "resplit",
            "--cfg.source_path",
            str(tmp_path / "mm_None"),
            "--cfg.target_path",
            str(re),
            *target,
            key,
            "true",
            "--cfg.format",
            "safetensors",
        )
        == 0
    )
    with safe_open(re / "release" / "mp_rank_00" / "model.safetensors", framework="pt") as f:
        assert "text_decoder.decoder.layers.2.self_attention.q_proj.weight" in f.keys()
    assert mm_convert("hf_to_mm", "--cfg.mm_dir", str(tmp_path / "y"), *hf_args, key, "yes") == 2
    assert "enable_canonical_hf_struct: expected true or false, got 'yes'" in capsys.readouterr().err
    assert (
        mm_convert(
            "hf_to_mm", "--cfg.mm_dir", str(tmp_path / "y"), *hf_args, key, "true", "--cfg.layout", "fused"
        )
        == 2
    )
    assert "--cfg.layout fused contradicts" in capsys.readouterr().err
