"""Activation recompute (gradient checkpointing) over a stack of layers, Megatron style."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmzoo.config import RecomputeConfig
from mmzoo.nn.layers import SelfAttention

Step = Callable[[int, nn.Module, torch.Tensor], torch.Tensor]


def run_layers(
    layers: Iterable[nn.Module], x: torch.Tensor, step: Step, policy: RecomputeConfig | None
) -> torch.Tensor:
    """Apply ``step(i, layer, x)`` over ``layers``, recomputing activations as ``policy`` says.

    ``full``/``uniform`` keeps only the input of every chunk of ``num_layers`` layers;
    ``full``/``block`` checkpoints the first ``num_layers`` layers one by one. Without
    gradients (evaluation) nothing is checkpointed.
    """
    layers = list(layers)
    if policy is None or policy.granularity != "full" or not torch.is_grad_enabled():
        for i, layer in enumerate(layers):
            x = step(i, layer, x)
        return x
    n = max(1, policy.num_layers)
    if policy.method == "block":
        for i, layer in enumerate(layers):
            x = checkpoint(step, i, layer, x, use_reentrant=False) if i < n else step(i, layer, x)
        return x
    for start in range(0, len(layers), n):

        def chunk(x: torch.Tensor, start: int = start) -> torch.Tensor:
            for i in range(start, min(start + n, len(layers))):
                x = step(i, layers[i], x)
            return x

        x = checkpoint(chunk, x, use_reentrant=False)
    return x


def set_recompute(tower: nn.Module, policy: RecomputeConfig) -> None:
    """Configure recompute on a tower (a module whose forward uses :func:`run_layers`)."""
    if policy.num_layers < 1:
        raise ValueError(f"recompute num_layers must be at least 1, got {policy.num_layers}")
    tower.recompute = policy  # type: ignore[assignment]
    for module in tower.modules():
        if isinstance(module, SelfAttention):
            module.recompute_core = policy.granularity == "selective"
