"""The ops models call; each dispatches to the implementation chosen for this process."""

from __future__ import annotations

import torch

from mmzoo_kernels.registry import get


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """Variable-length attention, ``(T, Hq, D)`` in and out; see ``reference.attention``."""
    return get("attention").fn(q, k, v, cu_seqlens, causal, q.shape[-1] ** -0.5 if scale is None else scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension."""
    return get("rms_norm").fn(x, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary angles ``(T, D)`` to ``x`` ``(T, H, D)``."""
    return get("rotary").fn(x, cos, sin)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate; up]``."""
    return get("swiglu").fn(x)
