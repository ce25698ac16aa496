"""Gradient norm and clipping for parameters on different device meshes (FSDP2, tensor parallel)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor


def _grad_groups(params: Sequence[torch.Tensor]) -> dict[Any, list[torch.Tensor]]:
    """The gradients of ``params`` grouped by mesh and placements."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for param in params:
        if param.grad is not None:
            grad = param.grad
            key = (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else None
            groups.setdefault(key, []).append(grad)
    return groups


def grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The total norm of the gradients of parameters on different meshes and placements (the
    vision encoder on FSDP's mesh, the LLM on FSDP x tp, replicated norms beside split linears):
    each group's norm is reduced over its own mesh; a plain tensor."""
    groups = _grad_groups(params)
    norms = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.zeros(())
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))


def scale_to_norm_(params: Sequence[torch.Tensor], max_norm: float, total: torch.Tensor) -> None:
    """Scale the gradients of ``params``, whose total norm is ``total``, down to ``max_norm`` (as
    torch clips: ``min(1, max_norm / (total + 1e-6))``), one mesh group at a time."""
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grads in _grad_groups(params).values():
        torch._foreach_mul_(grads, coef)


def clip_grad_norm_(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for parameters on different meshes (:func:`grad_norm`);
    returns the total norm, a plain tensor."""
    total = grad_norm(params)
    scale_to_norm_(params, max_norm, total)
    return total
