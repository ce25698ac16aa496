"""Language-model loss on packed tokens, with the three reductions of the field.

Per micro-batch ``m`` of the micro-batches ``M`` in one optimizer step (all ranks):

- ``default``: mean over micro-batches of [token-loss sum in m / target tokens in m]
- ``per_sample``: mean over all samples of [token-loss mean within the sample]
- ``per_token``: token-loss sum over all micro-batches / all target tokens

Each micro-batch's loss is pre-scaled so that summing the micro-batch losses (and their
gradients) over the step gives the reduction; only ``per_token`` is invariant to how a
global batch is split into micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

import mmzoo_kernels

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossReduction:
    """How a micro-batch's token losses are reduced.

    Attributes:
        kind: ``default``, ``per_sample`` or ``per_token``.
        micro_batches: micro-batches in the optimizer step (``default``).
        total_tokens: target tokens in the whole step (``per_token``).
        total_samples: samples with at least one target in the whole step (``per_sample``).
    """

    kind: Literal["default", "per_sample", "per_token"] = "default"
    micro_batches: int = 1
    total_tokens: int = 0
    total_samples: int = 0


def shift_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Next-token targets for packed ``labels`` ``(T,)``; the last token of each sequence gets none."""
    target = labels.roll(-1)
    target[cu_seqlens[1:].long() - 1] = IGNORE_INDEX
    return target


def target_counts(labels: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[int, int]:
    """(target tokens, samples with at least one target) of packed ``labels`` ``(T,)``."""
    valid = (shift_labels(labels, cu_seqlens) != IGNORE_INDEX).long()
    per_sample = torch.segment_reduce(valid.float(), "sum", offsets=cu_seqlens.long())
    return int(valid.sum()), int((per_sample > 0).sum())


def batch_target_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """:func:`target_counts` of a collated batch, packed (``cu_seqlens``) or padded (``attention_mask``)."""
    labels = batch["labels"]
    if "cu_seqlens" in batch:
        return target_counts(labels[0], batch["cu_seqlens"])
    mask = batch.get("attention_mask", torch.ones_like(labels)).bool()
    lengths = mask.sum(dim=1)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0))
    return target_counts(labels[mask], cu_seqlens)


def causal_lm_loss(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    labels: torch.Tensor,
    cu_seqlens: torch.Tensor,
    reduction: LossReduction | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy, reduced as ``reduction`` says (plain token mean when None).

    Logits are computed only for tokens that have a target (answers are a small part of most
    multimodal samples), and through ``mmzoo_kernels.cross_entropy`` (``kernels.cross_entropy``),
    whose default ``chunked`` backend computes them a chunk of tokens at a time, fused with the
    output projection, so no ``(tokens x vocab)`` matrix exists in training.

    Args:
        hidden: ``(T, H)`` final hidden states of packed tokens.
        output_weight: ``(V, H)`` output projection (the embedding when tied).
        labels: ``(T,)`` aligned with the inputs (shifted here, never across sequences).
        cu_seqlens: ``(S + 1,)`` sequence boundaries.
        reduction: the step's reduction and its global counts.
    """
    target = shift_labels(labels, cu_seqlens)
    valid = (target != IGNORE_INDEX).nonzero().squeeze(1)
    # (N,) fp32; the ``chunked`` kernel (auto) never holds the (N, V) logits of the targets either
    losses = mmzoo_kernels.cross_entropy(hidden.index_select(0, valid), output_weight, target[valid])
    if reduction is None:
        return losses.sum() / max(valid.numel(), 1)
    if reduction.kind == "default":
        return losses.sum() / max(valid.numel(), 1) / reduction.micro_batches
    if reduction.kind == "per_token":
        return losses.sum() / max(reduction.total_tokens, 1)
    samples = cu_seqlens.numel() - 1
    owner = torch.searchsorted(cu_seqlens[1:].long(), valid, right=True)  # sample of each target
    sums = losses.new_zeros(samples).index_add_(0, owner, losses)
    counts = losses.new_zeros(samples).index_add_(0, owner, torch.ones_like(losses))
    means = sums / counts.clamp(min=1)  # samples without targets contribute 0
    return means.sum() / max(reduction.total_samples, 1)
