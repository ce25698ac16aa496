"""Ascend NPU kernels through ``torch_npu`` (UNVERIFIED on hardware: no NPU was available).

Thin wrappers over the documented signatures:

- ``npu_fusion_attention(q, k, v, head_num, "TND", atten_mask=, scale=, sparse_mode=,
  actual_seq_qlen=, actual_seq_kvlen=)``: packed ``(T, N, D)`` tokens, the cumulative ends of
  the sequences (``cu_seqlens[1:]``) as host lists; causal uses ``sparse_mode=3`` with the
  2048 x 2048 compressed upper-triangular mask the documentation prescribes.
- ``npu_rotary_mul(x, cos, sin)`` on ``(1, T, H, D)`` with angles ``(1, T, 1, D)``.
- ``npu_rms_norm(x, gamma, epsilon=)[0]``; ``npu_swiglu(x, dim=-1)`` (``silu(A) * B`` of halves).
"""

from __future__ import annotations

import importlib.util
from itertools import pairwise

import torch

_masks: dict[torch.device, torch.Tensor] = {}


def unavailable() -> str | None:
    if importlib.util.find_spec("torch_npu") is None:
        return "package torch_npu is not installed (Ascend's PyTorch adapter)"
    import torch_npu  # noqa: F401  (registers torch.npu)

    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available():
        return "no Ascend NPU device"
    return None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool, scale: float
) -> torch.Tensor:
    import torch_npu

    bounds = [int(e) for e in cu_seqlens.tolist()]  # host ints, as TND requires
    ends = [end for start, end in pairwise(bounds) if end > start]  # empty sequences dropped
    mask = None
    if causal:
        mask = _masks.get(q.device)
        if mask is None:
            mask = torch.ones(2048, 2048, dtype=torch.bool, device=q.device).triu(1)
            _masks[q.device] = mask
    out = torch_npu.npu_fusion_attention(
        q,
        k,
        v,
        q.shape[1],
        "TND",
        atten_mask=mask,
        scale=scale,
        sparse_mode=3 if causal else 0,
        actual_seq_qlen=ends,
        actual_seq_kvlen=ends,
    )
    return out[0]


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    import torch_npu

    out = torch_npu.npu_rotary_mul(x.unsqueeze(0), cos[None, :, None, :], sin[None, :, None, :])
    return out[0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    import torch_npu

    return torch_npu.npu_rms_norm(x, weight, epsilon=eps)[0].to(torch.result_type(x, weight))


def swiglu(x: torch.Tensor) -> torch.Tensor:
    import torch_npu

    return torch_npu.npu_swiglu(x.contiguous(), dim=-1)
