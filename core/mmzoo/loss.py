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

import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

import mmzoo_kernels
from mmzoo_kernels.chunked import CHUNK_TOKENS

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
    if _vocab_sharded(output_weight):  # tensor parallel: each rank holds rows of the vocabulary
        losses = vocab_parallel_cross_entropy(hidden.index_select(0, valid), output_weight, target[valid])
    else:
        losses = mmzoo_kernels.cross_entropy(
            hidden.index_select(0, valid), output_weight, target[valid]
        )  # (N,) fp32
    return (losses * weight[valid]).sum()


def _vocab_sharded(weight: torch.Tensor) -> bool:
    # A DTensor exists only once torch.distributed.tensor is imported.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(weight, module.DTensor) and weight.placements[-1].is_shard(0)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``hidden @ shard.T`` over a vocabulary split across the ranks of ``group``.

    Each rank holds the logits of its rows only, a chunk of tokens at a time (as
    ``mmzoo_kernels``' chunked kernel): the log-sum-exp comes from every rank's local one
    (all-gathered), the target's logit from the rank that owns it (all-reduced). Backward
    recomputes each chunk's logits; the gradient of ``hidden`` is summed over the ranks, that of
    the shard is this rank's rows.
    """

    @staticmethod
    def forward(ctx, hidden, shard, target, vocab_start, group):  # type: ignore[override]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        local = target - vocab_start
        owned = (local >= 0) & (local < shard.shape[0])
        local = local.masked_fill(~owned, 0)
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        picked = torch.zeros_like(lse)
        for start in range(0, hidden.shape[0], CHUNK_TOKENS):
            end = start + CHUNK_TOKENS
            logits = (hidden[start:end] @ shard.t()).to(acc)  # (chunk, V / tp)
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            picked[start:end] = logits.gather(1, local[start:end, None]).squeeze(1)
            del logits
        ranks = dist.get_world_size(group)
        every = lse.new_empty(ranks * lse.shape[0])
        dist.all_gather_into_tensor(every, lse, group=group)
        lse = torch.logsumexp(every.view(ranks, lse.shape[0]), dim=0)  # over the ranks' shards
        picked = picked.masked_fill(~owned, 0.0)
        dist.all_reduce(picked, group=group)
        ctx.save_for_backward(hidden, shard, local, owned, lse)
        ctx.group = group
        return lse - picked

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        hidden, shard, local, owned, lse = ctx.saved_tensors
        scale = grad_loss.to(lse.dtype)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(shard.shape, dtype=lse.dtype, device=shard.device)
        for start in range(0, hidden.shape[0], CHUNK_TOKENS):
            end = start + CHUNK_TOKENS
            h = hidden[start:end]
            probs = (h @ shard.t()).to(lse.dtype)  # (chunk, V / tp), turned into the gradient in place
            probs.sub_(lse[start:end, None]).exp_().mul_(scale[start:end, None])
            probs.scatter_add_(1, local[start:end, None], -(scale * owned)[start:end, None])
            grad_logits = probs.to(hidden.dtype)
            del probs
            torch.matmul(grad_logits, shard, out=grad_h[start:end])
            grad_w += grad_logits.t().to(lse.dtype) @ h.to(lse.dtype)
        dist.all_reduce(grad_h, group=ctx.group)  # every vocabulary shard's part of d loss / d hidden
        return grad_h, grad_w.to(shard.dtype), None, None, None


def vocab_parallel_cross_entropy(
    hidden: torch.Tensor, output_weight: Any, target: torch.Tensor
) -> torch.Tensor:
    """Per-token cross-entropy ``(N,)`` fp32 against ``target`` (all valid) with ``output_weight`` a
    DTensor split along the vocabulary over a 1-D tensor-parallel mesh; no rank gathers the logits.

    ``hidden`` ``(N, H)`` is the same on every rank of the mesh (the loss is, too); the gradient
    it gets is summed over the vocabulary shards.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = output_weight.device_mesh
    _, offset = compute_local_shape_and_global_offset(output_weight.shape, mesh, output_weight.placements)
    shard = output_weight.to_local()
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, shard = hidden.to(dtype), shard.to(dtype)
    with torch.autocast(device, enabled=False):
        return _VocabParallelCrossEntropy.apply(hidden, shard, target, offset[0], mesh.get_group())


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
