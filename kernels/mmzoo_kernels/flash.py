"""Attention through flash-attn's varlen kernel (CUDA, fp16/bf16; ``pip install flash-attn``)."""

from __future__ import annotations

import importlib.util

import torch

from mmzoo_kernels import sdpa


def unavailable() -> str | None:
    if importlib.util.find_spec("flash_attn") is None:
        return "package flash-attn is not installed (pip install flash-attn)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool, scale: float
) -> torch.Tensor:
    """Same contract as :func:`mmzoo_kernels.reference.attention` via ``flash_attn_varlen_func``.

    flash-attn has no fp32 kernel: under autocast the inputs are cast to its dtype (as autocast
    does for SDPA); fp32 inputs without autocast go through SDPA instead. GQA is native.
    """
    if torch.is_autocast_enabled("cuda"):  # as autocast does for SDPA: run in the autocast dtype
        dtype = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        return sdpa.attention(q, k, v, cu_seqlens, causal, scale)
    from flash_attn import flash_attn_varlen_func

    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return flash_attn_varlen_func(
        q, k, v, cu, cu, max_len, max_len, dropout_p=0.0, softmax_scale=scale, causal=causal
    )
