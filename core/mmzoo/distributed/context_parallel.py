"""Ulysses context parallel: each rank of a ``cp`` group holds 1/cp of a micro-batch's tokens.

All ranks of a context-parallel group read the same micro-batch and run the whole embedding
(vision encoder included) on it. :meth:`ContextParallel.shard` then pads the packed tokens
``(T, H)`` to a multiple of ``cp`` (the padding is one sequence of its own with no targets) and
keeps this rank's contiguous ``T / cp`` tokens, with their position ids and their loss targets
and weights, which :func:`mmzoo.loss.loss_targets` computed on the whole sequences first. Around
each decoder attention core :meth:`ContextParallel.attention` trades token shards for head shards
with an all-to-all, ``(T/cp, heads, D) -> (T, heads/cp, D)``, attends over the global
``cu_seqlens`` (every rank sees whole sequences for its heads), and trades back. The ranks' losses
add up to the micro-batch loss and FSDP sums their gradients over ``dp_shard x cp``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import mmzoo_kernels
from mmzoo.errors import MmzooError
from mmzoo.loss import IGNORE_INDEX, causal_lm_loss
from mmzoo.model import VLModel
from mmzoo.nn.layers import SelfAttention
from mmzoo.nn.recompute import LayerStack


@dataclass(frozen=True)
class TokenShard:
    """One rank's slice of a packed micro-batch; ``cu_seqlens`` stays global (padding included)."""

    embeds: torch.Tensor  # (T/cp, H)
    position_ids: torch.Tensor  # (rows, T/cp)
    cu_seqlens: torch.Tensor  # (S + 1,) or (S + 2,) with the padding's own sequence
    target: torch.Tensor  # (T/cp,)
    weight: torch.Tensor  # (T/cp,)


class ContextParallel:
    """This rank's context-parallel group: the token slicing and the all-to-all attention.

    ``split`` is how many ways each rank's slice is split again (tensor-parallel ranks under
    sequence parallel): tokens are padded to a multiple of ``size * split`` so that split needs no
    padding of its own, which would break the slices' global order.
    """

    def __init__(self, group: dist.ProcessGroup, split: int = 1) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.split = split

    def bucket(self, tokens: int) -> int:
        """``tokens`` rounded up to a multiple of ``size * split``: what the ranks' slices cover."""
        return tokens + -tokens % (self.size * self.split)

    def shard(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor,
        length: int | None = None,
    ) -> TokenShard:
        """This rank's contiguous slice of the packed tokens, padded to :meth:`bucket` tokens.

        Args:
            embeds: ``(T, H)`` embeddings, media features scattered in.
            position_ids: ``(rows, T)`` computed on the whole sequences.
            cu_seqlens: ``(S + 1,)`` sequence boundaries.
            target, weight: ``(T,)`` from :func:`mmzoo.loss.loss_targets` on the whole sequences.
            length: pad to this many tokens instead (a :meth:`bucket` length, at least ``T``): the
                pipeline's static shapes.
        """
        tokens = embeds.shape[0]
        pad = (length or self.bucket(tokens)) - tokens
        if pad:  # a sequence of its own: it attends only to itself and has no targets
            cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor([tokens + pad])])
        local = slice(self.rank * (tokens + pad) // self.size, (self.rank + 1) * (tokens + pad) // self.size)
        return TokenShard(
            embeds=F.pad(embeds, (0, 0, 0, pad))[local],
            position_ids=F.pad(position_ids, (0, pad))[:, local],
            cu_seqlens=cu_seqlens,
            target=F.pad(target, (0, pad), value=IGNORE_INDEX)[local],
            weight=F.pad(weight, (0, pad))[local],
        )

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool
    ) -> torch.Tensor:
        """:func:`mmzoo_kernels.attention` over the group's whole sequences: ``q`` ``(T/cp, Hq, D)``,
        ``k``/``v`` ``(T/cp, Hkv, D)`` in, ``(T/cp, Hq, D)`` out.

        One all-to-all carries q, k and v to head shards and one carries the output back. KV heads
        not divisible by ``cp`` are repeated until they are (``cp / gcd(Hkv, cp)`` times): the
        key/value traffic and the attention's K/V memory grow by that factor.
        """
        repeat = self.size // math.gcd(k.shape[1], self.size)
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        heads = [x.shape[1] // self.size for x in (q, k, v)]
        q, k, v = self._to_heads(q, k, v).split(heads, dim=1)  # (T, heads / cp, D) each
        return self._to_tokens(mmzoo_kernels.attention(q, k, v, cu_seqlens, causal))

    def _to_heads(self, *parts: torch.Tensor) -> torch.Tensor:
        """``(T/cp, heads_i, D)`` each -> ``(T, sum(heads_i)/cp, D)``: rank r keeps block r of each
        part's heads, for all tokens."""
        tokens, d = parts[0].shape[0], parts[0].shape[2]
        blocks = torch.cat([p.reshape(tokens, self.size, -1, d) for p in parts], dim=2)
        blocks = blocks.transpose(0, 1).contiguous()  # (cp, T/cp, heads/cp, D): block j goes to rank j
        out = _AllToAll.apply(blocks, self.group)
        return out.flatten(0, 1)  # (T, heads/cp, D): rank i's tokens are block i

    def _to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(T, Hq/cp, D)`` -> ``(T/cp, Hq, D)``, the inverse of :meth:`_to_heads`."""
        _, heads, d = x.shape
        blocks = x.reshape(self.size, -1, heads, d)  # (cp, T/cp, Hq/cp, D): block j goes to rank j
        out = _AllToAll.apply(blocks, self.group)
        return out.transpose(0, 1).reshape(-1, heads * self.size, d)  # head block i from rank i


class _AllToAll(torch.autograd.Function):
    """Block ``j`` of ``x`` ``(cp, ...)`` goes to rank ``j``; block ``i`` of the result came from rank
    ``i``. The exchange is its own transpose, so the backward pass is the same exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return _exchange(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _exchange(grad, ctx.group), None


def _exchange(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def apply_context_parallel(model: VLModel, group: dist.ProcessGroup, split: int = 1) -> ContextParallel:
    """Make ``model``'s forward slice its tokens over ``group`` and its text decoder's attention
    trade shards with an all-to-all; the vision encoder runs whole on every rank. ``split``: see
    :class:`ContextParallel`."""
    if model.loss_fn is not causal_lm_loss:
        raise MmzooError(
            f"parallel.cp: model '{model.name}' has a loss of its own; context parallel computes "
            "mmzoo.loss.causal_lm_loss per slice of tokens, so set parallel.cp=1"
        )
    attentions = [m for m in model.text_decoder.modules() if isinstance(m, SelfAttention)]
    stack = getattr(model.text_decoder, "decoder", None)
    no_layers = isinstance(stack, LayerStack) and not stack.layers  # a pipeline stage's empty share
    if not attentions and not no_layers:
        raise MmzooError(
            f"parallel.cp: the text decoder of '{model.name}' has no mmzoo SelfAttention to run "
            "the all-to-all around; use the native text decoder or set parallel.cp=1"
        )
    context_parallel = ContextParallel(group, split)
    model.context_parallel = context_parallel
    for attention in attentions:
        attention.context_parallel = context_parallel
    return context_parallel
