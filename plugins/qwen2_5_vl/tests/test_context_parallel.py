"""Ulysses context parallel (``parallel.cp``) against one process.

Unit level (this file run by torchrun on 2 ranks, ``--unit``): the all-to-all attention equals
plain attention over the whole packed sequences (GQA with KV heads that do and do not divide
``cp``, causal and not), and the tiny Qwen2.5-VL's summed per-rank losses and gradients equal the
whole model's for the three reductions; the naive layouts (local ``cu_seqlens``, labels shifted
per rank) give other values. Training level (the harness of ``test_distributed.py``): ``mmzoo
train`` with cp=2 on 2 ranks (fp32, and bf16 with the attention core recomputed), cp=4 (KV heads
repeated) and dp_shard=2 x cp=2 on 4 ranks equals the 1-process run with the same global batch
(packed rows with images and a video: loss and gradient norm per step, the weights after 2
steps); DCP checkpoints resume across meshes (cp=2 -> 1 process, dp_shard=2 -> cp=2);
``train.save_hf`` exports a cp run; InternVL3 with cp=2 equals its 1-process run.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_distributed import (
    args,
    assert_rows_close,
    cached_tokenizer,
    cut_at,
    metrics,
    quiet,
    torchrun_jobs,
    weights,
)

import mmzoo
import mmzoo_kernels
from mmzoo.config import ParallelConfig, load_config
from mmzoo.distributed.context_parallel import ContextParallel, apply_context_parallel
from mmzoo.distributed.mesh import MeshShape, check_text_decoder, mesh_shape
from mmzoo.errors import MmzooError
from mmzoo.loss import LossReduction, loss_targets, weighted_cross_entropy
from mmzoo.testing import free_port, spread_weights_
from mmzoo.train.loop import train

__all__ = ["cached_tokenizer"]  # the module fixture that loads the tokenizer once

HERE = Path(__file__).resolve()
CU_SEQLENS = [0, 7, 15, 23]  # 23 tokens: cp=2 pads one, as a sequence of its own


# --- unit level: 2 ranks (this file run by torchrun with --unit) --------------------------------


def _attention_checks(cp: ContextParallel) -> dict[str, float]:
    """Max differences of the all-to-all attention (output, then q/k/v gradients) from plain
    attention, per case; ``naive_*``: local ``cu_seqlens`` and no all-to-all."""
    found: dict[str, float] = {}
    cu = torch.tensor([0, 5, 12, 16], dtype=torch.int32)
    local = slice(cp.rank * 8, cp.rank * 8 + 8)
    for heads, kv_heads, causal in ((4, 2, True), (4, 1, True), (4, 4, False)):
        torch.manual_seed(heads * 10 + kv_heads)  # the same inputs on both ranks
        q, k, v = (torch.randn(16, h, 8, requires_grad=True) for h in (heads, kv_heads, kv_heads))
        grad = torch.randn(16, heads, 8)
        whole = mmzoo_kernels.attention(q, k, v, cu, causal)
        expected = torch.autograd.grad(whole, (q, k, v), grad)
        whole = whole.detach()
        parts = [x.detach()[local].requires_grad_() for x in (q, k, v)]
        out = cp.attention(*parts, cu, causal)
        got = torch.autograd.grad(out, parts, grad[local])
        out = out.detach()
        name = f"{heads}q_{kv_heads}kv_{'causal' if causal else 'full'}"
        found[name] = max(
            float((out - whole[local]).abs().max()),
            *(float((g - e[local]).abs().max()) for g, e in zip(got, expected, strict=True)),
        )
        own = (cu.clamp(local.start, local.stop) - local.start).unique().int()  # local sequences
        naive = mmzoo_kernels.attention(*(x.detach() for x in parts), own, causal)
        found[f"naive_{name}"] = float((naive - whole[local]).abs().max())
    return found


def _packed_batch() -> dict[str, torch.Tensor]:
    """One packed text row of three samples for the tiny Qwen2.5-VL, answers in each."""
    generator = torch.Generator().manual_seed(0)
    tokens = CU_SEQLENS[-1]
    input_ids = torch.randint(0, 1000, (1, tokens), generator=generator)
    labels = input_ids.clone()
    labels[0, [0, 1, 2, 7, 8, 15, 16, 17, 18]] = -100  # prompts
    positions = torch.cat([torch.arange(b - a) for a, b in zip(CU_SEQLENS, CU_SEQLENS[1:], strict=False)])
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": positions.expand(3, 1, tokens),
        "cu_seqlens": torch.tensor(CU_SEQLENS, dtype=torch.int32),
    }


def _model_checks(cp: ContextParallel) -> dict[str, float]:
    """Relative differences of the summed per-rank loss and gradients from the whole model's, per
    reduction; ``naive_*``: targets shifted within each rank's slice."""
    whole = spread_weights_(mmzoo.build_model("qwen2_5_vl", "tiny"), std=0.05)
    sliced = copy.deepcopy(whole)
    apply_context_parallel(sliced, cp.group)
    batch, found = _packed_batch(), {}
    reductions = {
        "default": LossReduction("default", micro_batches=2),
        "per_sample": LossReduction("per_sample", total_samples=5),
        "per_token": LossReduction("per_token", total_tokens=20),
    }
    for kind, reduction in reductions.items():
        losses = []
        for model in (whole, sliced):
            model.zero_grad()
            loss = model(**batch, loss_reduction=reduction, return_logits=False).loss
            loss.backward()
            losses.append(loss.detach())
        dist.all_reduce(losses[1], group=cp.group)
        found[f"{kind}_loss"] = float((losses[1] - losses[0]).abs() / losses[0].abs())
        worst = 0.0
        for p, q in zip(whole.parameters(), sliced.parameters(), strict=True):
            if p.grad is None:  # the vision encoder (no media here)
                assert q.grad is None
                continue
            dist.all_reduce(q.grad, group=cp.group)
            worst = max(worst, float((q.grad - p.grad).norm() / p.grad.norm().clamp(min=1e-12)))
        found[f"{kind}_grad"] = worst
        found[f"naive_{kind}_loss"] = _naive_loss(sliced, cp, batch, reduction, losses[0])
    return found


def _naive_loss(model, cp: ContextParallel, batch, reduction: LossReduction, expected) -> float:
    """The relative error of the loss when each rank shifts its own slice of the labels."""
    tokens = CU_SEQLENS[-1]
    cu = torch.tensor([*CU_SEQLENS, tokens + 1], dtype=torch.int32)  # with the padding's sequence
    embeds = torch.nn.functional.pad(model.text_decoder.embed(batch["input_ids"])[0], (0, 0, 0, 1))
    labels = torch.nn.functional.pad(batch["labels"][0], (0, 1), value=-100)
    positions = torch.nn.functional.pad(batch["position_ids"][:, 0], (0, 1))
    local = slice(cp.rank * 12, cp.rank * 12 + 12)
    own = (cu.clamp(local.start, local.stop) - local.start).unique().int()
    with torch.no_grad():
        hidden = model.text_decoder(embeds[local], positions[:, local], cu)
        target, weight = loss_targets(labels[local], own, reduction)
        loss = weighted_cross_entropy(hidden, model.text_decoder.output_weight, target, weight)
    dist.all_reduce(loss, group=cp.group)
    return float((loss - expected).abs() / expected.abs())


def unit_checks(out: Path) -> None:
    """Every unit check on this rank; rank 0 writes each number's maximum over the ranks to ``out``."""
    dist.init_process_group("gloo")
    try:
        cp = ContextParallel(dist.group.WORLD)
        found = {**_attention_checks(cp), **_model_checks(cp)}
        worst = torch.tensor(list(found.values()))
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if cp.rank == 0:
            out.write_text(json.dumps(dict(zip(found, worst.tolist(), strict=True))))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_to_all_attention_and_the_sliced_loss_equal_the_whole_model(tmp_path):
    from launch import torchrun

    done = torchrun(2, "--unit", str(tmp_path / "unit.json"), script=HERE, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads((tmp_path / "unit.json").read_text())
    for name, value in found.items():
        if name.startswith("naive_"):
            assert value > 1e-2, name  # the naive layout must be wrong
        else:
            assert value < (1e-5 if name.endswith("_loss") or "q_" in name else 1e-4), (name, value)
    assert sum(not name.startswith("naive_") for name in found) == 3 + 6


def test_slices_of_one_rank_group_cover_the_padded_tokens():
    """``shard`` on a gloo group of 1, viewed as rank r of 3: the slices tile the tokens padded to
    a multiple of 3, the padding is a sequence of its own with no targets, the rest is unchanged."""
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        cp = ContextParallel(dist.group.WORLD)
        batch = _packed_batch()
        embeds = torch.randn(23, 8)
        cu = batch["cu_seqlens"]
        target, weight = loss_targets(batch["labels"][0], cu)
        whole = cp.shard(embeds, batch["position_ids"][:, 0], cu, target, weight)
        assert torch.equal(whole.embeds, embeds) and torch.equal(whole.cu_seqlens, cu)  # cp = 1
        cp.size = 3
        parts = []
        for rank in range(3):
            cp.rank = rank
            parts.append(cp.shard(embeds, batch["position_ids"][:, 0], cu, target, weight))
    finally:
        dist.destroy_process_group()
    assert [len(p.embeds) for p in parts] == [8, 8, 8]
    assert all(torch.equal(p.cu_seqlens, torch.tensor([*CU_SEQLENS, 24], dtype=torch.int32)) for p in parts)
    assert torch.equal(torch.cat([p.embeds for p in parts])[:23], embeds)
    assert torch.equal(torch.cat([p.target for p in parts]), torch.cat([target, torch.tensor([-100])]))
    assert torch.equal(torch.cat([p.weight for p in parts])[:23], weight) and parts[2].weight[-1] == 0
    positions = torch.cat([p.position_ids for p in parts], dim=1)
    assert positions.shape == (3, 24) and torch.equal(positions[:, :23], batch["position_ids"][:, 0])


def test_context_parallel_refuses_a_model_with_a_loss_of_its_own():
    model = mmzoo.build_model("qwen2_5_vl", "tiny")
    model.loss_fn = lambda *a: torch.zeros(())
    with pytest.raises(MmzooError, match="parallel.cp: model 'qwen2_5_vl' has a loss of its own"):
        apply_context_parallel(model, None)  # type: ignore[arg-type]


def test_context_parallel_refuses_a_decoder_without_self_attention():
    model = mmzoo.build_model("qwen2_5_vl", "tiny")
    model.text_decoder.decoder = torch.nn.Identity()  # e.g. another backend's blocks
    with pytest.raises(MmzooError, match="parallel.cp: the text decoder of 'qwen2_5_vl' has no mmzoo"):
        apply_context_parallel(model, None)  # type: ignore[arg-type]


# --- training level: mmzoo train with cp against one process ------------------------------------

PER_TOKEN = ["--train.loss_reduction", "per_token", "--train.steps", "2"]  # 4 micro-batches, then 1
PER_SAMPLE = ["--train.loss_reduction", "per_sample", "--train.steps", "2"]  # 2 micro-batches, then 2
DEFAULT = ["--train.loss_reduction", "default", "--train.steps", "2", "--train.precision", "bf16"]
SELECTIVE = ["--model.recompute_text.granularity", "selective"]
# (options of the cp run, options of the 1-process run with the same global batch); every run
# saves each step, so that the resume tests can start from step 1.
PARITY = {
    "cp2_per_token": ([*PER_TOKEN, "--parallel.cp", "2", "--train.grad_accum", "4"], "per_token"),
    "cp2_per_sample": ([*PER_SAMPLE, "--parallel.cp", "2", "--train.grad_accum", "2"], "per_sample"),
    # 2 data-parallel replicas of 2 cp ranks: half the micro-batches per rank.
    "dp2_cp2_per_token": (
        [*PER_TOKEN, "--parallel.dp_shard", "2", "--parallel.cp", "2", "--train.grad_accum", "2"],
        "per_token",
    ),
    # bf16 autocast (bf16 all-to-alls) and the attention core recomputed in backward.
    "cp2_default_bf16": ([*DEFAULT, *SELECTIVE, "--parallel.cp", "2", "--train.grad_accum", "2"], "default"),
    # 2 KV heads over cp=4: each is repeated twice.
    "cp4_per_token": ([*PER_TOKEN, "--parallel.cp", "4", "--train.grad_accum", "4"], "per_token"),
}
ONE_PROCESS = {
    "per_token": [*PER_TOKEN, "--train.grad_accum", "4"],
    "default": [*DEFAULT, "--train.grad_accum", "2"],
    "per_sample": [*PER_SAMPLE, "--train.grad_accum", "2"],
}
EVERY_STEP = ["--train.save_every", "1"]
INTERNVL3 = [
    "--model.name", "internvl3",
    "--data.data", "demo",
    "--data.max_samples", "4",
    "--data.media", "{max_tiles: 1}",
    "--train.steps", "2",
    "--train.tensorboard", "false",
    "--train.lr", "1e-3",
    "--train.warmup", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The data file of ``test_distributed.py``: 9 records with images and a video, packed rows."""
    from test_distributed import RECORDS

    root = tmp_path_factory.mktemp("context_parallel")
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return root


def _job(work: Path, name: str, *options: str, resume: bool = False) -> dict:
    return {"name": name, "args": args(work / "data.jsonl", work / "cp" / name, *options), "resume": resume}


@pytest.fixture(scope="module")
def cp_runs(work) -> Path:
    """The cp runs in two launches (2 and 4 ranks); returns their parent directory.

    Also resumed on 2 ranks with cp=2: step 1 of a dp_shard=2 run (``dp2_to_cp2``). InternVL3 runs
    with cp=2 (its own output directory)."""
    runs = work / "cp"
    two = [
        _job(work, "cp2_per_token", *PARITY["cp2_per_token"][0], *EVERY_STEP),
        _job(work, "cp2_default_bf16", *PARITY["cp2_default_bf16"][0]),
        _job(work, "cp2_per_sample", *PARITY["cp2_per_sample"][0], "--train.save_hf", str(runs / "hf")),
        _job(work, "dp2_per_token", *PER_TOKEN, "--train.grad_accum", "2", *EVERY_STEP),
        {"cut": [str(runs / "dp2_per_token"), 1, str(runs / "dp2_to_cp2")]},
        _job(work, "dp2_to_cp2", *PARITY["cp2_per_token"][0], resume=True),
        {
            "name": "internvl3",
            "args": [*INTERNVL3, "--parallel.cp", "2", "--train.output_dir", str(runs / "ivl")],
        },
    ]
    torchrun_jobs(2, two, work / "results_2", timeout=600)
    four = [_job(work, name, *PARITY[name][0]) for name in ("dp2_cp2_per_token", "cp4_per_token")]
    torchrun_jobs(4, four, work / "results_4", timeout=600)
    return runs


@pytest.fixture(scope="module")
def one_process(work) -> Path:
    """The 1-process runs (and InternVL3's) the cp runs are compared with; their parent directory."""
    runs = work / "one"
    for name, options in ONE_PROCESS.items():
        train(load_config(None, args(work / "data.jsonl", runs / name, *options, *EVERY_STEP)), out=quiet)
    train(load_config(None, [*INTERNVL3, "--train.output_dir", str(runs / "ivl")]), out=quiet)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PARITY))
def test_cp_runs_equal_one_process_with_the_same_global_batch(cp_runs, one_process, name):
    """Loss and gradient norm per step, and the weights the two updates made."""
    got, expected = metrics(cp_runs / name), metrics(one_process / PARITY[name][1])
    assert len(got) == len(expected) == 2
    bf16 = "bf16" in PARITY[name][0]
    assert_rows_close(got, expected, bf16=bf16)
    if bf16:
        return  # weights that differ in their last bits round to other bf16 values (test_distributed.py)
    trained, single = weights(cp_runs / name), weights(one_process / PARITY[name][1])
    torch.manual_seed(42)  # train.seed: the weights both runs started from
    initial = mmzoo.build_model("qwen2_5_vl", "tiny").state_dict()
    assert trained.keys() == single.keys() == initial.keys()
    # Adam moves a weight by up to lr per step whatever its gradient (test_distributed.py).
    assert max((trained[k] - single[k]).abs().max() for k in single) < 2e-4
    assert max((single[k] - initial[k]).abs().max() for k in single) > 1e-3  # two steps of lr <= 1e-3


@pytest.mark.slow
def test_internvl3_trains_with_cp(cp_runs, one_process):
    assert_rows_close(metrics(cp_runs / "ivl"), metrics(one_process / "ivl"))


@pytest.mark.slow
def test_a_cp_checkpoint_resumes_in_one_process(cp_runs, work, tmp_path):
    straight = cp_runs / "cp2_per_token"
    copy = cut_at(straight, 1, tmp_path / "run")
    options = args(work / "data.jsonl", copy, *ONE_PROCESS["per_token"])
    assert train(load_config(None, options), resume=True, out=quiet).steps == 1
    assert_rows_close(metrics(copy), metrics(straight))


@pytest.mark.slow
def test_a_data_parallel_checkpoint_resumes_with_cp(cp_runs):
    """Step 1 of a dp_shard=2 run, resumed on cp=2: step 2 as the straight run took it."""
    assert_rows_close(metrics(cp_runs / "dp2_to_cp2"), metrics(cp_runs / "dp2_per_token"))


@pytest.mark.slow
def test_save_hf_exports_a_cp_run(cp_runs):
    exported, trained = weights(cp_runs / "hf"), weights(cp_runs / "cp2_per_sample")
    assert exported.keys() == trained.keys()
    for name in exported:
        assert torch.equal(exported[name], trained[name]), name


@pytest.mark.parametrize(
    ("check", "message"),
    [
        (
            lambda decoder: check_text_decoder(MeshShape(cp=3), decoder),
            "parallel: 4 attention heads are not divisible by parallel.tp x parallel.cp=3",
        ),
        (
            lambda decoder: check_text_decoder(MeshShape(tp=2, cp=4), decoder),
            "parallel: 4 attention heads are not divisible by parallel.tp x parallel.cp=8",
        ),
        (lambda decoder: mesh_shape(ParallelConfig(cp=0), 1), "parallel.cp=0: give a size of at least 1"),
        (lambda decoder: mesh_shape(ParallelConfig(cp=2), 3), "needs 2 ranks, the run has 3"),
    ],
)
def test_invalid_cp_layouts_fail_in_one_line(check, message):
    decoder = mmzoo.build_model("qwen2_5_vl", "tiny").text_decoder.config
    with pytest.raises(MmzooError, match=message) as failure:
        check(decoder)
    assert "\n" not in str(failure.value)


def test_a_cp_model_computes_the_loss_only():
    """Logits would be this rank's slice only: the forward refuses to give them."""
    model = mmzoo.build_model("qwen2_5_vl", "tiny")
    model.context_parallel = object()  # type: ignore[assignment]
    batch = _packed_batch()
    with pytest.raises(MmzooError, match="context parallel .* computes the training loss only"):
        model(**batch)


if __name__ == "__main__":
    unit_checks(Path(sys.argv[2]))  # --unit OUT
