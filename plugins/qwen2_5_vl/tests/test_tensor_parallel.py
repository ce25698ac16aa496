"""Tensor parallel (``parallel.tp``) in ``mmzoo train`` against the same run in one process.

The multi-rank runs use the harness of ``test_distributed.py`` (one torchrun launch runs several
jobs; this file is the script torchrun starts, see the end). The data hold images, a video and
text-only samples. Checked: loss and gradient norm per step of tp=2 on 2 ranks (with and without
sequence parallel; with an untied output layer; with bf16, frozen towers and recompute) and of a
2x2 mesh (dp_shard=2 x tp=2) on 4 ranks equal one process, and so do the weights after 2 steps; a
plain row split of ``linear_fc1`` ``[gate; up]`` (rank 0 all of the gate) does not; DCP
checkpoints move between tp=2 and tp=1 (one process, or FSDP on 2 ranks) with the same next step;
``train.save_hf`` exports the trained weights; loading an HF directory or an mm checkpoint fills
each rank's shards; InternVL3 trains at tp=2. Fast tests: the vocabulary-parallel cross-entropy
against the plain one (values and gradients, 2 processes), the row order the model holds
``linear_fc1`` in, and one-line errors for layouts tensor parallel cannot split.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_distributed import (  # noqa: F401  (cached_tokenizer: the module's autouse fixture)
    FROZEN,
    RECOMPUTE,
    RECORDS,
    args,
    assert_rows_close,
    cached_tokenizer,
    cut_at,
    metrics,
    quiet,
    run_jobs_patching,
    torchrun_jobs,
    weights,
)

import mmzoo
from mmzoo.config import load_config
from mmzoo.errors import MmzooError
from mmzoo.nn import DecoderConfig, RMSNorm, TextDecoder
from mmzoo.train.loop import train

HERE = Path(__file__).resolve()
TP = ["--parallel.tp", "2"]
NO_SP = ["--parallel.sequence_parallel", "false"]
# per_token over 3 steps of 2 micro-batches, checkpoints after steps 2 and 3.
RUN = ["--train.loss_reduction", "per_token", "--train.steps", "3", "--train.save_every", "2"]
CUT = 2
LOAD = ["--train.steps", "1", "--train.lr", "0", "--train.grad_accum", "2"]
# bf16 autocast, frozen vision tower and projector, full recompute of both towers.
BF16 = [
    "--train.loss_reduction", "default",
    "--train.steps", "2",
    "--train.grad_accum", "2",
    "--train.precision", "bf16",
    *FROZEN,
    *RECOMPUTE,
]  # fmt: skip
# An output layer of its own (the tiny variant ties it to the embedding), split like the embedding.
UNTIED = [
    *RUN,
    "--train.steps",
    "2",
    "--train.grad_accum",
    "2",
    "--model.overrides",
    "{text: {tie_word_embeddings: false}}",
]
INTERNVL3 = [
    "--model.name", "internvl3",
    "--data.max_samples", "4",
    "--data.media", "{max_tiles: 2}",
    "--train.steps", "2",
    "--train.grad_accum", "2",
    "--train.tensorboard", "false",
    # As the other runs: at 1e-2, Adam turns summation-order noise in near-zero gradients into
    # steps of 1e-2 (step 2's loss then differs by 1e-6 with one thread per process).
    "--train.lr", "1e-3",
    "--parallel.timeout_s", "60",
]  # fmt: skip


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return make_work(tmp_path_factory.mktemp("tensor_parallel"))


def make_work(root: Path) -> Path:
    """``root`` with the data file, and a random tiny model as an HF directory and as an mm
    checkpoint (tp 2)."""
    from mmzoo.checkpoint.hf_export import save_hf
    from mmzoo.cli import main
    from mmzoo.testing import spread_weights_

    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    torch.manual_seed(3)
    save_hf(spread_weights_(mmzoo.build_model("qwen2_5_vl", "tiny"), std=0.05), root / "hf")
    assert (
        main(["convert", "hf-to-mm", "--hf-dir", str(root / "hf"), "--mm-dir", str(root / "mm"), "--tp", "2"])
        == 0
    )
    return root


def run_args(work: Path, name: str, *extra: str) -> list[str]:
    return args(work / "data.jsonl", work / name, *extra)


@pytest.fixture(scope="module")
def two_ranks(work) -> list[dict]:
    """Every 2-rank job, in one launch."""
    grad_accum = ["--train.grad_accum", "2"]  # dp 1 at tp 2: the 1-process run's global batch
    jobs = [
        {
            "name": "sp",
            "args": run_args(work, "sp", *RUN, *grad_accum, *TP, "--train.save_hf", str(work / "sp_hf")),
        },
        {"name": "no_sp", "args": run_args(work, "no_sp", *RUN, *grad_accum, *TP, *NO_SP)},
        {"name": "naive", "args": run_args(work, "naive", *LOAD, *TP, "--model.load", str(work / "hf"))},
        # tp 2 -> FSDP over 2 ranks (tp 1), and FSDP over 2 ranks -> tp 2, from step 2.
        {"cut": [str(work / "sp"), CUT, str(work / "sp_to_dp")]},
        {"name": "sp_to_dp", "args": run_args(work, "sp_to_dp", *RUN), "resume": True},
        {"name": "dp", "args": run_args(work, "dp", *RUN)},
        {"cut": [str(work / "dp"), CUT, str(work / "dp_to_tp")]},
        {"name": "dp_to_tp", "args": run_args(work, "dp_to_tp", *RUN, *grad_accum, *TP), "resume": True},
        {"name": "internvl3", "args": [*INTERNVL3, *TP, "--train.output_dir", str(work / "internvl3")]},
        {"name": "untied", "args": run_args(work, "untied", *UNTIED, *TP)},
        {"name": "bf16", "args": run_args(work, "bf16", *BF16, *TP)},
    ]
    for kind in ("hf", "mm"):
        load = run_args(work, f"load_{kind}", *LOAD, *TP, "--model.load", str(work / kind))
        jobs.append({"name": f"load_{kind}", "args": load})
    return torchrun_jobs(2, jobs, work / "results_2", timeout=900, script=HERE)


@pytest.fixture(scope="module")
def one_process(work) -> dict[str, Path]:
    """The 1-process runs compared with; their output directories by name."""
    runs = {
        "one": run_args(work, "one", *RUN, "--train.grad_accum", "2"),
        "internvl3": [*INTERNVL3, "--train.output_dir", str(work / "one_internvl3")],
        "untied": run_args(work, "one_untied", *UNTIED),
        "bf16": run_args(work, "one_bf16", *BF16),
    }
    for kind in ("hf", "mm"):
        runs[f"load_{kind}"] = run_args(work, f"one_load_{kind}", *LOAD, "--model.load", str(work / kind))
    for options in runs.values():
        train(load_config(None, options), out=quiet)
    return {name: Path(options[options.index("--train.output_dir") + 1]) for name, options in runs.items()}


# --- tp=2 and a 2x2 mesh against one process ------------------------------------------------------


def assert_weights_close(got: Path, expected: Path) -> None:
    """Weights after the same steps: Adam moves a weight by up to lr (1e-3) a step whatever its
    gradient, so where summation order flips a near-zero gradient they differ by a few 1e-5."""
    a, b = weights(got), weights(expected)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max() for k in a) < 2e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sp", "no_sp"])
def test_tp2_equals_one_process(two_ranks, one_process, work, name):
    """Loss and gradient norm per step, and the weights after 2 steps (sequence parallel on, off)."""
    got, expected = metrics(work / name), metrics(one_process["one"])
    assert len(got) == 3
    assert_rows_close(got, expected)
    assert [rank[name]["losses"] for rank in two_ranks] == [[row["loss"] for row in got]] * 2
    assert_weights_close(work / name / f"iter_{CUT:07d}", one_process["one"] / f"iter_{CUT:07d}")


@pytest.mark.slow
def test_tp2_with_an_untied_output_layer_equals_one_process(two_ranks, one_process, work):
    assert_rows_close(metrics(work / "untied"), metrics(one_process["untied"]))
    assert "text_decoder.output_layer.weight" in weights(work / "untied")


@pytest.mark.slow
def test_tp2_with_bf16_frozen_towers_and_recompute_equals_one_process(two_ranks, one_process, work):
    assert_rows_close(metrics(work / "bf16"), metrics(one_process["bf16"]), bf16=True)


@pytest.mark.slow
def test_a_plain_row_split_of_gate_and_up_is_wrong(two_ranks, one_process, work):
    """Negative control: ``linear_fc1`` split as stored (rank 0 all of the gate) fails the
    comparison the right split passes (the weights loaded from the HF directory, first step)."""
    got, expected = metrics(work / "naive"), metrics(work / "load_hf")
    assert_rows_close(expected, metrics(one_process["load_hf"]))
    with pytest.raises(AssertionError, match="loss"):
        assert_rows_close(got, expected)
    assert abs(got[0]["loss"] - expected[0]["loss"]) > 1e-3 * expected[0]["loss"]


@pytest.mark.slow
def test_a_2x2_mesh_equals_one_process(work, one_process):
    """dp_shard=2 x tp=2 on 4 ranks: each replica gets half of the step's micro-batches."""
    options = run_args(work, "mesh", *RUN, "--train.grad_accum", "1", *TP, "--parallel.dp_shard", "2")
    ranks = torchrun_jobs(
        4, [{"name": "mesh", "args": options}], work / "results_4", timeout=900, script=HERE
    )
    assert [rank["mesh"]["steps"] for rank in ranks] == [3] * 4
    assert_rows_close(metrics(work / "mesh"), metrics(one_process["one"]))
    assert_weights_close(work / "mesh" / f"iter_{CUT:07d}", one_process["one"] / f"iter_{CUT:07d}")


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_dcp_checkpoints_resume_across_tp(two_ranks, work):
    """tp=2 -> FSDP on 2 ranks, FSDP on 2 ranks -> tp=2: step 3 as the straight run took it."""
    for straight, resumed in (("sp", "sp_to_dp"), ("dp", "dp_to_tp")):
        assert two_ranks[0][resumed]["steps"] == 1
        assert_rows_close(metrics(work / resumed), metrics(work / straight))


@pytest.mark.slow
def test_a_tp2_checkpoint_resumes_in_one_process(two_ranks, work, tmp_path):
    copy = cut_at(work / "sp", CUT, tmp_path / "run")
    options = args(work / "data.jsonl", copy, *RUN, "--train.grad_accum", "2")
    assert train(load_config(None, options), resume=True, out=quiet).steps == 1
    assert_rows_close(metrics(copy), metrics(work / "sp"))


@pytest.mark.slow
def test_the_dcp_checkpoint_holds_gate_and_up_in_checkpoint_order(two_ranks, one_process, work):
    """The tp=2 checkpoint's ``linear_fc1`` rows are ``[gate; up]``: as one process holds them,
    and unlike the per-rank blocks the tp=2 model holds."""
    from mmzoo.nn.tp_layout import blocked_glu_order

    name = "text_decoder.decoder.layers.0.mlp.linear_fc1.weight"
    got, expected = weights(work / "sp")[name], weights(one_process["one"] / "iter_0000003")[name]
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)
    blocked = expected.index_select(0, blocked_glu_order(expected.shape[0], 2))
    assert (got - blocked).abs().max() > 1e-2


@pytest.mark.slow
def test_save_hf_from_tp2_exports_the_trained_weights(two_ranks, work):
    exported, trained = weights(work / "sp_hf"), weights(work / "sp")
    assert exported.keys() == trained.keys()
    for name in exported:
        assert torch.equal(exported[name], trained[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hf", "mm"])
def test_loading_fills_each_rank_s_tp_shards(two_ranks, one_process, work, kind):
    """From an HF directory and an mm checkpoint split tp 2: the first loss equals the 1-process
    run's, and (lr 0) the saved weights are the checkpoint's, bit for bit."""
    name = f"load_{kind}"
    expected = [row["loss"] for row in metrics(one_process[name])]
    assert two_ranks[0][name]["losses"] == pytest.approx(expected, rel=1e-6)
    saved, source = weights(work / name), weights(work / "hf")
    assert saved.keys() == source.keys()
    for param in saved:
        assert torch.equal(saved[param], source[param]), param


@pytest.mark.slow
def test_internvl3_trains_at_tp2(two_ranks, one_process, work):
    assert_rows_close(metrics(work / "internvl3"), metrics(one_process["internvl3"]))


# --- fast checks ---------------------------------------------------------------------------------


def test_gate_and_up_are_held_in_per_rank_blocks():
    from mmzoo.nn.tp_layout import blocked_glu_order

    canonical = torch.arange(12)  # gate 0..5, up 6..11
    held = canonical[blocked_glu_order(12, 3)]
    assert held.tolist() == [0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]  # [gate_r; up_r] per rank


def _cross_entropy_rank(rank: int, port: int, results: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from mmzoo.loss import vocab_parallel_cross_entropy

    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same inputs on both ranks
        hidden = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
        weight = torch.randn(10, 16, dtype=torch.float64)
        target = torch.tensor([0, 9, 4, 5, 3, 7, 2])  # targets in both halves of the vocabulary
        scale = torch.rand(7, dtype=torch.float64)
        mesh = init_device_mesh("cpu", (2,))
        sharded = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
        losses = vocab_parallel_cross_entropy(hidden, sharded, target)
        (losses * scale).sum().backward()
        torch.save(
            {"losses": losses.detach(), "hidden": hidden.grad, "weight": sharded.grad.full_tensor()},
            Path(results) / f"rank_{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_cross_entropy_equals_the_plain_one(tmp_path):
    """Over a vocabulary split in 2 (2 processes, gloo): per-token losses, and the gradients of the
    hidden states (summed over the shards) and of the weight, as ``F.cross_entropy`` gives them."""
    import torch.multiprocessing as mp

    from mmzoo.testing import free_port

    mp.spawn(_cross_entropy_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    hidden = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 9, 4, 5, 3, 7, 2])
    scale = torch.rand(7, dtype=torch.float64)
    losses = torch.nn.functional.cross_entropy(hidden @ weight.t(), target, reduction="none")
    (losses * scale).sum().backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank_{rank}.pt")
        torch.testing.assert_close(got["losses"], losses.detach())
        torch.testing.assert_close(got["hidden"], hidden.grad)
        torch.testing.assert_close(got["weight"], weight.grad)
    # The gradient of the hidden states needs every shard's part: one shard's alone is far off.
    half = (torch.softmax(hidden @ weight.t(), -1)[:, :5] * scale[:, None]).detach() @ weight[:5].detach()
    assert (half - hidden.grad).abs().max() > 0.1


def _decoder(**sizes) -> TextDecoder:
    config = {"vocab_size": 64, "hidden_size": 32, "ffn_hidden_size": 64, "num_layers": 1}
    return TextDecoder(DecoderConfig(**{**config, "num_heads": 4, "num_kv_heads": 2, **sizes}))


def test_layouts_tensor_parallel_cannot_split_are_one_line_errors():
    from mmzoo.distributed.mesh import MeshShape, check_text_decoder
    from mmzoo.distributed.tensor_parallel import check_tensor_parallel

    check_tensor_parallel(_decoder(), 2)  # fine
    with pytest.raises(MmzooError, match=r"MLP width \(66\) is not divisible by parallel.tp=4") as caught:
        check_tensor_parallel(_decoder(ffn_hidden_size=66), 4)
    assert "\n" not in str(caught.value)
    with_qk_norm = _decoder()
    attention = with_qk_norm.decoder.layers[0].self_attention
    attention.q_layernorm, attention.k_layernorm = RMSNorm(32), RMSNorm(16)
    with pytest.raises(MmzooError, match=r"normalises queries and keys over all heads"):
        check_tensor_parallel(with_qk_norm, 2)
    with pytest.raises(MmzooError, match="splits mmzoo's TextDecoder, not Linear"):
        check_tensor_parallel(torch.nn.Linear(2, 2), 2)
    with pytest.raises(MmzooError, match=r"2 KV heads are not divisible by parallel.tp=4"):
        check_text_decoder(MeshShape(tp=4), _decoder(num_heads=8).config)


def test_tp_without_enough_ranks_fails_before_work(tmp_path):
    with pytest.raises(MmzooError, match=r"tp=2 needs 2 ranks, the run has 1"):
        train(load_config(None, args(tmp_path / "data.jsonl", tmp_path / "out", *TP)), out=quiet)


# --- the multi-rank jobs (this file run by torchrun) ---------------------------------------------


def _naive_fc1(mlp, tp: int) -> None:
    """``linear_fc1`` left as ``[gate; up]``: a plain row split gives rank 0 all of the gate."""


if __name__ == "__main__":
    import mmzoo.distributed.tensor_parallel as tensor_parallel

    run_jobs_patching(Path(sys.argv[1]), "naive", tensor_parallel, "_block_fc1", _naive_fc1)
