"""PyTorch's own fused kernels where the reference spells an op out in several steps."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Same contract as :func:`mmzoo_kernels.reference.layer_norm`, as one ``F.layer_norm`` call.

    It runs in the result dtype of ``x`` and ``weight`` (fp32 for bf16 inputs with fp32
    weights); its statistics are fp32 for bf16/fp16 inputs too, and it rounds once, not twice.
    """
    dtype = torch.result_type(x, weight)
    return F.layer_norm(
        x.to(dtype), x.shape[-1:], weight.to(dtype), None if bias is None else bias.to(dtype), eps
    )
