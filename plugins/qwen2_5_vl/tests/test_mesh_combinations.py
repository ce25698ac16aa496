"""Meshes that combine model-parallel dimensions, against the same run in one process.

One torchrun launch of 4 ranks (``test_distributed``'s harness) runs tensor x context parallel
(sequence parallel on, so each context-parallel slice is split again over tp), tensor parallel
inside pipeline stages (1F1B), context parallel inside pipeline stages (each stage carries its cp
slice), and a checkpoint of one mesh resumed on others.
With dp_shard = 1 every rank reads the whole global batch, so each run takes the 1-process
run's 4 micro-batches per step. The data hold images, a video and text-only samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_distributed import (  # noqa: F401  (cached_tokenizer: the module's autouse fixture)
    RECORDS,
    args,
    assert_rows_close,
    cached_tokenizer,
    metrics,
    quiet,
    torchrun_jobs,
    weights,
)

from mmzoo.config import load_config
from mmzoo.train.loop import train

RUN = ["--train.loss_reduction", "per_token", "--train.steps", "2", "--train.grad_accum", "4"]
SAVE = ["--train.save_every", "1"]
MESHES = {
    "tp2_cp2": ["--parallel.tp", "2", "--parallel.cp", "2"],
    "pp2_tp2": ["--parallel.pp", "2", "--parallel.tp", "2"],
    "pp2_cp2": ["--parallel.pp", "2", "--parallel.cp", "2"],
}
RESUMED = {"resumed": "pp2_tp2", "resumed_pp2_cp2": "pp2_cp2"}  # from the tp x cp run's step 1


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mesh_combinations")
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return root


def run_args(work: Path, name: str, *extra: str) -> list[str]:
    return args(work / "data.jsonl", work / name, *RUN, *extra)


@pytest.fixture(scope="module")
def four_ranks(work) -> list[dict]:
    jobs: list[dict] = [
        {"name": name, "args": run_args(work, name, *mesh, *(SAVE if name == "tp2_cp2" else []))}
        for name, mesh in MESHES.items()
    ]
    # The tp x cp run's step-1 checkpoint goes on as pipeline stages with tensor or context parallel.
    for name, mesh in RESUMED.items():
        jobs += [
            {"cut": [str(work / "tp2_cp2"), 1, str(work / name)]},
            {"name": name, "args": run_args(work, name, *MESHES[mesh]), "resume": True},
        ]
    return torchrun_jobs(4, jobs, work / "results_4", timeout=900)


@pytest.fixture(scope="module")
def one_process(work) -> Path:
    train(load_config(None, run_args(work, "one", *SAVE)), out=quiet)
    return work / "one"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MESHES))
def test_combined_meshes_equal_one_process(four_ranks, one_process, work, name):
    """Loss and gradient norm of both steps, and the weights after them."""
    assert_rows_close(metrics(work / name), metrics(one_process))
    if name == "tp2_cp2":
        got, expected = weights(work / name / "iter_0000002"), weights(one_process / "iter_0000002")
        assert got.keys() == expected.keys()
        assert max((got[k] - expected[k]).abs().max() for k in got) < 2e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RESUMED))
def test_a_tp_x_cp_checkpoint_resumes_as_pipeline_stages(four_ranks, one_process, work, name):
    assert_rows_close(metrics(work / name), metrics(one_process))
    torch.testing.assert_close(
        four_ranks[0][name]["losses"], [metrics(one_process)[1]["loss"]], rtol=1e-6, atol=0
    )
