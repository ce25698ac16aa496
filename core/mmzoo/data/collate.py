"""Samples into batches: packed rows with ``cu_seqlens`` (the default) or padded rows.

Every batch carries media, so every data-parallel rank runs the vision encoder each step: a
batch without any gets the family's dummy sample (one tiny image, no loss) appended.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mmzoo.loss import IGNORE_INDEX


@dataclass
class Sample:
    """One tokenised training sample with its media.

    Attributes:
        input_ids, labels: ``(L,)`` long; labels are ``-100`` where there is no loss.
        position_ids: ``(rows, L)`` (three rows for M-RoPE), computed for this sample alone.
        media: the sample's media batch (the family's tensors, e.g. pixels and patch grids).
        source: ``file:line`` of the record it came from.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    media: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def has_media(self) -> bool:
        return bool(self.media)


def pack(lengths: Sequence[int], seq_length: int) -> list[list[int]]:
    """Group sample indices into rows of at most ``seq_length`` tokens, keeping their order.

    Greedy: a sample opens a new row when it does not fit in the current one. Samples longer
    than ``seq_length`` must have been truncated or dropped before.
    """
    rows: list[list[int]] = []
    used = seq_length + 1
    for index, length in enumerate(lengths):
        if length > seq_length:
            raise ValueError(f"sample {index} has {length} tokens, more than seq_length {seq_length}")
        if used + length > seq_length:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += length
    return rows


def concat_media(media: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The media batches of several samples as one: each tensor concatenated along dim 0 in
    sample order (the family's media keys are all laid out that way)."""
    keys = list(dict.fromkeys(key for m in media for key in m))
    return {key: _cat([m[key] for m in media if key in m]) for key in keys}


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    # torch.cat copies even a single tensor: ~7 ms for one large image's patches.
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def collate_left_padded(samples: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Left-padded rows for generation: ``input_ids``, ``attention_mask`` and the samples' media.

    Each sample maps ``input_ids`` (a list or 1-D tensor), ``media`` (its media batch, optional)
    and, optionally, ``position_ids`` ``(rows, L)``: when every sample has them, the batch gets
    ``position_ids`` ``(rows, B, S)``, 0 on padding.
    """
    length = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[row, length - n :] = torch.as_tensor(s["input_ids"])
        mask[row, length - n :] = 1
    batch: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": mask,
        "media": concat_media([s.get("media", {}) for s in samples]),
    }
    if all("position_ids" in s for s in samples):
        positions = torch.zeros(samples[0]["position_ids"].shape[0], *ids.shape, dtype=torch.long)
        for row, s in enumerate(samples):
            positions[:, row, length - len(s["input_ids"]) :] = s["position_ids"]
        batch["position_ids"] = positions
    return batch


def _with_dummy(samples: Sequence[Sample], dummy: Sample | None) -> list[Sample]:
    samples = list(samples)
    if dummy is not None and not any(s.has_media for s in samples):
        samples.append(dummy)
    return samples


def collate_packed(samples: Sequence[Sample], dummy: Sample | None = None) -> dict[str, Any]:
    """One packed row: ``input_ids`` ``(1, T)``, ``position_ids`` ``(rows, 1, T)``, ``cu_seqlens``.

    Each sample keeps its own position ids (restarting at 0) and its labels never cross into
    the next sample (the loss shifts within ``cu_seqlens``).
    """
    samples = _with_dummy(samples, dummy)
    lengths = torch.tensor([len(s) for s in samples])
    return {
        "input_ids": torch.cat([s.input_ids for s in samples]).unsqueeze(0),
        "labels": torch.cat([s.labels for s in samples]).unsqueeze(0),
        "position_ids": torch.cat([s.position_ids for s in samples], dim=1).unsqueeze(1),
        "cu_seqlens": F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)),
        "media": concat_media([s.media for s in samples]),
    }


def collate_padded(
    samples: Sequence[Sample], pad_token_id: int, dummy: Sample | None = None
) -> dict[str, Any]:
    """Right-padded rows with ``attention_mask``; a dummy sample rides at the end of row 0.

    Appending the dummy after row 0's last token changes nothing for the real tokens: attention
    is causal and the dummy's labels are ``-100``.
    """
    media_samples = _with_dummy(samples, dummy)
    rows = [[s] for s in samples]
    rows[0].extend(media_samples[len(samples) :])
    width = max(sum(len(s) for s in row) for row in rows)
    n_rows = len(rows)
    position_rows = samples[0].position_ids.shape[0]
    batch: dict[str, Any] = {
        "input_ids": torch.full((n_rows, width), pad_token_id, dtype=torch.long),
        "labels": torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros(n_rows, width, dtype=torch.long),
        "position_ids": torch.zeros(position_rows, n_rows, width, dtype=torch.long),
    }
    for r, row in enumerate(rows):
        start = 0
        for s in row:
            end = start + len(s)
            batch["input_ids"][r, start:end] = s.input_ids
            batch["labels"][r, start:end] = s.labels
            batch["attention_mask"][r, start:end] = 1
            batch["position_ids"][:, r, start:end] = s.position_ids
            start = end
    return {**batch, "media": concat_media([s.media for s in media_samples])}


def batch_to(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """``batch`` with every tensor, those of its media batch included, on ``device``."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, Mapping):
            out[key] = batch_to(value, device)
        else:
            out[key] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
    return out
