"""Faults on two CPU ranks (gloo): an exception on one rank, Ctrl-C, and ``kill -9`` during a save.

torchrun starts FAULT_SCRIPT on every rank in place of ``python -m mmzoo``: on the ranks that
``FAULT_RANK`` names it injects the fault ``FAULT`` at a known point (the second forward is step
2's: each rank runs one micro-batch per step here), then runs the ``mmzoo`` command line. It
notes on stderr when the fault happened and when the rank left ``main``, and ``PET_TEE=3`` makes
torchrun prefix each rank's lines with ``[default<rank>]:``, so the tests read every rank's own
report and how long it took after the fault. Collectives time out after TIMEOUT_S: a rank that
took that long waited for a peer, which these tests rule out.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest
import torch
from launch import SMALL_RUN, metrics, torchrun

import mmzoo
from mmzoo.checkpoint.mm import TRACKER
from mmzoo.train.checkpoint import latest_checkpoint
from mmzoo.train.loop import OOM_HELP

pytestmark = pytest.mark.slow

TIMEOUT_S = 20  # parallel.timeout_s: a wait for a dead peer ends, and is told apart from a prompt exit
RUN_LIMIT_S = 240  # a hard limit on any one torchrun
STEPS = 4

FAULT_SCRIPT = '''
import os
import signal
import sys
import time

import torch

import mmzoo_kernels
from mmzoo.cli import main
from mmzoo.distributed import checkpoint
from mmzoo.errors import MmzooError
from mmzoo.model import VLModel
from mmzoo.train import loop

RANK = int(os.environ["RANK"])


def note(event):
    print(f"fault-test: {event} at {time.time()}", file=sys.stderr, flush=True)


def on_call(owner, name, count, action):
    """Run ``action()`` before the ``count``-th call of ``owner.name``."""
    original, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        calls.append(None)
        if len(calls) == count:
            note("fault")
            action()
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def fail(error):
    def action():
        raise error

    return action


def send(pid, signum):
    return lambda: os.kill(pid, signum)


def inject(fault):
    if fault == "bug":
        on_call(VLModel, "forward", 2, fail(RuntimeError("injected failure at step 2")))
    elif fault == "oom":
        oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        on_call(VLModel, "forward", 2, fail(oom))
    elif fault == "data":  # this rank's node lacks the data file (a failure inside a checked step)
        sys.argv += ["--data.data", "/nonexistent/train.jsonl"]
        on_call(loop, "build_dataset", 1, lambda: None)  # notes when it fails
    elif fault == "device":  # before this rank joins the process group
        error = MmzooError("train.device=cuda but torch sees no CUDA device")
        on_call(loop, "resolve_device", 1, fail(error))
    elif fault == "kernels":  # a kernel this rank's node cannot load (a failure outside one)
        error = mmzoo_kernels.KernelError("attention=flash: flash_attn is not installed")
        on_call(mmzoo_kernels, "configure", 1, fail(error))
    elif fault == "ctrl-c":
        on_call(VLModel, "forward", 2, send(os.getpid(), signal.SIGINT))
    elif fault == "ctrl-c-torchrun":
        # The ranks run in sessions of their own: a terminal's Ctrl-C reaches torchrun, which forwards it.
        on_call(VLModel, "forward", 2, send(os.getppid(), signal.SIGINT))
    elif fault == "sigterm-torchrun":  # a job scheduler ending the job
        on_call(VLModel, "forward", 2, send(os.getppid(), signal.SIGTERM))
    elif fault == "kill-in-save":
        # The second save (step 4), once this rank's DCP shard is written, before its RNG state.
        on_call(checkpoint, "write_rng", 2, send(os.getpid(), signal.SIGKILL))
    else:
        raise ValueError(fault)


if os.environ.get("FAULT_RANK") in ("all", str(RANK)):
    inject(os.environ["FAULT"])
try:
    code = main()
finally:
    note("exit")
sys.exit(code)
'''


class Ranks:
    """What a faulty run left: torchrun's result and each rank's own output."""

    def __init__(self, result) -> None:
        self.result, self.ended = result, time.time()
        self.out = _by_rank(result.stdout)
        self.err = _by_rank(result.stderr)

    def times(self, rank: int, event: str) -> list[float]:
        return [float(t) for t in re.findall(rf"^fault-test: {event} at (\S+)$", self.err[rank], re.M)]

    def assert_prompt(self) -> None:
        """Every rank ended soon after the fault, not after a collective's timeout, and torchrun
        had to kill none (it does 30 s after asking one to stop)."""
        (fault,) = [t for rank in self.err for t in self.times(rank, "fault")]
        assert self.ended - fault < TIMEOUT_S / 2, f"the run ended {self.ended - fault:.1f}s after the fault"
        assert "forcefully exiting" not in self.result.stderr


def _by_rank(text: str) -> dict[int, str]:
    lines: dict[int, list[str]] = {0: [], 1: []}
    for rank, line in re.findall(r"^\[default(\d+)\]:(.*)$", text, re.M):
        lines[int(rank)].append(line)
    return {rank: "\n".join(rank_lines) for rank, rank_lines in lines.items()}


def run(tmp_path: Path, output: Path, *args: str, fault: str | None = None, rank: str = "1") -> Ranks:
    """``mmzoo train ARGS`` of the small run on 2 ranks (STEPS steps), ``fault`` injected on ``rank``
    (a number or ``all``)."""
    script = tmp_path / "fault_script.py"
    script.write_text(FAULT_SCRIPT)
    result = torchrun(
        2,
        "train",
        *SMALL_RUN,
        "--train.output_dir",
        str(output),
        "--train.steps",
        str(STEPS),
        "--parallel.timeout_s",
        str(TIMEOUT_S),
        *args,
        script=script,
        timeout=RUN_LIMIT_S,
        env={"PET_TEE": "3", "FAULT": fault or "", "FAULT_RANK": rank if fault else ""},
    )
    return Ranks(result)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The run without faults, saving at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("reference")
    ranks = run(tmp, tmp / "run", "--train.save_every", "2")
    assert ranks.result.returncode == 0, ranks.result.stderr[-3000:]
    return tmp / "run"


def same_checkpoints(ours: Path, theirs: Path) -> None:
    """Both DCP iterations hold the same files, byte for byte (DCP's ``.metadata`` aside, which
    records where it was written)."""
    files = sorted(p.relative_to(theirs) for p in theirs.rglob("*") if p.is_file())
    assert sorted(p.relative_to(ours) for p in ours.rglob("*") if p.is_file()) == files
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= {f.name for f in files}
    assert {"rng/rank_00000/rng.json", "rng/rank_00001/rng.json"} <= {str(f) for f in files}
    for name in files:
        if name.name != ".metadata":
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name


def staging(output: Path) -> list[Path]:
    return list(output.glob(".iter_*"))


def resume_matches(tmp_path: Path, output: Path, reference: Path) -> None:
    """``--resume`` goes on from step 2 exactly as the run without faults did."""
    ranks = run(tmp_path, output, "--resume")
    assert ranks.result.returncode == 0, ranks.result.stderr[-3000:]
    assert "resumed from" in ranks.out[0] and f"{output}/iter_0000002 at step 2" in ranks.out[0]
    assert steady(metrics(output)) == steady(metrics(reference))
    assert latest_checkpoint(output) == output / "iter_0000004" and not staging(output)


def steady(rows: list[dict]) -> list[dict]:
    """Metrics rows without the timings, which differ between runs."""
    timings = ("tokens_per_s", "samples_per_s", "seconds")
    return [{k: v for k, v in row.items() if k not in timings} for row in rows]


# --- an exception on one rank ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "reported"),
    [
        ("bug", "RuntimeError: injected failure at step 2"),
        ("oom", OOM_HELP),
    ],
    ids=["bug", "oom"],
)
def test_an_error_on_one_rank_mid_run_stops_every_rank_with_its_message(fault, reported, tmp_path):
    ranks = run(tmp_path, tmp_path / "run", fault=fault)
    assert ranks.result.returncode != 0
    # Rank 0 reports rank 1's error, not its own lost connection. Rank 1 says the same of a user
    # error, and shows a bug's traceback (torch prefixes its lines with "[rank1]: ").
    message = f"mmzoo: error: rank 1: {reported}"
    assert message in ranks.err[0].splitlines(), ranks.err[0]
    assert (f"[rank1]: {reported}" if fault == "bug" else message) in ranks.err[1].splitlines()
    assert "Connection closed" not in ranks.err[0] + ranks.err[1]
    ranks.assert_prompt()
    assert [row["step"] for row in metrics(tmp_path / "run")] == [1]  # step 2 never finished
    assert latest_checkpoint(tmp_path / "run") is None


@pytest.mark.parametrize(
    ("fault", "reported"),
    [
        ("data", "data file /nonexistent/train.jsonl does not exist"),
        ("kernels", "attention=flash: flash_attn is not installed"),
    ],
    ids=["data", "kernels"],
)
def test_a_set_up_failure_on_one_rank_stops_every_rank_with_its_message(fault, reported, tmp_path):
    ranks = run(tmp_path, tmp_path / "run", fault=fault)
    assert ranks.result.returncode != 0
    for rank in (0, 1):
        assert f"mmzoo: error: rank 1: {reported}" in ranks.err[rank].splitlines(), ranks.err[rank]
    ranks.assert_prompt()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_rank_failing_before_it_joins_leaves_no_rank_waiting_for_it(tmp_path):
    ranks = run(tmp_path, tmp_path / "run", fault="device")
    assert "mmzoo: error: train.device=cuda but torch sees no CUDA device" in ranks.err[1].splitlines()
    # Rank 0 waits to join rank 1 until torchrun, seeing rank 1 gone, stops it (SIGTERM).
    assert "exitcode  : -15" in ranks.result.stderr and not ranks.times(0, "exit")
    ranks.assert_prompt()


# --- Ctrl-C, SIGTERM ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "rank"),
    [("ctrl-c", "1"), ("ctrl-c", "all"), ("ctrl-c-torchrun", "0"), ("sigterm-torchrun", "0")],
    ids=["one-rank", "every-rank", "torchrun", "sigterm-torchrun"],
)
def test_ctrl_c_or_sigterm_saves_the_same_step_on_every_rank(fault, rank, reference, tmp_path):
    output = tmp_path / "run"
    ranks = run(tmp_path, output, fault=fault, rank=rank)
    # torchrun itself ends with the signal it got; the ranks end normally, having saved.
    assert ranks.result.returncode == (0 if fault == "ctrl-c" else 1), ranks.result.stderr[-3000:]
    assert "interrupted at step 2: saving a checkpoint" in ranks.out[0]
    for r in (0, 1):
        assert "Traceback" not in ranks.err[r] and "mmzoo: error" not in ranks.err[r], ranks.err[r]
        assert ranks.times(r, "exit")  # each left main itself
    # The signal came during step 2: every rank finished it, then all saved it, complete.
    assert latest_checkpoint(output) == output / "iter_0000002"
    same_checkpoints(output / "iter_0000002", reference / "iter_0000002")
    assert [row["step"] for row in metrics(output)] == [1, 2] and not staging(output)
    if fault == "ctrl-c-torchrun":
        resume_matches(tmp_path, output, reference)


# --- kill -9 during a save ---------------------------------------------------------------------

LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Check the logs of the remote worker")


@pytest.mark.parametrize("killed", [0, 1])
def test_kill_9_during_a_save_keeps_the_previous_checkpoint(killed, reference, tmp_path):
    output = tmp_path / "run"
    ranks = run(tmp_path, output, "--train.save_every", "2", fault="kill-in-save", rank=str(killed))
    survivor = 1 - killed
    assert ranks.result.returncode != 0
    assert f"exitcode  : -{int(signal.SIGKILL)}" in ranks.result.stderr
    # The survivor reports the lost peer in gloo's words (a closed connection, or a wait that names
    # the remote worker), unless torchrun, seeing the killed rank gone, stops it first: then it
    # leaves without a message.
    reported = ranks.err[survivor]
    if "mmzoo: error" in reported or "Traceback" in reported:
        assert any(words in reported for words in LOST_PEER), reported[-2000:]
    ranks.assert_prompt()
    # The tracker still names step 2's checkpoint, whole; rank 0 removes its staging directory
    # unless it is the one killed, and then the next save does.
    assert (output / TRACKER).read_text().strip() == "2"
    same_checkpoints(output / "iter_0000002", reference / "iter_0000002")
    assert len(staging(output)) == (1 if killed == 0 else 0)
    loaded = mmzoo.load_model(output).state_dict()
    expected = mmzoo.load_model(reference / "iter_0000002").state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    if killed == 0:
        resume_matches(tmp_path, output, reference)
