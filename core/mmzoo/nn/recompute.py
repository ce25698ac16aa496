"""A stack of layers with activation recompute (gradient checkpointing), Megatron style."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmzoo.config import RecomputeConfig
from mmzoo.nn.layers import SelfAttention

Step = Callable[[int, nn.Module, torch.Tensor], torch.Tensor]


def run_layers(
    layers: Iterable[tuple[int, nn.Module]], x: torch.Tensor, step: Step, policy: RecomputeConfig | None
) -> torch.Tensor:
    """Apply ``step(index, layer, x)`` over ``(index, layer)`` pairs, recomputing activations as
    ``policy`` says.

    ``full``/``uniform`` keeps only the input of every chunk of ``num_layers`` layers;
    ``full``/``block`` checkpoints the first ``num_layers`` layers one by one (of these layers:
    on a pipeline stage, of the stage's). Without gradients (evaluation) nothing is checkpointed.
    """
    layers = list(layers)
    if policy is None or policy.granularity != "full" or not torch.is_grad_enabled():
        for i, layer in layers:
            x = step(i, layer, x)
        return x
    n = max(1, policy.num_layers)
    if policy.method == "block":
        for k, (i, layer) in enumerate(layers):
            x = checkpoint(step, i, layer, x, use_reentrant=False) if k < n else step(i, layer, x)
        return x
    for start in range(0, len(layers), n):

        def chunk(x: torch.Tensor, start: int = start) -> torch.Tensor:
            for i, layer in layers[start : start + n]:
                x = step(i, layer, x)
            return x

        x = checkpoint(chunk, x, use_reentrant=False)
    return x


class LayerStack(nn.Module):
    """Layers applied in order (Megatron's ``TransformerBlock``), with activation recompute.

    ``layers`` is an ``nn.ModuleList`` under that name: FSDP makes each entry one unit
    (:func:`mmzoo.distributed.fsdp.layer_units`). A pipeline stage holds its share as an
    ``nn.ModuleDict`` keyed by the global index (:func:`stage_stack`), so ``layers.5`` keeps its
    name and ``step`` gets 5. ``final_layernorm``, when given, is applied after the last layer
    (a decoder's final norm). :func:`set_recompute` on any module holding
    the stack sets its ``recompute`` policy.
    """

    def __init__(self, layers: Sequence[nn.Module], *, final_layernorm: nn.Module | None = None) -> None:
        super().__init__()
        self.layers: nn.ModuleList | nn.ModuleDict = nn.ModuleList(layers)
        self.final_layernorm = final_layernorm
        self.recompute: RecomputeConfig | None = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x`` through ``layer(x, *args, **kwargs)`` for every layer (same arguments each)."""
        return self.run(x, lambda i, layer, x: layer(x, *args, **kwargs))

    def run(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """``x`` through ``step(i, layer, x)`` for every layer (arguments that differ per layer,
        e.g. window or full attention), then ``final_layernorm``."""
        x = run_layers(self.indexed(), x, step, self.recompute)
        return x if self.final_layernorm is None else self.final_layernorm(x)

    def indexed(self) -> list[tuple[int, nn.Module]]:
        """``(global index, layer)`` of the layers held, in order."""
        if isinstance(self.layers, nn.ModuleDict):
            return [(int(key), layer) for key, layer in self.layers.items()]
        return list(enumerate(self.layers))


def stage_stack(stack: LayerStack, indices: Sequence[int], *, final: bool) -> LayerStack:
    """A pipeline stage's view of ``stack``: the layers ``indices`` (the same modules, under their
    global names) and the final norm when ``final``; the recompute policy is kept."""
    view = LayerStack([], final_layernorm=stack.final_layernorm if final else None)
    held = dict(stack.indexed())
    view.layers = nn.ModuleDict({str(i): held[i] for i in indices})
    view.recompute = stack.recompute
    view.train(stack.training)
    return view


def set_recompute(tower: nn.Module, policy: RecomputeConfig) -> None:
    """Configure recompute on every :class:`LayerStack` in ``tower`` (``selective``: on every
    :class:`SelfAttention`'s core)."""
    if policy.num_layers < 1:
        raise ValueError(f"recompute num_layers must be at least 1, got {policy.num_layers}")
    for module in tower.modules():
        if isinstance(module, LayerStack):
            module.recompute = policy
        elif isinstance(module, SelfAttention):
            module.recompute_core = policy.granularity == "selective"
