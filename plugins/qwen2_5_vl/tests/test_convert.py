"""Checkpoint conversion: HF <-> mm round trips (tp, pp, layouts), resplit, validation, atomicity, CLIs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_hf import assert_bitwise, make_hf, make_sample, tensors, token_types

import mmzoo
from mmzoo.checkpoint import conversion as convert
from mmzoo.cli import main as mmzoo_main
from mmzoo.commands.mm_convert import main as mm_convert_main
from mmzoo.errors import MmzooError
from mmzoo_qwen2_5_vl.compat import hf_forward

QUIET = dict(report=lambda line: None)
# (tp, vit_pp_layers, llm_pp_layers, layout): the tiny model has 4 vision and 3 LLM layers.
SPLITS = [
    (1, None, None, "fused"),
    (2, [4, 0], [1, 2], "fused"),
    (2, [4, 0, 0], [0, 2, 1], "fused"),
    (1, [4, 0, 0], [1, 1, 1], "canonical"),
    (2, [2, 2, 0], [0, 1, 2], "canonical"),
]


def no_leftovers(out: Path) -> bool:
    """Neither ``out`` nor a temporary sibling of it exists."""
    return not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: f"tp{s[0]}-vit{s[1]}-llm{s[2]}-{s[3]}")
def test_hf_mm_hf_is_bitwise(split, tied, hf_untied, hf_tied, tmp_path):
    tp, vit, llm, layout = split
    hf = hf_tied if tied else hf_untied
    mm = convert.hf_to_mm(
        hf, tmp_path / "mm", tp=tp, vit_pp_layers=vit, llm_pp_layers=llm, layout=layout, **QUIET
    )
    back = convert.mm_to_hf(mm, tmp_path / "hf", **QUIET)
    assert_bitwise(tensors(back), tensors(hf))
    assert (back / "config.json").read_text() == (hf / "config.json").read_text()
    assert "lm_head.weight" not in tensors(back) if tied else True
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_shards_hold_what_each_megatron_rank_holds(hf_untied, tmp_path):
    mm = convert.hf_to_mm(
        hf_untied, tmp_path / "mm", tp=2, vit_pp_layers=[4, 0], llm_pp_layers=[1, 2], **QUIET
    )
    release = mm / "release"
    assert sorted(p.name for p in release.iterdir()) == [
        "hf_assets",
        "mp_rank_00_000",
        "mp_rank_00_001",
        "mp_rank_01_000",
        "mp_rank_01_001",
    ]
    meta = json.loads((release / "mp_rank_01_001" / "mm_meta.json").read_text())
    assert (meta["tp"], meta["tp_rank"], meta["pp"], meta["pp_rank"]) == (2, 1, 2, 1)
    assert (meta["vit_layers"], meta["llm_layers"], meta["layout"]) == ([4, 4], [1, 3], "fused")
    hf = tensors(hf_untied)
    last = load_file(release / "mp_rank_01_001" / "model.safetensors")
    # Stage 1 holds global LLM layers 1-2 as local 0-1, the final norm and the output layer.
    assert {k.split(".layers.")[1].split(".")[0] for k in last if ".layers." in k} == {"0", "1"}
    assert torch.equal(last["text_decoder.output_layer.weight"], hf["lm_head.weight"][500:])
    fc1 = last["text_decoder.decoder.layers.0.mlp.linear_fc1.weight"]  # rank 1: [gate_1; up_1]
    gate, up = hf["model.layers.1.mlp.gate_proj.weight"], hf["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(fc1, torch.cat([gate[64:], up[64:]]))
    proj = last["text_decoder.decoder.layers.1.self_attention.linear_proj.weight"]
    assert torch.equal(proj, hf["model.layers.2.self_attn.o_proj.weight"][:, 32:])
    # kv group 1 of 2: heads 2-3 of q, then k and v of group 1 (head_dim 16).
    qkv = last["text_decoder.decoder.layers.0.self_attention.linear_qkv.weight"]
    q, k = hf["model.layers.1.self_attn.q_proj.weight"], hf["model.layers.1.self_attn.k_proj.weight"]
    v = hf["model.layers.1.self_attn.v_proj.weight"]
    assert torch.equal(qkv, torch.cat([q[32:], k[16:], v[16:]]))
    first = load_file(release / "mp_rank_00_000" / "model.safetensors")
    assert "text_decoder.decoder.final_layernorm.weight" not in first
    assert (
        "image_encoder.projector.encoder.linear_fc2.bias" in first
        and "image_encoder.encoder.blocks.layers.3.input_layernorm.weight" in first
    )


def test_tied_embedding_is_copied_to_the_last_stage(hf_tied, tmp_path):
    mm = convert.hf_to_mm(hf_tied, tmp_path / "mm", vit_pp_layers=[4, 0], llm_pp_layers=[1, 2], **QUIET)
    first = load_file(mm / "release" / "mp_rank_00_000" / "model.safetensors")
    last = load_file(mm / "release" / "mp_rank_00_001" / "model.safetensors")
    assert "text_decoder.output_layer.weight" not in first
    assert torch.equal(
        last["text_decoder.output_layer.weight"], first["text_decoder.embedding.word_embeddings.weight"]
    )


def test_both_hf_key_layouts(tmp_path_factory, tmp_path):
    new = make_hf(tmp_path_factory, tied=False, new_keys=True)
    mm = convert.hf_to_mm(new, tmp_path / "mm", tp=2, vit_pp_layers=[4, 0], llm_pp_layers=[2, 1], **QUIET)
    assert_bitwise(tensors(convert.mm_to_hf(mm, tmp_path / "hf", **QUIET)), tensors(new))
    # With the older-layout original as template, that layout is written.
    old = make_hf(tmp_path_factory, tied=False)
    mm_old = convert.hf_to_mm(old, tmp_path / "mm_old", tp=2, **QUIET)
    assert_bitwise(
        tensors(convert.mm_to_hf(mm_old, tmp_path / "hf_old", template=old, **QUIET)), tensors(old)
    )


def test_sharded_original_is_resharded_alike(hf_untied, tmp_path):
    model = mmzoo.load_model(hf_untied)
    from mmzoo.checkpoint.hf_export import save_hf

    sharded = save_hf(model, tmp_path / "sharded", max_shard_bytes=600_000)
    mm = convert.hf_to_mm(sharded, tmp_path / "mm", tp=2, **QUIET)
    back = convert.mm_to_hf(mm, tmp_path / "back", **QUIET)
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert index == json.loads((sharded / "model.safetensors.index.json").read_text())
    assert_bitwise(tensors(back), tensors(sharded))


@pytest.mark.parametrize("target", [(2, [4, 0, 0], [0, 1, 2], "canonical"), (1, None, None, "fused")])
def test_resplit_equals_direct_conversion(target, hf_untied, tmp_path):
    tp, vit, llm, layout = target
    a = convert.hf_to_mm(hf_untied, tmp_path / "a", tp=2, vit_pp_layers=[4, 0], llm_pp_layers=[2, 1], **QUIET)
    b = convert.resplit(
        a, tmp_path / "b", tp=tp, vit_pp_layers=vit, llm_pp_layers=llm, layout=layout, **QUIET
    )
    direct = convert.hf_to_mm(
        hf_untied, tmp_path / "d", tp=tp, vit_pp_layers=vit, llm_pp_layers=llm, layout=layout, **QUIET
    )
    shards = sorted(p.name for p in (direct / "release").iterdir())
    assert sorted(p.name for p in (b / "release").iterdir()) == shards
    for shard in shards:
        if shard.startswith("mp_rank"):
            assert_bitwise(
                load_file(b / "release" / shard / "model.safetensors"),
                load_file(direct / "release" / shard / "model.safetensors"),
            )
            assert (b / "release" / shard / "mm_meta.json").read_text() == (
                direct / "release" / shard / "mm_meta.json"
            ).read_text()


@pytest.mark.parametrize("split", [SPLITS[2], SPLITS[4]], ids=["tp2-pp3-fused", "tp2-pp3-canonical"])
def test_load_model_of_any_split_gives_transformers_logits(split, hf_model, hf_dir, tmp_path):
    tp, vit, llm, layout = split
    mm = convert.hf_to_mm(
        hf_dir, tmp_path / "mm", tp=tp, vit_pp_layers=vit, llm_pp_layers=llm, layout=layout, **QUIET
    )
    model = mmzoo.load_model(mm).eval()
    batch = make_sample(images=[(1, 12, 10)], videos=[(2, 8, 4)], seconds=[0.5])
    with torch.no_grad():
        expected = hf_model(**batch, mm_token_type_ids=token_types(batch["input_ids"])).logits
        torch.testing.assert_close(hf_forward(model, **batch).logits, expected, atol=1e-5, rtol=1e-4)


# --- validation: each a one-line error, nothing written ---------------------------------------


def edited_hf(src: Path, dst: Path, *, drop=(), add=None, config=None) -> Path:
    dst.mkdir()
    weights = {k: v for k, v in load_file(src / "model.safetensors").items() if k not in drop}
    weights.update(add or {})
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    for key, value in (config or {}).items():
        section = cfg
        *path, last = key.split(".")
        for part in path:
            section = section[part]
        section[last] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(llm_pp_layers=[1, 1]), "llm pp layers [1, 1] sum to 2, but the model has 3 text layers"),
        (dict(vit_pp_layers=[4, 1], llm_pp_layers=[1, 2]), "vit pp layers [4, 1] sum to 5"),
        (dict(tp=4), "num_kv_heads 2 is not divisible by tp 4"),
        (
            dict(vit_pp_layers=[2, 2], llm_pp_layers=[1, 2]),
            "stage 0 holds LLM layers before the vision encoder",
        ),
        (
            dict(model="internvl3"),
            "is a qwen2_5_vl checkpoint (Qwen2_5_VLForConditionalGeneration), not internvl3",
        ),
        (dict(layout="flat"), "unknown layout 'flat'"),
    ],
)
def test_invalid_layouts_are_one_line_errors(kwargs, message, hf_untied, tmp_path):
    out = tmp_path / "mm"
    with pytest.raises(MmzooError, match=None) as info:
        convert.hf_to_mm(hf_untied, out, **kwargs, **QUIET)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert no_leftovers(out)


def test_missing_unexpected_and_misshaped_weights(hf_untied, tmp_path):
    cases = [
        (
            dict(drop=("model.layers.2.mlp.up_proj.weight", "visual.merger.ln_q.weight")),
            "2 weights missing: model.layers.2.mlp.up_proj.weight, visual.merger.ln_q.weight",
        ),
        (
            dict(add={"model.layers.2.extra.weight": torch.zeros(2)}),
            "1 unexpected weights: model.layers.2.extra.weight",
        ),
        (
            dict(config={"text_config.intermediate_size": 96}),
            "shape mismatch for model.layers.0.mlp.gate_proj.weight: checkpoint gives (128, 64), "
            "config.json implies (96, 64)",
        ),
        (
            dict(config={"architectures": ["LlamaForCausalLM"]}),
            "no installed plugin reads the architecture 'LlamaForCausalLM'",
        ),
    ]
    for i, (edit, message) in enumerate(cases):
        src = edited_hf(hf_untied, tmp_path / f"src{i}", **edit)
        with pytest.raises(MmzooError) as info:
            convert.hf_to_mm(src, tmp_path / f"out{i}", **QUIET)
        assert message in str(info.value) and "\n" not in str(info.value)
        assert no_leftovers(tmp_path / f"out{i}")


def test_existing_output_needs_force(hf_untied, tmp_path):
    out = tmp_path / "mm"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(MmzooError, match="already exists; choose a new directory or pass --force"):
        convert.hf_to_mm(hf_untied, out, **QUIET)
    assert (out / "keep").is_file()
    convert.hf_to_mm(hf_untied, out, force=True, **QUIET)
    assert sorted(p.name for p in out.iterdir()) == ["latest_checkpointed_iteration.txt", "release"]
    with pytest.raises(MmzooError, match="already exists"):
        convert.mm_to_hf(out, hf_untied, **QUIET)


# --- atomic output -------------------------------------------------------------------------------


def test_a_failure_midway_leaves_nothing(hf_untied, tmp_path, monkeypatch):
    from mmzoo.checkpoint.sources import HFSource

    calls = {"n": 0}
    real_get = HFSource.get

    def failing_get(self, name):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError("disk full")
        return real_get(self, name)

    monkeypatch.setattr(HFSource, "get", failing_get)
    out = tmp_path / "mm"
    with pytest.raises(OSError, match="disk full"):
        convert.hf_to_mm(hf_untied, out, tp=2, vit_pp_layers=[4, 0], llm_pp_layers=[1, 2], **QUIET)
    assert calls["n"] == 40 and no_leftovers(out)


SLOW_CONVERT = """
import sys, time
from mmzoo.checkpoint import conversion as convert
from mmzoo.checkpoint.sources import HFSource
real = HFSource.get
def slow(self, name):
    time.sleep(0.02)
    return real(self, name)
HFSource.get = slow
from mmzoo.commands.convert import _terminate_cleanly
with _terminate_cleanly():
    convert.hf_to_mm(sys.argv[1], sys.argv[2], llm_pp_layers=[1, 2], vit_pp_layers=[4, 0])
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_a_killed_conversion_leaves_no_checkpoint(sig, hf_untied, tmp_path):
    out = tmp_path / "mm"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CONVERT, str(hf_untied), str(out)], stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    assert proc.stderr.readline().startswith("[1/2] mp_rank_00_000")  # the first shard is written
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert not out.exists()
    if sig == signal.SIGTERM:
        assert no_leftovers(out)  # cleaned up on the way out
    convert.hf_to_mm(hf_untied, out, **QUIET)  # a later conversion removes a killed one's temporary
    assert out.is_dir() and not list(tmp_path.glob(".mm.tmp-*"))


# --- command lines ----------------------------------------------------------------------------


def test_mmzoo_convert_commands(hf_untied, tmp_path, capsys):
    mm, re, hf = tmp_path / "mm", tmp_path / "re", tmp_path / "hf"
    argv = ["convert", "hf-to-mm", "--hf-dir", str(hf_untied), "--mm-dir", str(mm), "--model", "qwen2_5_vl"]
    assert mmzoo_main([*argv, "--tp", "2", "--llm-pp-layers", "1,2", "--vit-pp-layers", "4,0"]) == 0
    err = capsys.readouterr().err
    assert "[1/4] mp_rank_00_000:" in err and "wrote 140 tensors" in err
    assert (
        mmzoo_main(
            ["convert", "resplit", "--src", str(mm), "--dst", str(re), "--tp", "1", "--layout", "canonical"]
        )
        == 0
    )
    assert (
        mmzoo_main(
            ["convert", "mm-to-hf", "--mm-dir", str(re), "--hf-dir", str(hf), "--hf-template", str(hf_untied)]
        )
        == 0
    )
    assert_bitwise(tensors(hf), tensors(hf_untied))
    assert mmzoo_main([*argv]) == 2
    assert "already exists" in capsys.readouterr().err


def test_mm_convert_compatibility_form(hf_untied, tmp_path):
    mm, re, hf = tmp_path / "mm", tmp_path / "re", tmp_path / "hf"
    assert (
        mm_convert_main(
            [
                "Qwen2_5_VLConverter",
                "hf_to_mm",
                "--cfg.mm_dir",
                str(mm),
                "--cfg.hf_config.hf_dir",
                str(hf_untied),
                "--cfg.parallel_config.llm_pp_layers",
                "[[1,2]]",
                "--cfg.parallel_config.vit_pp_layers",
                "[[4,0]]",
                "--cfg.parallel_config.tp_size",
                "2",
            ]
        )
        == 0
    )
    assert json.loads((mm / "release" / "mp_rank_01_001" / "mm_meta.json").read_text())["llm_pp_layers"] == [
        1,
        2,
    ]
    assert (
        mm_convert_main(
            [
                "Qwen2_5_VLConverter",
                "resplit",
                "--cfg.source_path",
                str(mm),
                "--cfg.target_path",
                str(re),
                "--cfg.source_parallel_config.llm_pp_layers",
                "[1,2]",
                "--cfg.source_parallel_config.vit_pp_layers",
                "[4,0]",
                "--cfg.source_parallel_config.tp_size",
                "2",
                "--cfg.target_parallel_config.llm_pp_layers",
                "[3]",
                "--cfg.target_parallel_config.vit_pp_layers",
                "[4]",
                "--cfg.target_parallel_config.tp_size",
                "1",
            ]
        )
        == 0
    )
    # MindSpeed-MM's shard file, as its own mm-convert writes; resplit keeps the source's format.
    assert (re / "release" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    assert (
        mm_convert_main(
            [
                "Qwen2_5_VLConverter",
                "mm_to_hf",
                "--cfg.save_hf_dir",
                str(hf),
                "--cfg.mm_dir",
                str(re),
                "--cfg.hf_config.hf_dir",
                str(hf_untied),
                "--cfg.parallel_config.llm_pp_layers",
                "[3]",
                "--cfg.parallel_config.vit_pp_layers",
                "[4]",
                "--cfg.parallel_config.tp_size",
                "1",
            ]
        )
        == 0
    )
    assert_bitwise(tensors(hf), tensors(hf_untied))


def test_mm_convert_errors(hf_untied, tmp_path, capsys):
    assert (
        mm_convert_main(
            [
                "Qwen2_5_VLConverter",
                "hf_to_mm",
                "--cfg.mm_dir",
                str(tmp_path / "x"),
                "--cfg.hf_config.hf_dir",
                str(hf_untied),
                "--cfg.parallel_config.tp_sise",
                "2",
            ]
        )
        == 2
    )
    assert "unknown options for hf_to_mm: --cfg.parallel_config.tp_sise" in capsys.readouterr().err
    assert mm_convert_main(["NopeConverter", "hf_to_mm"]) == 2
    assert "mm-convert: error: " in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert mm_convert_main(["Qwen2_5_VLConverter", "resplit", "--help"]) == 0  # help wherever it stands
    assert "--cfg.target_parallel_config.tp_size" in capsys.readouterr().out
