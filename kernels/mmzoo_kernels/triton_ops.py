"""Fused RMSNorm and rotary apply in Triton (CUDA; ``pip install triton``, shipped with CUDA torch).

Each is one kernel launch per op in forward and one in backward, instead of the half-dozen
elementwise kernels of the reference. No gradient flows into the rotary ``cos``/``sin``.

With ``TRITON_INTERPRET=1`` in the environment (set before the first kernel call), Triton runs
the same kernels in its interpreter on CPU tensors: slow, but it checks the kernels' indexing,
masking and arithmetic on a machine without a GPU (``tests/test_kernels.py`` does).
"""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "") in ("1", "true", "True")


def devices() -> tuple[str, ...]:
    """Device types the kernels run on: ``cuda``, and ``cpu`` under the interpreter."""
    return ("cuda", "cpu") if interpreting() else ("cuda",)


def unavailable() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "package triton is not installed"
    if not (torch.cuda.is_available() or interpreting()):
        return "no CUDA device"
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same contract as :func:`mmzoo_kernels.reference.rms_norm`."""
    from mmzoo_kernels._triton_impl import RMSNorm

    return RMSNorm.apply(x, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`mmzoo_kernels.reference.rotary` (``x`` ``(T, H, D)``, angles ``(T, D)``)."""
    from mmzoo_kernels._triton_impl import Rotary

    return Rotary.apply(x, cos, sin)
