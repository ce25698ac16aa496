"""The ops models call; each dispatches to the implementation chosen for its tensors' device.

Shapes follow the packed (remove-padding) layout: tokens of all sequences in one dimension
``T``, sequence boundaries in ``cu_seqlens``. :func:`unpad` / :func:`pad` convert to and from
a padded ``(B, S, ...)`` batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmzoo_kernels.registry import get

IGNORE_INDEX = -100


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """Variable-length attention, ``(T, Hq, D)`` in and out; see ``reference.attention``.

    Causal for decoders, bidirectional for the ViT; window attention is this op over the
    window ``cu_seqlens``. ``k``/``v`` may have fewer heads than ``q`` (GQA).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return get("attention", q.device.type).fn(q, k, v, cu_seqlens, causal, scale)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary angles ``cos``/``sin`` ``(T, D)`` to ``x`` ``(T, H, D)`` (half-split layout).

    The angles carry the variant: 1-D positions, M-RoPE sections (``mmzoo.nn.rotary``) or 2-D
    vision positions; applying them is the same op. No gradient flows into ``cos``/``sin``
    in the fused backends (they are computed from position ids).
    """
    return get("rotary", x.device.type).fn(x, cos, sin)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (statistics in fp32)."""
    return get("rms_norm", x.device.type).fn(x, weight, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension (statistics in fp32); ``bias`` may be ``None``."""
    return get("layer_norm", x.device.type).fn(x, weight, bias, eps)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU, exact (``"none"``) or with the ``"tanh"`` approximation."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    return get("gelu", x.device.type).fn(x, approximate)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate; up]`` along the last dimension."""
    return get("swiglu", x.device.type).fn(x)


def cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of ``hidden @ weight.T`` against ``targets``, fused with the projection.

    Args:
        hidden: ``(N, H)`` hidden states of the tokens that have a target.
        weight: ``(V, H)`` output projection.
        targets: ``(N,)`` token ids; ``IGNORE_INDEX`` (-100) gives loss 0 and no gradient.

    Returns:
        ``(N,)`` fp32 losses. The ``chunked`` backend never holds the ``(N, V)`` logits.
    """
    return get("cross_entropy", hidden.device.type).fn(hidden, weight, targets)


def call(op: str, *args: Any, **kwargs: Any) -> Any:
    """Run any registered op (a plugin's own too) through the implementation chosen for it on the
    device of its first tensor argument (``cpu`` when there is none)."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    return get(op, tensors[0].device.type if tensors else "cpu").fn(*args, **kwargs)


def unpad(
    x: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Drop padding: ``x`` ``(B, S, ...)`` -> packed ``(T, ...)``.

    Args:
        x: padded batch.
        attention_mask: ``(B, S)``, nonzero at real tokens (padding anywhere in a row).

    Returns:
        ``(packed, indices, cu_seqlens, max_seqlen)``: ``indices`` ``(T,)`` into the flattened
        ``B * S`` positions (for :func:`pad`), ``cu_seqlens`` ``(B + 1,)`` int32.
    """
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1, dtype=torch.int32)
    indices = mask.flatten().nonzero().squeeze(1)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    packed = x.flatten(0, 1).index_select(0, indices)
    return packed, indices, cu_seqlens, int(lengths.max()) if lengths.numel() else 0


def pad(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`unpad`: packed ``(T, ...)`` -> ``(batch, seqlen, ...)``, zeros at padding."""
    out = packed.new_zeros(batch * seqlen, *packed.shape[1:])
    out = out.index_put((indices,), packed)  # out of place, so autograd flows back into ``packed``
    return out.view(batch, seqlen, *packed.shape[1:])
