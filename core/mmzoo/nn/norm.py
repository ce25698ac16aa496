"""Norms over the last dimension (statistics in fp32), through ``mmzoo_kernels``, and their factory."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

import mmzoo_kernels

NormKind = Literal["rms", "layer"]


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 (``weight``)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mmzoo_kernels.rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    """LayerNorm with a bias, statistics in fp32 (``weight``, ``bias``: ``nn.LayerNorm``'s names)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mmzoo_kernels.layer_norm(x, self.weight, self.bias, self.eps)


def build_norm(kind: NormKind, hidden_size: int, eps: float = 1e-6) -> RMSNorm | LayerNorm:
    """A norm of ``kind``: ``"rms"`` (:class:`RMSNorm`) or ``"layer"`` (:class:`LayerNorm`, with bias)."""
    if kind == "rms":
        return RMSNorm(hidden_size, eps)
    if kind == "layer":
        return LayerNorm(hidden_size, eps)
    raise ValueError(f"norm kind must be one of {', '.join(get_args(NormKind))}, got {kind!r}")
