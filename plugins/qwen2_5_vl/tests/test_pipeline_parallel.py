"""Pipeline parallel ``mmzoo train`` (2 stages on 2 CPU ranks, gloo) against the same run in one process.

The data and options are those of ``test_distributed.py`` (9 records with images, a video and
text-only ones, packed into rows of 96 tokens) on the tiny Qwen2.5-VL with 4 LLM layers (tied
embeddings: the last stage holds its own copy of the embedding). One torchrun launch runs every
2-rank job; the 1-process runs they are compared with run in the test process.

Checked: loss and gradient norm per step, and the weights, of 1F1B and interleaved 1F1B (2 stages
per rank, with a frozen vision tower and activation recompute) and of dp 2 x pp 2 on 4 ranks
equal one process with the same global batch, a step with a loss-free filler micro-batch
included; a pp=2 DCP checkpoint resumes in one process and on 2 data-parallel
ranks, and a 2-rank data-parallel one on pp=2, with the same next losses; an mm checkpoint split
like the stages loads with each rank reading only its own tensors; ``--train.save_hf`` exports
from pp; invalid splits fail in one line before any work. Negative control: without summing the
two copies' gradients of the tied embedding the weights drift from the 1-process run.
"""

from __future__ import annotations

import json
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
    run_jobs,
    torchrun_jobs,
    weights,
)

import mmzoo
from mmzoo.config import ParallelConfig, load_config
from mmzoo.errors import MmzooError
from mmzoo.train.loop import train

HERE = Path(__file__).resolve()
LAYERS = ["--model.overrides", "{text: {num_layers: 4}}"]
PP = ["--parallel.pp", "2", "--train.grad_accum", "2", *LAYERS]
INTERLEAVED = [*PP, "--parallel.pp_schedule", "interleaved", "--parallel.llm_pp_layers", "[1, 1, 1, 1]"]
DP = ["--train.grad_accum", "1", *LAYERS]  # 2 data-parallel ranks: the same global batch
ONE = ["--train.grad_accum", "2", *LAYERS]
# 5 micro-batches per epoch, 2 per step: step 3 holds one, and a loss-free filler on pp.
PER_TOKEN = ["--train.loss_reduction", "per_token", "--train.steps", "3", "--train.save_every", "2"]
# The interleaved run also freezes the vision tower and recomputes activations (on each stage).
PER_SAMPLE = [
    "--train.loss_reduction",
    "per_sample",
    "--train.steps",
    "3",
    "--model.freeze",
    "[vision, projector]",
]
RECOMPUTE = ["--model.recompute_text.granularity", "full", "--model.recompute_text.num_layers", "1"]
LOAD = ["--train.steps", "1", "--train.lr", "0"]
FOUR = ["--train.loss_reduction", "per_token", "--train.steps", "2"]  # 4 micro-batches, then 1
CUT = 2
# A negative control: the jobs file asks this script to skip the tied embedding's gradient sum.
UNSUMMED = "unsummed_tied"


def assert_weights_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The same weights up to summation order: Adam moves a weight by up to lr (1e-3) per step
    whatever its gradient's size, so a near-zero gradient's rounding shows as a few 1e-5."""
    assert got.keys() == expected.keys()
    worst = max(float((got[k] - expected[k]).abs().max()) for k in got)
    assert worst < 2e-4, worst


@pytest.fixture(scope="module")
def pp_work(tmp_path_factory) -> Path:
    """The data file, and a random tiny model (4 LLM layers) as an HF directory and as an mm
    checkpoint split like the pipeline's stages (vision and LLM layers 0-1 on stage 0), tp 2."""
    from mmzoo.checkpoint.hf_export import save_hf
    from mmzoo.cli import main
    from mmzoo.testing import spread_weights_

    root = tmp_path_factory.mktemp("pipeline")
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    torch.manual_seed(3)
    model = spread_weights_(mmzoo.build_model("qwen2_5_vl", "tiny", text={"num_layers": 4}), std=0.05)
    save_hf(model, root / "hf")
    convert = ["convert", "hf-to-mm", "--hf-dir", str(root / "hf"), "--mm-dir", str(root / "mm")]
    assert main([*convert, "--tp", "2", "--llm-pp-layers", "2,2", "--vit-pp-layers", "4,0"]) == 0
    return root


@pytest.fixture(scope="module")
def pp_runs(pp_work) -> list[dict]:
    """Every 2-rank job, in one launch; returns each rank's results by job name."""
    data, out = pp_work / "data.jsonl", pp_work / "two"

    def job(name: str, *options: str, resume: bool = False) -> dict:
        return {"name": name, "args": args(data, out / name, *options), "resume": resume}

    jobs = [
        job("1f1b", *PP, *PER_TOKEN, "--train.save_hf", str(out / "1f1b_hf")),
        {"cut": [str(out / "1f1b"), CUT, str(out / "on_dp")]},
        job("on_dp", *DP, *PER_TOKEN, resume=True),
        job("dp", *DP, *PER_TOKEN),
        {"cut": [str(out / "dp"), CUT, str(out / "on_pp")]},
        job("on_pp", *PP, *PER_TOKEN, resume=True),
        job("interleaved", *INTERLEAVED, *PER_SAMPLE, *RECOMPUTE),
        job("load_mm", *PP, *LOAD, "--model.load", str(pp_work / "mm")),
    ]
    return torchrun_jobs(2, jobs, pp_work / "results", script=HERE)


@pytest.fixture(scope="module")
def one_process(pp_work) -> dict[str, Path]:
    """The 1-process runs the pipeline runs are compared with; their output directories by name."""
    data, out = pp_work / "data.jsonl", pp_work / "one"
    runs = {
        "per_token": [*ONE, *PER_TOKEN],
        "per_sample": [*ONE, *PER_SAMPLE],
        "load_mm": [*ONE, *LOAD, "--model.load", str(pp_work / "mm")],
        "four": [*LAYERS, "--train.grad_accum", "4", *FOUR],
    }
    for name, options in runs.items():
        train(load_config(None, args(data, out / name, *options)), out=quiet)
    return {name: out / name for name in runs}


# --- stages and splits (one process) -------------------------------------------------------------


def _tiny(layers: int = 4):
    from mmzoo.testing import spread_weights_

    torch.manual_seed(0)
    return spread_weights_(mmzoo.build_model("qwen2_5_vl", "tiny", text={"num_layers": layers}), std=0.05)


def test_the_stages_keep_the_model_s_names_and_give_its_loss(pp_work):
    """Stage 0 then stage 1 (in one process, no schedule) on a padded bucket give the model's
    loss for a micro-batch with an image and a text-only sample; each stage holds its layers under
    their global names, the last one the tied embedding too."""
    from mmzoo.data.dataset import build_dataset
    from mmzoo.distributed.pipeline import plan_stages, split_model

    model = _tiny()
    cfg = load_config(None, args(pp_work / "data.jsonl", pp_work / "unused", *LAYERS))
    spec = mmzoo.get_model("qwen2_5_vl")
    dataset = build_dataset(spec, model.config, spec.default_tokenizer(), cfg.data, quiet)
    batch = dataset.collate([dataset[0], dataset[1]])
    expected = model(**batch, return_logits=False).loss
    parts = [split_model(model, plan_stages(ParallelConfig(pp=2), 4, 4), rank) for rank in range(2)]
    names = [set(dict(part.model.named_parameters())) for part in parts]
    assert names[0] | names[1] == set(dict(model.named_parameters()))
    assert names[0] & names[1] == {"text_decoder.embedding.word_embeddings.weight"} == set(parts[1].tied)
    assert "text_decoder.decoder.layers.2.mlp.linear_fc1.weight" in names[1]
    assert not any(".layers.2." in n for n in names[0] if n.startswith("text_decoder"))
    first, last = parts[0].stages[0], parts[1].stages[0]
    feed = first.feed
    feed.length, feed.batches = 200, [batch]
    carried = first(torch.tensor([0]))
    assert [t.shape[0] for t in carried] == [200, 3, 202, 200]
    last.feed.length = 200
    torch.testing.assert_close(last(*carried), expected, rtol=1e-5, atol=0)


def test_a_stage_reads_only_its_own_tensors_of_a_split_mm_checkpoint(pp_work, monkeypatch):
    from mmzoo.api import open_weights
    from mmzoo.checkpoint.sources import MMSource
    from mmzoo.checkpoint.weights import fill_parameters
    from mmzoo.distributed.pipeline import plan_stages, split_model
    from mmzoo.nn.init import materialize

    read: list[str] = []
    get = MMSource.get
    monkeypatch.setattr(MMSource, "get", lambda self, name: read.append(name) or get(self, name))
    source = open_weights(pp_work / "mm")
    part = split_model(source.empty_model(), plan_stages(ParallelConfig(pp=2), 4, 4), 1).model
    materialize(part, "cpu")
    fill_parameters(part, source, part=True)
    held = dict(part.named_parameters())
    assert sorted(read) == sorted(held)
    assert not any("image_encoder" in n or ".layers.0." in n or ".layers.1." in n for n in read)
    whole = weights(pp_work / "hf")
    for name, param in held.items():
        assert torch.equal(param, whole[name]), name


@pytest.mark.parametrize(
    ("parallel", "message"),
    [
        ({"llm_pp_layers": (1, 2)}, r"llm pp layers \[1, 2\] sum to 3, but the model has 4 text layers"),
        ({"llm_pp_layers": (1, 1, 1, 1)}, r"lists 4 stages but parallel.pp=2"),
        ({"vit_pp_layers": (2, 2)}, r"stage 0 holds LLM layers before the vision encoder is complete"),
        (
            {"vit_pp_layers": (0, 4), "llm_pp_layers": (0, 4)},
            r"whole vision encoder on the first stage; give \[4, 0\]",
        ),
        ({"pp": 3, "llm_pp_layers": (2, 0, 2)}, r"stage 1 would hold nothing"),
        ({"pp_schedule": "interleaved", "llm_pp_layers": (2, 2)}, r"interleaved .* at least 4"),
        ({"llm_pp_layers": (5, -1)}, r"negative count"),
    ],
)
def test_invalid_stage_splits_fail_in_one_line(parallel, message):
    from mmzoo.distributed.pipeline import plan_stages

    with pytest.raises(MmzooError, match=message) as error:
        plan_stages(ParallelConfig(**{"pp": 2, **parallel}), 4, 4)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("parallel", "grad_accum", "packing", "message"),
    [
        ({}, 1, True, r"train.grad_accum=1: the 1F1B schedule needs at least parallel.pp=2"),
        ({}, 2, False, r"needs data.packing=true"),
        ({"pp_schedule": "interleaved"}, 5, True, r"needs a multiple of the 2 rounds; give a multiple of 2"),
    ],
)
def test_schedules_check_the_micro_batches_before_any_work(parallel, grad_accum, packing, message):
    from mmzoo.distributed.pipeline import check_schedule

    with pytest.raises(MmzooError, match=message):
        check_schedule(ParallelConfig(pp=2, **parallel), grad_accum, packing)


@pytest.mark.slow
def test_a_pipeline_run_checks_its_split_before_any_work(pp_work):
    """On 2 ranks a bad split stops ``mmzoo train`` with the one-line error, before any step."""
    from launch import torchrun

    options = args(pp_work / "data.jsonl", pp_work / "bad", *PP, "--parallel.llm_pp_layers", "[3, 2]")
    done = torchrun(2, "train", *options, timeout=300)
    assert done.returncode != 0
    assert "llm pp layers [3, 2] sum to 5, but the model has 4 text layers" in done.stderr
    assert "metrics.jsonl" not in {p.name for p in (pp_work / "bad").iterdir()}


# --- 2 stages against 1 process -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("name", "expected"), [("1f1b", "per_token"), ("interleaved", "per_sample")])
def test_two_stages_equal_one_process(pp_runs, one_process, pp_work, name, expected):
    """Loss and gradient norm per step (step 3 with a loss-free filler micro-batch), and the
    trained weights, of both schedules; the loss is logged from the last stage only."""
    got = metrics(pp_work / "two" / name)
    assert len(got) == 3
    assert_rows_close(got, metrics(one_process[expected]))
    assert [rank[name]["losses"] for rank in pp_runs] == [[r["loss"] for r in got]] * 2
    trained, single = weights(pp_work / "two" / name), weights(one_process[expected])
    assert_weights_close(trained, single)
    torch.manual_seed(42)  # train.seed: the weights both runs started from
    initial = mmzoo.build_model("qwen2_5_vl", "tiny", text={"num_layers": 4}).state_dict()
    assert max(float((single[k] - initial[k]).abs().max()) for k in single) > 2e-3


@pytest.mark.slow
def test_the_vision_encoder_runs_on_the_first_stage_only(pp_runs):
    """Rank 0 (stage 0) encodes media in each of the 6 micro-batches of 3 steps; rank 1 never."""
    assert [rank["1f1b"]["encode_media"] for rank in pp_runs] == [6, 0]


@pytest.mark.slow
def test_two_replicas_of_two_stages_equal_one_process(one_process, pp_work):
    """4 ranks: dp_shard=2 x pp=2 (FSDP within each stage, a tied-gradient group per replica)."""
    out = pp_work / "four"
    job = {"name": "four", "args": args(pp_work / "data.jsonl", out, *PP, *FOUR)}
    ranks = torchrun_jobs(4, [job], pp_work / "results_four", script=HERE)
    assert [rank["four"]["steps"] for rank in ranks] == [2] * 4
    assert_rows_close(metrics(out), metrics(one_process["four"]))
    assert_weights_close(weights(out), weights(one_process["four"]))


# --- checkpoints across meshes --------------------------------------------------------------------


@pytest.mark.slow
def test_a_pipeline_checkpoint_resumes_in_one_process(pp_runs, pp_work, tmp_path):
    straight = pp_work / "two" / "1f1b"
    copy = cut_at(straight, CUT, tmp_path / "run")
    options = args(pp_work / "data.jsonl", copy, *ONE, *PER_TOKEN)
    assert train(load_config(None, options), resume=True, out=quiet).steps == 1
    assert_rows_close(metrics(copy), metrics(straight))


@pytest.mark.slow
@pytest.mark.parametrize(("resumed", "straight"), [("on_dp", "1f1b"), ("on_pp", "dp")])
def test_checkpoints_resume_across_pipeline_and_data_parallel_meshes(pp_runs, pp_work, resumed, straight):
    """pp=2 -> 2 data-parallel ranks, and back: the step after the checkpoint is the same."""
    assert pp_runs[0][resumed]["steps"] == 1
    assert_rows_close(metrics(pp_work / "two" / resumed), metrics(pp_work / "two" / straight))


@pytest.mark.slow
def test_save_hf_from_the_pipeline_exports_the_trained_weights(pp_runs, pp_work):
    exported, trained = weights(pp_work / "two" / "1f1b_hf"), weights(pp_work / "two" / "1f1b")
    assert exported.keys() == trained.keys()
    for name in exported:
        assert torch.equal(exported[name], trained[name]), name


@pytest.mark.slow
def test_an_mm_checkpoint_split_like_the_stages_loads(pp_runs, one_process, pp_work):
    """The first loss equals the 1-process run's; (lr 0) the saved weights are the checkpoint's."""
    expected = [row["loss"] for row in metrics(one_process["load_mm"])]
    assert pp_runs[0]["load_mm"]["losses"] == pytest.approx(expected, rel=1e-6)
    saved, source = weights(pp_work / "two" / "load_mm"), weights(pp_work / "hf")
    assert saved.keys() == source.keys()
    for param in saved:
        assert torch.equal(saved[param], source[param]), param


# --- negative control -----------------------------------------------------------------------------


@pytest.mark.slow
def test_without_the_tied_gradient_sum_the_pipeline_drifts(pp_runs, one_process, pp_work):
    """The same 1F1B run with each copy of the tied embedding updated by its own stage's gradient
    alone fails the comparisons the real run passes."""
    data, out = pp_work / "data.jsonl", pp_work / "unsummed"
    job = {"name": "unsummed", "args": args(data, out, *PP, *PER_TOKEN)}
    torchrun_jobs(2, [job], pp_work / "results_unsummed", script=HERE, patch=UNSUMMED)
    with pytest.raises(AssertionError):
        assert_rows_close(metrics(out), metrics(one_process["per_token"]))
    with pytest.raises(AssertionError):
        assert_weights_close(weights(out), weights(one_process["per_token"]))


if __name__ == "__main__":
    jobs_file = Path(sys.argv[1])
    if json.loads(jobs_file.read_text()).get("patch") == UNSUMMED:
        from mmzoo.distributed.pipeline import PipelineSchedule

        PipelineSchedule._sum_tied = lambda self: None  # type: ignore[method-assign]
    run_jobs(jobs_file)
