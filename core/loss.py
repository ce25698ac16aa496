"""Default language-model loss on packed tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Next-token targets for packed ``labels`` ``(T,)``; the last token of each sequence gets none."""
    target = labels.roll(-1)
    target[cu_seqlens[1:].long() - 1] = IGNORE_INDEX
    return target


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over tokens whose label is not ``-100``.

    Args:
        logits: ``(T, V)`` for packed tokens.
        labels: ``(T,)`` aligned with the inputs (shifted here, never across sequences).
        cu_seqlens: ``(S + 1,)`` sequence boundaries.
    """
    target = shift_labels(labels, cu_seqlens)
    valid = (target != IGNORE_INDEX).sum()
    loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / valid.clamp(min=1)
