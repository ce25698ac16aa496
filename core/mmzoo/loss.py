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


def loss_targets(
    labels: torch.Tensor, cu_seqlens: torch.Tensor, reduction: LossReduction | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's next-token target and its weight in the micro-batch's loss.

    The loss is ``sum(token_loss * weight)``: a linear sum over tokens, so any split of the tokens
    (context-parallel slices, pipeline stages) adds up to it. Weights come from whole sequences:
    compute them before slicing.

    Args:
        labels: ``(T,)`` packed, aligned with the inputs (shifted here, never across sequences).
        cu_seqlens: ``(S + 1,)`` sequence boundaries.
        reduction: the step's reduction and its global counts (plain token mean when None).

    Returns:
        ``target`` ``(T,)`` (``IGNORE_INDEX`` where none) and ``weight`` ``(T,)`` fp32 (0 there).
    """
    target = shift_labels(labels, cu_seqlens)
    valid = target != IGNORE_INDEX
    count = max(int(valid.sum()), 1)
    if reduction is None or reduction.kind == "default":
        micro_batches = 1 if reduction is None else reduction.micro_batches
        per_token = torch.full(target.shape, 1.0 / count / micro_batches, device=target.device)
    elif reduction.kind == "per_token":
        per_token = torch.full(target.shape, 1.0 / max(reduction.total_tokens, 1), device=target.device)
    else:  # per_sample: each target weighs 1 / (its sample's targets) / (samples in the step)
        lengths = cu_seqlens.diff().long()
        per_sample = torch.segment_reduce(valid.float(), "sum", lengths=lengths)
        per_token = (1.0 / per_sample.clamp(min=1)).repeat_interleave(lengths)
        per_token = per_token / max(reduction.total_samples, 1)
    return target, torch.where(valid, per_token, 0.0)


def weighted_cross_entropy(
    hidden: torch.Tensor, output_weight: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """``sum(cross_entropy(hidden @ output_weight.T, target) * weight)`` over the tokens with a target.

    Logits are computed only for tokens that have a target (answers are a small part of most
    multimodal samples), and through ``mmzoo_kernels.cross_entropy`` (``kernels.cross_entropy``),
    whose default ``chunked`` backend computes them a chunk of tokens at a time, fused with the
    output projection, so no ``(tokens x vocab)`` matrix exists in training.
    """
    valid = (target != IGNORE_INDEX).nonzero().squeeze(1)
    losses = mmzoo_kernels.cross_entropy(
        hidden.index_select(0, valid), output_weight, target[valid]
    )  # (N,) fp32
    return (losses * weight[valid]).sum()


def causal_lm_loss(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    labels: torch.Tensor,
    cu_seqlens: torch.Tensor,
    reduction: LossReduction | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy, reduced as ``reduction`` says (plain token mean when None):
    :func:`weighted_cross_entropy` with the weights of :func:`loss_targets`.

    Args:
        hidden: ``(T, H)`` final hidden states of packed tokens.
        output_weight: ``(V, H)`` output projection (the embedding when tied).
        labels: ``(T,)`` aligned with the inputs (shifted here, never across sequences).
        cu_seqlens: ``(S + 1,)`` sequence boundaries.
        reduction: the step's reduction and its global counts.
    """
    target, weight = loss_targets(labels, cu_seqlens, reduction)
    return weighted_cross_entropy(hidden, output_weight, target, weight)
