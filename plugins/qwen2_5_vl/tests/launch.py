"""Start ``mmzoo`` (or a Python script) on several CPU ranks with torchrun, gloo, for the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mmzoo.testing import free_port

# Eight demo samples of 52-96 tokens (two packed rows per epoch), images of at most 16 tokens.
SMALL = [
    "--data.max_samples",
    "8",
    "--data.seq_length",
    "448",
    "--data.media",
    "{min_pixels: 3136, max_pixels: 12544}",
    "--train.tensorboard",
    "false",
]
# The tiny demo run the multi-rank tests share.
SMALL_RUN = [
    "--model",
    "qwen2_5_vl",
    *SMALL,
    "--train.lr",
    "1e-3",
    "--train.warmup",
    "0",
]


def torchrun(
    ranks: int,
    *args: str,
    timeout: float = 180,
    env: dict[str, str] | None = None,
    script: Path | None = None,
):
    """``torchrun --nproc-per-node RANKS -m mmzoo ARGS`` (or ``SCRIPT ARGS``); returns the
    CompletedProcess with text output. Ranks default to one thread each."""
    target = [str(script)] if script is not None else ["-m", "mmzoo"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(ranks),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *target,
        *args,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)


def metrics(output_dir: Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` (rank 0 writes them with global numbers)."""
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
