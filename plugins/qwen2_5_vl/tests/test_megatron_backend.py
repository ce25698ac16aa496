"""``model.text_backend: megatron``: the LLM built from megatron-core's blocks equals the native one.

Needs ``mmzoo[megatron]`` (megatron-core 0.16.1); without it only the error tests run. On CPU, in one process:
logits, loss and gradients on the same weights (images, packed rows, M-RoPE and 1-D rotary),
parameter names, and a short training run. Its tensor parallel on 2 and 4 ranks:
test_megatron_parallel.py.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import sys

import pytest
import torch
from launch import SMALL
from tiny_hf import IMAGE, make_sample

import mmzoo
from mmzoo.build import use_text_backend
from mmzoo.config import load_config
from mmzoo.data.collate import Sample, collate_packed
from mmzoo.distributed.mesh import MeshShape
from mmzoo.errors import MmzooError
from mmzoo.loss import IGNORE_INDEX
from mmzoo.nn import TextDecoder, megatron_decoder
from mmzoo.registry import get_model
from mmzoo.testing import assert_parity, spread_weights_
from mmzoo.train.loop import train

TOL = dict(atol=1e-5, rtol=1e-4)
needs_megatron = pytest.mark.skipif(
    importlib.util.find_spec("megatron") is None,
    reason="megatron-core is not installed (pip install mmzoo[megatron])",
)


@pytest.fixture
def one_process_state():
    """Leave no process group or Megatron model-parallel state behind for other tests."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    existed = dist.is_initialized()
    yield
    if not existed:
        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def causal_across_samples(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """The wrong mask for a packed row: causal over the whole row, samples see earlier samples."""
    return torch.ones(1, 1, tokens, tokens, dtype=torch.bool, device=cu_seqlens.device).triu(1)


def packed_images(model) -> dict:
    """One packed row of two samples with images (each with its own M-RoPE positions)."""
    samples = []
    for seed, grids in ((0, [(1, 8, 12)]), (5, [(1, 4, 4), (1, 6, 4)])):
        batch = make_sample(images=grids, seed=seed)
        ids = batch.pop("input_ids")
        positions = model.compute_position_ids(model.config, ids, media=batch)[:, 0]  # (3, L)
        labels = ids[0].masked_fill(ids[0] == IMAGE, IGNORE_INDEX)
        samples.append(Sample(input_ids=ids[0], labels=labels, position_ids=positions, media=batch))
    return collate_packed(samples)


def run(model, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Logits, loss and the gradient of every parameter."""
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


@needs_megatron
@pytest.mark.usefixtures("one_process_state")
def test_logits_loss_and_gradients_match_the_native_decoder(pair, monkeypatch):
    native = copy.deepcopy(pair.ours).train()
    megatron = use_text_backend(copy.deepcopy(pair.ours), "megatron").train()
    assert isinstance(megatron.text_decoder, megatron_decoder.MegatronTextDecoder)
    batch = packed_images(native)
    assert len(batch["cu_seqlens"]) == 3 and batch["media"]["image_grid_thw"].shape[0] == 3

    logits, loss, grads = run(native, batch)
    got_logits, got_loss, got_grads = run(megatron, batch)
    controls = {}
    with monkeypatch.context() as m:
        m.setattr(megatron_decoder, "packed_causal_mask", causal_across_samples)
        controls["samples attend across the row"] = run(megatron, batch)[0]
    with monkeypatch.context() as m:  # every band from the time row: 1-D rotary on image tokens
        m.setattr(megatron.text_decoder.rotary, "mrope_section", [megatron.text_decoder.config.head_dim // 2])
        controls["M-RoPE as 1-D rotary"] = run(megatron, batch)[0]
    assert_parity(got_logits, logits, controls=controls, **TOL)
    torch.testing.assert_close(got_loss, loss, **TOL)
    assert got_grads.keys() == grads.keys() and len(grads) > 40
    for name, grad in grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def decoder_config(tied: bool):
    """InternVL3's tiny LLM (1-D rotary) with a small vocabulary."""
    text = get_model("internvl3").variant("tiny").text
    assert text.mrope_section is None
    return dataclasses.replace(text, vocab_size=256, tie_word_embeddings=tied)


@needs_megatron
@pytest.mark.usefixtures("one_process_state")
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_one_dimensional_rotary_on_packed_rows(tied, monkeypatch):
    torch.manual_seed(0)
    native = spread_weights_(TextDecoder(decoder_config(tied))).eval()
    megatron = megatron_decoder.MegatronTextDecoder(native.config).eval()
    names = {k: tuple(v.shape) for k, v in native.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in megatron.state_dict().items()} == names
    assert ("output_layer.weight" in names) is not tied
    megatron.load_state_dict(native.state_dict(), strict=True)

    lengths = [5, 12, 9]
    cu_seqlens = torch.tensor([0, 5, 17, 26], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, T): restarting per sample
    embeds = native.embed(torch.randint(0, 256, (sum(lengths),)))
    with torch.no_grad():
        expected = native.logits(native(embeds, positions, cu_seqlens))
        got = megatron.logits(megatron(embeds, positions, cu_seqlens))
        with monkeypatch.context() as m:
            m.setattr(megatron_decoder, "packed_causal_mask", causal_across_samples)
            across = megatron.logits(megatron(embeds, positions, cu_seqlens))
        no_rotary = megatron.logits(megatron(embeds, torch.zeros_like(positions), cu_seqlens))
    controls = {"samples attend across the row": across, "no rotary (every position 0)": no_rotary}
    assert_parity(got, expected, controls=controls, **TOL)


@needs_megatron
@pytest.mark.usefixtures("one_process_state")
def test_state_dict_names_are_the_native_ones(pair):
    native = pair.ours.state_dict()
    megatron = use_text_backend(copy.deepcopy(pair.ours), "megatron").state_dict()
    assert sorted(megatron) == sorted(native)  # Megatron registers linear_proj before linear_qkv
    assert all(torch.equal(megatron[k], native[k]) for k in native)


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@needs_megatron
@pytest.mark.usefixtures("one_process_state")
def test_two_training_steps_match_the_native_backend(tmp_path):
    runs = {}
    for backend in ("native", "megatron"):
        output = tmp_path / backend
        options = [*SMALL, "--train.steps", "2", "--train.lr", "1e-3", "--train.output_dir", str(output)]
        config = load_config(None, [*options, "--model.text_backend", backend])
        result = train(config, out=lambda line: None)
        runs[backend] = metrics(output), dict(mmzoo.load_model(result.checkpoint).state_dict())
    (rows, weights), (native_rows, native_weights) = runs["megatron"], runs["native"]
    assert [r["step"] for r in rows] == [1, 2]
    for row, expected in zip(rows, native_rows, strict=True):
        assert row["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert row["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)
    assert weights.keys() == native_weights.keys()
    for name, tensor in native_weights.items():
        torch.testing.assert_close(weights[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    assert rows[0]["loss"] != rows[1]["loss"]  # the first step moved the weights


def test_without_megatron_core_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron", None)  # import megatron fails
    with pytest.raises(MmzooError, match=r"pip install mmzoo\[megatron\]"):
        use_text_backend(mmzoo.build_model("qwen2_5_vl", "tiny"), "megatron")


@pytest.mark.parametrize(
    "options, shape, error",
    [
        ([], MeshShape(cp=2), r"parallel.cp=2 is not supported with model.text_backend=megatron"),
        ([], MeshShape(tp=2), r"sequence_parallel is not supported .* set parallel.sequence_parallel false"),
        (["--model.recompute_text.granularity", "full"], MeshShape(), "recompute_text is not supported"),
        (["--train.precision", "bf16"], MeshShape(), "train.precision=bf16 .* needs CUDA"),
    ],
    ids=["cp", "sequence parallel", "recompute", "bf16 on cpu"],
)
def test_unsupported_settings_are_refused(options, shape, error):
    from mmzoo.train.loop import _check_text_backend

    config = load_config(None, ["--model.text_backend", "megatron", *options])
    with pytest.raises(MmzooError, match=error):
        _check_text_backend(config, shape, torch.device("cpu"))
    _check_text_backend(load_config(None, options), shape, torch.device("cpu"))  # native: any
    no_sp = load_config(None, ["--model.text_backend", "megatron", "--parallel.sequence_parallel", "false"])
    _check_text_backend(no_sp, MeshShape(pp=2, dp_shard=2, tp=2), torch.device("cpu"))
