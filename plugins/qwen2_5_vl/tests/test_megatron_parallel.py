"""``model.text_backend: megatron`` on many ranks: megatron-core's own column- and row-parallel
layers (and its layers in pipeline stages) in ``mmzoo train`` against the same run in one process
(CPU, gloo).

The multi-rank runs use the harness of ``test_distributed.py`` (one torchrun launch runs several
jobs; this file is the script torchrun starts, see the end). Needs ``mmzoo[megatron]``. Checked:
loss and gradient norm per step of tp=2 on 2 ranks (tied and untied output layer), of pipeline
stages (pp=2 with 1F1B and interleaved) and of 4-rank meshes (dp_shard=2 x tp=2, pp=2 x tp=2)
equal one process, and so do the weights after 2 steps; a
plain row split of ``linear_fc1`` ``[gate; up]`` (rank 0 all of the gate) does not; loading an HF
directory or an mm checkpoint split tp 2 fills each rank's shards exactly; DCP checkpoints move
between the Megatron backend at tp=2 and the native one (tp=2, and FSDP on 2 ranks) with the same
next step; ``train.save_hf`` exports the trained weights.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import (  # noqa: F401  (cached_tokenizer: the module's autouse fixture)
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
from test_tensor_parallel import assert_weights_close, make_work, run_args

from mmzoo.config import load_config
from mmzoo.train.loop import train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("megatron") is None,
        reason="megatron-core is not installed (pip install mmzoo[megatron])",
    ),
]

HERE = Path(__file__).resolve()
TP = ["--parallel.tp", "2"]
MEGATRON = ["--model.text_backend", "megatron", "--parallel.sequence_parallel", "false", *TP]
# per_token over 3 steps of 2 micro-batches (1 rank's share at tp 2), checkpoints after steps 2 and 3.
RUN = ["--train.loss_reduction", "per_token", "--train.steps", "3", "--train.save_every", "2"]
STEPS = [*RUN, "--train.grad_accum", "2"]
CUT = 2
LOAD = ["--train.steps", "1", "--train.lr", "0", "--train.grad_accum", "2"]
UNTIED = [*STEPS, "--train.steps", "2", "--model.overrides", "{text: {tie_word_embeddings: false}}"]
# Pipeline stages of a 4-layer LLM: 1F1B (2 stages), interleaved (4 stages on 2 ranks).
LAYERS = [*STEPS, "--train.steps", "2", "--model.overrides", "{text: {num_layers: 4}}"]
PP = [*LAYERS, *MEGATRON[:-2], "--parallel.pp", "2"]  # the backend without tensor parallel
INTERLEAVED = [*PP, "--parallel.pp_schedule", "interleaved", "--parallel.llm_pp_layers", "[1, 1, 1, 1]"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return make_work(tmp_path_factory.mktemp("megatron_parallel"))


@pytest.fixture(scope="module")
def two_ranks(work) -> list[dict]:
    """Every 2-rank job, in one launch."""
    save_hf = ["--train.save_hf", str(work / "hf_out")]
    jobs = [
        {"name": "tp", "args": run_args(work, "tp", *STEPS, *MEGATRON, *save_hf)},
        {"name": "untied", "args": run_args(work, "untied", *UNTIED, *MEGATRON)},
        {"name": "naive", "args": run_args(work, "naive", *STEPS, "--train.steps", "1", *MEGATRON)},
        # Megatron tp 2 -> native tp 2 (sequence parallel), and native FSDP on 2 ranks -> Megatron tp 2.
        {"cut": [str(work / "tp"), CUT, str(work / "to_native")]},
        {"name": "to_native", "args": run_args(work, "to_native", *STEPS, *TP), "resume": True},
        {"name": "dp", "args": run_args(work, "dp", *RUN)},
        {"name": "pp", "args": run_args(work, "pp", *PP)},
        {"name": "interleaved", "args": run_args(work, "interleaved", *INTERLEAVED)},
        {"cut": [str(work / "dp"), CUT, str(work / "to_megatron")]},
        {"name": "to_megatron", "args": run_args(work, "to_megatron", *STEPS, *MEGATRON), "resume": True},
    ]
    for kind in ("hf", "mm"):
        load = run_args(work, f"load_{kind}", *LOAD, *MEGATRON, "--model.load", str(work / kind))
        jobs.append({"name": f"load_{kind}", "args": load})
    return torchrun_jobs(2, jobs, work / "results_2", timeout=900, script=HERE)


@pytest.fixture(scope="module")
def one_process(work) -> dict[str, Path]:
    """The 1-process runs (native backend) compared with; their output directories by name."""
    runs = {
        "one": run_args(work, "one", *STEPS),
        "untied": run_args(work, "one_untied", *UNTIED),
        "layers": run_args(work, "one_layers", *LAYERS),
        "load_hf": run_args(work, "one_load_hf", *LOAD, "--model.load", str(work / "hf")),
    }
    for options in runs.values():
        train(load_config(None, options), out=quiet)
    return {name: Path(options[options.index("--train.output_dir") + 1]) for name, options in runs.items()}


def test_tp2_equals_one_process(two_ranks, one_process, work):
    got = metrics(work / "tp")
    assert len(got) == 3
    assert_rows_close(got, metrics(one_process["one"]))
    assert [rank["tp"]["losses"] for rank in two_ranks] == [[row["loss"] for row in got]] * 2
    assert_weights_close(work / "tp" / f"iter_{CUT:07d}", one_process["one"] / f"iter_{CUT:07d}")


def test_tp2_with_an_untied_output_layer_equals_one_process(two_ranks, one_process, work):
    assert_rows_close(metrics(work / "untied"), metrics(one_process["untied"]))
    assert "text_decoder.output_layer.weight" in weights(work / "untied")


def test_a_plain_row_split_of_gate_and_up_is_wrong(two_ranks, one_process, work):
    """Negative control: each rank's ``linear_fc1`` rows taken from ``[gate; up]`` as stored (rank 0
    all of the gate) fails the comparison the right shards pass."""
    got, expected = metrics(work / "naive"), metrics(one_process["one"])[:1]
    with pytest.raises(AssertionError, match="loss"):
        assert_rows_close(got, expected)
    assert abs(got[0]["loss"] - expected[0]["loss"]) > 1e-3 * expected[0]["loss"]


@pytest.mark.parametrize("name", ["pp", "interleaved"])
def test_pipeline_stages_equal_one_process(two_ranks, one_process, work, name):
    """Megatron's layers in mmzoo's pipeline stages (1F1B, interleaved)."""
    assert_rows_close(metrics(work / name), metrics(one_process["layers"]))


@pytest.fixture(scope="module")
def four_ranks(work) -> list[dict]:
    """dp_shard=2 x tp=2 (each replica gets half of the step's micro-batches) and pp=2 x tp=2."""
    jobs = [
        {"name": "mesh", "args": run_args(work, "mesh", *RUN, *MEGATRON, "--parallel.dp_shard", "2")},
        {"name": "pp_tp", "args": run_args(work, "pp_tp", *PP, *TP)},
    ]
    return torchrun_jobs(4, jobs, work / "results_4", timeout=900, script=HERE)


def test_a_2x2_mesh_equals_one_process(four_ranks, one_process, work):
    assert [rank["mesh"]["steps"] for rank in four_ranks] == [3] * 4
    assert_rows_close(metrics(work / "mesh"), metrics(one_process["one"]))
    assert_weights_close(work / "mesh" / f"iter_{CUT:07d}", one_process["one"] / f"iter_{CUT:07d}")


def test_pipeline_and_tensor_parallel_equal_one_process(four_ranks, one_process, work):
    assert_rows_close(metrics(work / "pp_tp"), metrics(one_process["layers"]))
    assert_weights_close(work / "pp_tp", one_process["layers"])


@pytest.mark.parametrize("kind", ["hf", "mm"])
def test_loading_fills_each_rank_s_shards(two_ranks, one_process, work, kind):
    """From an HF directory and an mm checkpoint split tp 2: the first loss is the 1-process run's,
    and (lr 0) the saved weights are the checkpoint's, bit for bit."""
    name = f"load_{kind}"
    expected = [row["loss"] for row in metrics(one_process["load_hf"])]
    assert two_ranks[0][name]["losses"] == pytest.approx(expected, rel=1e-6)
    saved, source = weights(work / name), weights(work / "hf")
    assert saved.keys() == source.keys()
    for param in saved:
        assert torch.equal(saved[param], source[param]), param


def test_dcp_checkpoints_move_between_the_backends(two_ranks, work):
    """Megatron tp=2 -> native tp=2, native FSDP on 2 ranks -> Megatron tp=2: step 3 as the
    straight run took it."""
    for straight, resumed in (("tp", "to_native"), ("dp", "to_megatron")):
        assert two_ranks[0][resumed]["steps"] == 1
        assert_rows_close(metrics(work / resumed), metrics(work / straight))


def test_save_hf_exports_the_trained_weights(two_ranks, work):
    exported, trained = weights(work / "hf_out"), weights(work / "tp")
    assert exported.keys() == trained.keys()
    for name in exported:
        assert torch.equal(exported[name], trained[name]), name


# --- the multi-rank jobs (this file run by torchrun) ---------------------------------------------


def _stored_order(rows: int, blocks: int) -> torch.Tensor:
    """Each rank's ``linear_fc1`` rows from ``[gate; up]`` as stored: rank 0 gets all of the gate."""
    return torch.arange(rows)


if __name__ == "__main__":
    import mmzoo.distributed.megatron_parallel as megatron_parallel

    run_jobs_patching(Path(sys.argv[1]), "naive", megatron_parallel, "blocked_glu_order", _stored_order)
