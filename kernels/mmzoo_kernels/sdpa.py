"""Attention through ``torch.nn.functional.scaled_dot_product_attention`` (CPU and CUDA)."""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool, scale: float
) -> torch.Tensor:
    """Same contract as :func:`mmzoo_kernels.reference.attention`, one SDPA call per sequence."""
    gqa = q.shape[1] != k.shape[1]
    outs = []  # concatenated once: slice assignment would zero-fill a full tensor per sequence in backward
    for start, end in pairwise(cu_seqlens.tolist()):
        if end == start:
            continue
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1).unsqueeze(0),
            k[start:end].transpose(0, 1).unsqueeze(0),
            v[start:end].transpose(0, 1).unsqueeze(0),
            is_causal=causal,
            scale=scale,
            enable_gqa=gqa,
        )
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs) if outs else torch.empty_like(q)
