"""Pure-PyTorch reference implementations: the numerical truth every backend is tested against."""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool, scale: float
) -> torch.Tensor:
    """Variable-length attention over packed sequences.

    Args:
        q: ``(T, Hq, D)``; k, v: ``(T, Hkv, D)`` with ``Hq % Hkv == 0`` (GQA).
        cu_seqlens: ``(S + 1,)`` cumulative sequence starts; tokens never attend across them.
        causal: mask future tokens within each sequence.
        scale: softmax scale, usually ``D ** -0.5``.

    Returns:
        ``(T, Hq, D)``.
    """
    groups = q.shape[1] // k.shape[1]
    outs = []
    for start, end in pairwise(cu_seqlens.tolist()):
        if end == start:
            continue
        qs = q[start:end].transpose(0, 1)  # (Hq, L, D)
        ks = k[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        vs = v[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        scores = torch.matmul(qs, ks.transpose(1, 2)) * scale  # (Hq, L, L)
        if causal:
            length = end - start
            future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        outs.append(torch.matmul(probs, vs).transpose(0, 1))
    return torch.cat(outs) if outs else torch.empty_like(q)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, scaled by ``weight`` in the input dtype."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension computed in fp32, scaled and shifted in the input dtype."""
    dtype = x.dtype
    x32 = x.float()
    centred = x32 - x32.mean(-1, keepdim=True)
    x32 = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * x32.to(dtype)
    return out if bias is None else out + bias


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(T, H, D)`` by angles given as ``cos``/``sin`` ``(T, D)`` (half-split layout)."""
    cos = cos.unsqueeze(-2)
    sin = sin.unsqueeze(-2)
    return x * cos + _rotate_half(x) * sin


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate; up]`` along the last dimension."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU: exact (``approximate="none"``, the normal CDF) or its ``"tanh"`` approximation."""
    return F.gelu(x, approximate=approximate)


def cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy through the full ``(N, V)`` logits (the naive path)."""
    logits = hidden @ weight.t()  # (N, V)
    return F.cross_entropy(logits.float(), targets, reduction="none", ignore_index=-100)
