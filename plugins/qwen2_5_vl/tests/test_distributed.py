"""``mmzoo train`` on many ranks (FSDP2, gloo, CPU) against the same run in one process.

One torchrun launch of 2 ranks runs every multi-rank job of this file in turn (this file is also
the script torchrun starts: see :func:`run_jobs`), and one launch of 4 ranks resumes a 2-rank
checkpoint; the 1-process runs they are compared with run in the test process. The data are 9
tiny records (images, a video and text-only ones) packed into rows of 96 tokens, so that a rank
gets a text-only micro-batch while the other has media, and each epoch ends on an odd number of
micro-batches (:func:`test_the_data_plan_gives_ranks_text_only_and_padded_micro_batches`).

Checked: loss and gradient norm per step of 2 ranks equal one process with the same global batch
for the three loss reductions (with CPU offload in one run; bf16, frozen towers, recompute and no
resharding after forward in another); every rank runs the same steps and the vision encoder in
every micro-batch; rank 0 alone writes metrics, with global counts; the preprocessing cache is
built once; DCP checkpoints are complete when the tracker names them and resume from the middle
of an epoch bit-exactly on 2 ranks and with the same losses on 1 and 4 (also without the
optimizer state); ``mmzoo.load_model`` and ``mmzoo infer`` read them; sharded loading from an HF
directory and an mm checkpoint (tp 2, pp 2) gives each rank its shards.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import mmzoo
import mmzoo.data.dataset as dataset_module
import mmzoo.data.tokenizer as tokenizer_module
from mmzoo.checkpoint.mm import TRACKER, iteration_name, write_tracker
from mmzoo.config import load_config
from mmzoo.distributed.env import World
from mmzoo.model import ImageEncoder, VLModel
from mmzoo.train.loop import _share, train

HERE = Path(__file__).resolve()
DEMO = Path(mmzoo.__file__).parent / "demo"
MEDIA = (
    "{min_pixels: 3136, max_pixels: 12544, video_min_pixels: 3136, video_max_pixels: 6272, video_maxlen: 4}"
)
SEQ_LENGTH = 96  # 1-2 samples (26-46 tokens each) per packed row: 5 micro-batches per epoch


def chat(user: str, answer: str, **media: list[str]) -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
        **media,
    }


RECORDS = [
    chat("<image>What animal is this?", "A tabby cat.", images=["chelsea.jpg"]),
    chat("What is the capital of France?", "Paris."),
    chat("<video>What happens?", "The view pans across a red cup.", videos=["pan.mp4"]),
    chat("Name a primary colour.", "Red."),
    chat("<image>What is in the cup?", "Espresso.", images=["coffee.jpg"]),
    chat("Count to three.", "One, two, three."),
    chat("<image>Who is this?", "An astronaut.", images=["astronaut.jpg"]),
    chat("Say hello.", "Hello."),
    chat("<image>What is this?", "A rocket on its pad.", images=["rocket.jpg"]),
]


def args(data: Path, output: Path, *extra: str) -> list[str]:
    """The ``mmzoo train`` options of every run here, then ``extra``."""
    return [
        "--model.name", "qwen2_5_vl",
        "--data.data", str(data),
        "--data.dataset_dir", str(DEMO),
        "--data.seq_length", str(SEQ_LENGTH),
        "--data.media", MEDIA,
        "--train.tensorboard", "false",
        "--train.lr", "1e-3",
        "--train.min_lr", "0",
        "--train.warmup", "0",
        "--train.save_every", "0",
        "--parallel.timeout_s", "60",
        "--train.output_dir", str(output),
        *extra,
    ]  # fmt: skip


EPOCHS = ["--train.epochs", "2", "--train.steps", "0"]  # steps 0: as many as the epochs take
PER_TOKEN = ["--train.steps", "5"]
DEFAULT = ["--train.loss_reduction", "default", "--train.steps", "3", "--train.precision", "bf16"]
FROZEN = ["--model.freeze", "[vision, projector]"]
RECOMPUTE = ["--model.recompute_text.granularity", "full", "--model.recompute_vision.granularity", "full"]
# The runs compared: (options on 2 ranks, options of the 1-process run with the same global batch).
PARITY = {
    # per_token at 2 micro-batches per rank, 2 steps per epoch (4 micro-batches, then 1), saving
    # at steps 3 (mid-epoch) and 5: the DCP tests resume it.
    "per_token": (
        ["--train.loss_reduction", "per_token", *PER_TOKEN, "--train.grad_accum", "2"],
        ["--train.loss_reduction", "per_token", *PER_TOKEN, "--train.grad_accum", "4"],
    ),
    # Two epochs of 3 steps (2, 2, then 1 micro-batch).
    "per_sample": (
        ["--train.loss_reduction", "per_sample", *EPOCHS, "--parallel.offload", "true"],
        ["--train.loss_reduction", "per_sample", *EPOCHS, "--train.grad_accum", "2"],
    ),
    "default": (
        [*DEFAULT, *FROZEN, *RECOMPUTE, "--parallel.reshard_after_forward", "false"],
        [*DEFAULT, *FROZEN, "--train.grad_accum", "2"],
    ),
}
CUT = 3  # the per_token step the resume tests start from
SAVE = ["--train.save_every", str(CUT)]
# Loading runs: lr 0 leaves the loaded weights as they are, so the saved ones show what each rank filled.
LOAD = ["--train.steps", "1", "--train.lr", "0"]
LOAD_ONE = [*LOAD, "--train.grad_accum", "2"]


@pytest.fixture(scope="module", autouse=True)
def cached_tokenizer():
    """Load the Qwen tokenizer once for the module (about 2 s per load)."""
    with pytest.MonkeyPatch.context() as m:
        _cache_tokenizer(m)
        yield


def _cache_tokenizer(m: pytest.MonkeyPatch) -> None:
    load = tokenizer_module.load_tokenizer
    loaded: dict[str, object] = {}

    def cached(path):
        if str(path) not in loaded:
            loaded[str(path)] = load(path)
        return loaded[str(path)]

    m.setattr(tokenizer_module, "load_tokenizer", cached)


def quiet(_: str) -> None:
    pass


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return dict(mmzoo.load_model(path).state_dict())


def cut_at(run: Path, step: int, copy: Path) -> Path:
    """``copy``: the run directory ``run`` as it was right after its step-``step`` checkpoint."""
    copy.mkdir(parents=True)
    shutil.copytree(run / iteration_name(step), copy / iteration_name(step))
    write_tracker(copy, step)
    rows = (run / "metrics.jsonl").read_text().splitlines(keepends=True)[:step]
    (copy / "metrics.jsonl").write_text("".join(rows))
    return copy


def untimed(rows: list[dict]) -> list[dict]:
    return [
        {k: v for k, v in row.items() if k not in ("tokens_per_s", "samples_per_s", "seconds")}
        for row in rows
    ]


def assert_rows_close(got: list[dict], expected: list[dict], bf16: bool = False) -> None:
    """Same steps, epochs, token and sample counts and lr; loss and gradient norm equal up to the
    order of sums.

    The gradient norm is summed in fp32: over the 9.7M-entry embedding gradient one process is
    about 1e-5 below the float64 value, a rank with half of it less. Under bf16 autocast weights
    that differ in their last fp32 bits round to other bf16 values: norms differ by up to 1e-4,
    and after two updates losses by up to about 4e-5 (a wrong normalisation is off by percents).
    """

    def counts(rows: list[dict]) -> list[tuple]:
        return [
            (r["step"], r["epoch"], r["tokens"], round(r["samples_per_s"] * r["seconds"]), r["lr"])
            for r in rows
        ]

    assert counts(got) == counts(expected)
    for key, rtol in (("loss", 1e-4 if bf16 else 1e-6), ("grad_norm", 5e-4 if bf16 else 4e-5)):
        torch.testing.assert_close(
            [r[key] for r in got], [r[key] for r in expected], rtol=rtol, atol=0, msg=key
        )


# --- the multi-rank jobs (this file run by torchrun) ---------------------------------------------


def run_jobs(jobs_file: Path) -> None:
    """Run the jobs of ``jobs_file`` on this rank, then write what each gave to ``rank_R.json``.

    A job trains (``{"name", "args", "resume"}``) or copies a run as it was at a checkpoint
    (``{"cut": [run, step, copy]}``, rank 0 while the others wait). Calls of the vision encoder,
    of the model and writes of preprocessing cache entries are counted per job.
    """
    rank = int(os.environ["RANK"])
    calls = {"forward": 0, "encode_media": 0, "write_entry": 0}
    with pytest.MonkeyPatch.context() as m:
        _cache_tokenizer(m)
        counted = (
            (VLModel, "forward", "forward"),
            (ImageEncoder, "forward", "encode_media"),
            (dataset_module, "write_entry", "write_entry"),
        )
        for owner, name, key in counted:
            m.setattr(owner, name, _counted(getattr(owner, name), calls, key))
        jobs = json.loads(jobs_file.read_text())
        results = {}
        for n, job in enumerate(jobs["jobs"]):
            if n:  # the first job joins the process group as mmzoo does; train() leaves it at the end
                _join_process_group(n)
            if "cut" in job:
                run, step, copy = job["cut"]
                if rank == 0:
                    cut_at(Path(run), step, Path(copy))
                dist.barrier()
                dist.destroy_process_group()
                continue
            calls.update(dict.fromkeys(calls, 0))
            result = train(load_config(None, job["args"]), resume=job.get("resume", False), out=quiet)
            results[job["name"]] = {"steps": result.steps, "losses": result.losses, **calls}
    (Path(jobs["results"]) / f"rank_{rank}.json").write_text(json.dumps(results))


def _counted(function, calls: dict[str, int], name: str):
    def counting(*a, **k):
        calls[name] += 1
        return function(*a, **k)

    return counting


def _join_process_group(n: int) -> None:
    """A new process group for job ``n``, under its own keys in torchrun's store: a group made
    again under the keys of a destroyed one finds the old addresses there and cannot connect."""
    store, rank, size = next(dist.rendezvous("env://"))
    job_store = dist.PrefixStore(f"job_{n}", store)
    dist.init_process_group(
        "gloo", store=job_store, rank=rank, world_size=size, timeout=timedelta(seconds=60)
    )


def run_jobs_patching(
    jobs_file: Path, output_name: str, module: object, attribute: str, value: object
) -> None:
    """:func:`run_jobs`, with ``module.attribute`` set to ``value`` while the job whose output
    directory is named ``output_name`` trains (a negative control's wrong layout)."""
    import test_distributed

    plain = test_distributed.train

    def training(cfg, **options):
        with pytest.MonkeyPatch.context() as m:
            if Path(cfg.train.output_dir).name == output_name:
                m.setattr(module, attribute, value)
            return plain(cfg, **options)

    test_distributed.train = training
    run_jobs(jobs_file)


def torchrun_jobs(
    ranks: int, jobs: list[dict], results: Path, timeout: float = 600, script: Path = HERE, **extra: str
) -> list[dict]:
    """Run ``jobs`` on ``ranks`` ranks in one torchrun launch of ``script`` (this file, or a test
    file whose ``__main__`` patches something, told by ``extra`` in the jobs file, then calls
    :func:`run_jobs`); returns each rank's results."""
    from launch import torchrun

    results.mkdir(parents=True, exist_ok=True)
    jobs_file = results / "jobs.json"
    jobs_file.write_text(json.dumps({"jobs": jobs, "results": str(results), **extra}))
    done = torchrun(ranks, str(jobs_file), script=script, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return [json.loads((results / f"rank_{r}.json").read_text()) for r in range(ranks)]


# --- shared set-up -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The data file, and a random tiny model as an HF directory and as an mm checkpoint (tp 2, pp 2)."""
    from mmzoo.checkpoint.hf_export import save_hf
    from mmzoo.cli import main
    from mmzoo.testing import spread_weights_

    root = tmp_path_factory.mktemp("distributed")
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    torch.manual_seed(3)
    model = spread_weights_(mmzoo.build_model("qwen2_5_vl", "tiny"), std=0.05)
    save_hf(model, root / "hf")
    convert = ["convert", "hf-to-mm", "--hf-dir", str(root / "hf"), "--mm-dir", str(root / "mm")]
    assert main([*convert, "--tp", "2", "--llm-pp-layers", "1,1", "--vit-pp-layers", "4,0"]) == 0
    shards = sorted(p.name for p in (root / "mm" / "release").glob("mp_rank_*"))
    assert shards == [f"mp_rank_{tp:02d}_{pp:03d}" for tp in range(2) for pp in range(2)]
    return root


@pytest.fixture(scope="module")
def two_ranks(work) -> list[dict]:
    """Every 2-rank job, in one launch; returns each rank's results by job name."""
    data, out = work / "data.jsonl", work / "two"
    cache = ["--data.cache_dir", str(work / "cache")]
    jobs = [
        {"name": "per_token", "args": args(data, out / "per_token", *PARITY["per_token"][0], *SAVE, *cache)},
        {"cut": [str(out / "per_token"), CUT, str(out / "resumed")]},
        {
            "name": "resumed",
            "args": args(data, out / "resumed", *PARITY["per_token"][0], *SAVE),
            "resume": True,
        },
    ]
    export = ["--train.save_hf", str(out / "per_sample_hf")]
    jobs += [
        {"name": "per_sample", "args": args(data, out / "per_sample", *PARITY["per_sample"][0], *export)},
        {"name": "default", "args": args(data, out / "default", *PARITY["default"][0])},
    ]
    for kind in ("hf", "mm"):
        load = args(data, out / f"load_{kind}", *LOAD, "--model.load", str(work / kind))
        jobs.append({"name": f"load_{kind}", "args": load})
    return torchrun_jobs(2, jobs, work / "results_2", timeout=600)


@pytest.fixture(scope="module")
def one_process(work) -> dict[str, Path]:
    """The 1-process runs the 2-rank ones are compared with; their output directories by name."""
    data, out = work / "data.jsonl", work / "one"
    runs = {name: args(data, out / name, *options[1]) for name, options in PARITY.items()}
    runs["per_token"] += SAVE
    for kind in ("hf", "mm"):
        runs[f"load_{kind}"] = args(data, out / f"load_{kind}", *LOAD_ONE, "--model.load", str(work / kind))
    for options in runs.values():
        train(load_config(None, options), out=quiet)
    return {name: out / name for name in runs}


# --- the data plan -------------------------------------------------------------------------------


def test_the_data_plan_gives_ranks_text_only_and_padded_micro_batches(work):
    """The runs below meet the cases that matter: a rank whose micro-batch, or whole step, is
    text-only (it runs the vision encoder on the dummy image), and an epoch ending on an odd
    number of micro-batches (a rank gets a loss-free empty one)."""
    from mmzoo.data.dataset import build_dataset

    cfg = load_config(None, args(work / "data.jsonl", work / "unused"))
    spec = mmzoo.get_model("qwen2_5_vl")
    dataset = build_dataset(
        spec, mmzoo.build_model("qwen2_5_vl", "tiny").config, spec.default_tokenizer(), cfg.data, quiet
    )
    media = [dataset[i].has_media for i in range(len(dataset))]
    assert sum(media) == 5 and not all(media)

    def shares(epoch: int, per_rank: int) -> list[list[list[list[int]]]]:
        """Per step of ``epoch``: each of 2 ranks' micro-batches (sample indices)."""
        plan = dataset.batches(1, cfg.train.seed, epoch)
        assert len(plan) == 5
        blocks = [plan[i : i + 2 * per_rank] for i in range(0, len(plan), 2 * per_rank)]
        return [[_share(block, rank, 2) for rank in range(2)] for block in blocks]

    def text_only(micro_batch: list[int]) -> bool:
        return bool(micro_batch) and not any(media[i] for i in micro_batch)

    # per_token (2 micro-batches per rank): in step 3 rank 0's second micro-batch is text-only
    # while rank 1's has media; steps 2 and 4 hold one micro-batch: rank 1 runs a loss-free one.
    per_token = shares(0, 2) + shares(1, 2)
    assert text_only(per_token[2][0][1]) and not text_only(per_token[2][1][1]), per_token[2]
    for step in (per_token[1], per_token[3]):
        assert len(step[0]) == 1 and step[0][0] and step[1] == [[]], step
    # per_sample (1 micro-batch per rank): in step 5 rank 0's step is text-only while rank 1's
    # has media; each epoch's third step gives rank 1 a loss-free micro-batch.
    per_sample = shares(0, 1) + shares(1, 1)
    assert text_only(per_sample[4][0][0]) and not text_only(per_sample[4][1][0]), per_sample[4]
    assert per_sample[2][1] == per_sample[5][1] == [[]]


# --- 2 ranks against 1 process -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PARITY))
def test_two_ranks_equal_one_process_with_the_same_global_batch(two_ranks, one_process, work, name):
    """Loss, gradient norm, lr and global token counts per step; rank 0 alone writes the rows."""
    got, expected = metrics(work / "two" / name), metrics(one_process[name])
    assert len(got) == len(expected) == {"per_token": 5, "per_sample": 6, "default": 3}[name]
    assert_rows_close(got, expected, bf16="bf16" in PARITY[name][0])
    assert [rank[name]["losses"] for rank in two_ranks] == [[r["loss"] for r in got]] * 2


@pytest.mark.slow
def test_every_rank_runs_the_same_steps_and_the_vision_encoder_in_each_micro_batch(two_ranks):
    # per_token: 5 steps of 2, 1, 2, 1, 2 micro-batches per rank (rank 1's loss-free in steps 2
    # and 4); per_sample: 6 steps of 1 (rank 1's loss-free in steps 3 and 6).
    for name, micro_batches in (("per_token", 8), ("per_sample", 6), ("default", 3)):
        for rank in two_ranks:
            job = rank[name]
            assert (job["steps"], job["forward"], job["encode_media"]) == (
                len(job["losses"]),
                micro_batches,
                micro_batches,
            ), name
        assert two_ranks[0][name]["steps"] == two_ranks[1][name]["steps"]


@pytest.mark.slow
def test_the_preprocessing_cache_is_built_once_per_node(two_ranks, work):
    """Local rank 0 writes the cache entry; rank 1 then reads it."""
    assert [rank["per_token"]["write_entry"] for rank in two_ranks] == [1, 0]
    assert len([p for p in (work / "cache").iterdir() if not p.name.startswith(".")]) == 1


# --- DCP checkpoints -----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_tracker_names_complete_dcp_directories(two_ranks, work):
    run = work / "two" / "per_token"
    assert sorted(p.name for p in run.iterdir()) == [
        "iter_0000003",
        "iter_0000005",
        TRACKER,
        "metrics.jsonl",
    ]  # no staging directory left behind
    assert (run / TRACKER).read_text() == "5"
    for step in (3, 5):
        iteration = run / iteration_name(step)
        names = {p.name for p in iteration.iterdir()}
        assert {
            ".metadata",
            "dcp_meta.json",
            "trainer_state.json",
            "scheduler.json",
            "media.json",
            "rng",
        } <= names
        assert sorted(p.name for p in (iteration / "rng").iterdir()) == ["rank_00000", "rank_00001"]
        assert json.loads((iteration / "dcp_meta.json").read_text())["world_size"] == 2
        assert json.loads((iteration / "trainer_state.json").read_text())["step"] == step


@pytest.mark.slow
def test_resume_on_the_same_ranks_is_bit_exact(two_ranks, work):
    straight, resumed = work / "two" / "per_token", work / "two" / "resumed"
    assert two_ranks[0]["resumed"]["steps"] == 2  # steps 4 and 5
    assert untimed(metrics(resumed)) == untimed(metrics(straight))  # bitwise
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_in_one_process(two_ranks, work, tmp_path):
    straight = work / "two" / "per_token"
    copy = cut_at(straight, CUT, tmp_path / "run")
    options = args(work / "data.jsonl", copy, "--train.loss_reduction", "per_token", *PER_TOKEN)
    result = train(load_config(None, [*options, "--train.grad_accum", "4"]), resume=True, out=quiet)
    assert result.steps == 2
    assert_rows_close(metrics(copy), metrics(straight))


@pytest.mark.slow
def test_resume_without_the_optimizer_state_starts_adam_afresh(two_ranks, one_process, work, tmp_path):
    """``train.load_optimizer=false``: the DCP checkpoint of 2 ranks and the single-process one of
    the same run go on alike, from a fresh optimizer (a first step of Adam at full size)."""
    options = ["--train.loss_reduction", "per_token", *PER_TOKEN, "--train.grad_accum", "4"]
    runs = []
    for name, run in (("dcp", work / "two" / "per_token"), ("single", one_process["per_token"])):
        copy = cut_at(run, CUT, tmp_path / name)
        cfg = load_config(None, args(work / "data.jsonl", copy, *options, "--train.load_optimizer", "false"))
        assert train(cfg, resume=True, out=quiet).steps == 2
        runs.append(metrics(copy))
    assert_rows_close(runs[0], runs[1])
    # The fresh optimizer takes another step 4 than the saved one did: step 5's loss differs.
    assert abs(runs[1][4]["loss"] - metrics(one_process["per_token"])[4]["loss"]) > 0.01


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_four_ranks(two_ranks, work, tmp_path):
    straight = work / "two" / "per_token"
    copy = cut_at(straight, CUT, tmp_path / "run")
    options = args(work / "data.jsonl", copy, "--train.loss_reduction", "per_token", *PER_TOKEN)
    job = {"name": "resumed", "args": [*options, "--train.grad_accum", "1"], "resume": True}
    ranks = torchrun_jobs(4, [job], tmp_path / "results", timeout=300)
    assert [rank["resumed"]["steps"] for rank in ranks] == [2] * 4
    assert_rows_close(metrics(copy), metrics(straight))


@pytest.mark.slow
def test_load_model_and_infer_read_the_dcp_output(two_ranks, one_process, work, capsys):
    from mmzoo.cli import main

    dcp, single = weights(work / "two" / "per_token"), weights(one_process["per_token"])
    torch.manual_seed(42)  # train.seed: the weights both runs started from
    initial = mmzoo.build_model("qwen2_5_vl", "tiny").state_dict()
    assert dcp.keys() == single.keys() == initial.keys()
    # Adam moves a weight by up to lr (1e-3) per step whatever its gradient, so where summation
    # order changes a near-zero gradient the runs differ by a few 1e-5 (at most 5e-5 here).
    assert max((dcp[k] - single[k]).abs().max() for k in dcp) < 2e-4
    assert max((single[k] - initial[k]).abs().max() for k in dcp) > 2e-3
    answers = []
    prompt = ["--prompt", "What is in the cup?", "--image", str(DEMO / "coffee.jpg"), "--max-new-tokens", "5"]
    for model_dir in (work / "two" / "per_token", one_process["per_token"]):
        assert main(["infer", "--model-dir", str(model_dir), *prompt, "--no-stream"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0]  # the same greedy tokens


@pytest.mark.slow
def test_save_hf_on_two_ranks_exports_the_trained_weights(two_ranks, work):
    """Rank 0 writes ``train.save_hf`` from the last DCP checkpoint: the same weights, bit for bit."""
    exported, trained = weights(work / "two" / "per_sample_hf"), weights(work / "two" / "per_sample")
    assert exported.keys() == trained.keys()
    for name in exported:
        assert torch.equal(exported[name], trained[name]), name


# --- sharded loading -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hf", "mm"])
def test_sharded_loading_fills_each_rank_s_shards(two_ranks, one_process, work, kind):
    """From an HF directory and from an mm checkpoint split tp 2 x pp 2: the first loss equals the
    1-process run's, and (lr 0) the saved shards are the checkpoint's weights, bit for bit."""
    name = f"load_{kind}"
    expected = [row["loss"] for row in metrics(one_process[name])]
    assert len(expected) == 1 and two_ranks[0][name]["losses"] == pytest.approx(expected, rel=1e-6)
    saved, source = weights(work / "two" / name), weights(work / "hf")
    assert saved.keys() == source.keys()
    for param in saved:
        assert torch.equal(saved[param], source[param]), param


@pytest.mark.parametrize("offload", [False, True])
def test_fill_parameters_gives_a_sharded_parameter_its_shard(work, offload):
    """``fill_parameters`` into FSDP (DTensor) parameters on a 1-rank gloo group equals a plain
    load, with and without CPU offload (which runs on the CPU too, unpinned)."""
    from mmzoo.api import open_weights
    from mmzoo.checkpoint.weights import fill_parameters
    from mmzoo.distributed.fsdp import data_parallel_mesh, shard_model
    from mmzoo.testing import free_port

    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        weights_ = open_weights(work / "mm")
        model = weights_.empty_model()
        shard_model(model, data_parallel_mesh(World(), torch.device("cpu")), offload=offload)
        model.to_empty(device="cpu")
        fill_parameters(model, weights_)
        sharded = {name: p.full_tensor() for name, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()
    plain = weights(work / "hf")
    assert sharded.keys() == plain.keys()
    for name, tensor in plain.items():
        assert torch.equal(sharded[name], tensor), name


if __name__ == "__main__":
    run_jobs(Path(sys.argv[1]))
