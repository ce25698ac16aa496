"""Dataclass configs shared by the commands (the data part; training adds its own)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DataConfig:
    """Where the training records are and how they become batches.

    Attributes:
        data: JSON/JSONL files, comma-separated.
        dataset_dir: base of relative media paths (default: each data file's directory).
        max_samples: keep at most this many records per data file.
        seq_length: tokens per packed row (or the longest padded row).
        packing: pack samples into rows with ``cu_seqlens`` (else pad each sample).
        train_on_prompt: train on prompt tokens too (media tokens never).
        mask_history: train only the last assistant turn.
        strict: fail at the first bad record instead of skipping it.
        cache_dir: keep preprocessed samples here (None: no cache).
        media: options for the family's media processor (min_pixels, max_pixels, fps, ...).
    """

    data: str = ""
    dataset_dir: str | None = None
    max_samples: int | None = None
    seq_length: int = 2048
    packing: bool = True
    train_on_prompt: bool = False
    mask_history: bool = False
    strict: bool = False
    cache_dir: str | None = None
    media: dict[str, Any] = field(default_factory=dict)
