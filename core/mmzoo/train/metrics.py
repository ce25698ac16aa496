"""Training metrics: ``metrics.jsonl`` (one object per optimizer step) and TensorBoard when installed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


class MetricsLog:
    """Appends one JSON line per step and mirrors scalars to TensorBoard.

    Args:
        output_dir: where ``metrics.jsonl`` and ``tensorboard/`` go.
        tensorboard: write TensorBoard events if the ``tensorboard`` package is importable.
        start_step: the step the run starts after (the resumed checkpoint's, 0 for a fresh run).
            Rows of later steps already in ``metrics.jsonl`` (an earlier run in the same
            directory, or steps after the checkpoint that are about to be redone) are dropped,
            so the file holds one row per step of this run's history.
    """

    def __init__(self, output_dir: Path, tensorboard: bool = True, start_step: int = 0) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / METRICS
        kept = []
        if start_step > 0 and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):  # a torn last line of a killed run
                    continue
        self._file = open(self.path, "w", buffering=1)  # noqa: SIM115 - closed in close()
        self._file.writelines(kept)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self._tb = SummaryWriter(str(output_dir / TENSORBOARD))

    @property
    def tensorboard_dir(self) -> Path | None:
        return None if self._tb is None else Path(self._tb.log_dir)

    def log(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
