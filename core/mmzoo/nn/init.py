"""Initialising modules: random weights by module type, and the buffers of a model materialised
from the meta device.

:func:`init_weights` initialises as transformers' ``_init_weights`` does, by module type; a family
sets anything else (a class token, position embeddings, layer scales) in its
``ModelSpec.init_weights`` hook, which runs after it.

A model built on the meta device and materialised with ``to_empty`` holds uninitialised memory in
every tensor. Parameters and persistent buffers are then copied from a checkpoint; non-persistent
buffers (rotary frequencies, position-id ranges), which no checkpoint holds, are recomputed by
:func:`reset_buffers`. A module that registers one must define ``reset_parameters()`` that
recomputes it in place: torch's name for re-running a module's own initialisation, which FSDP and
torchtune also call after ``to_empty``.
"""

from __future__ import annotations

import torch
from torch import nn

from mmzoo.errors import MmzooError
from mmzoo.nn import RMSNorm

# Weights drawn from normal(0, std), biases zero.
NORMAL_INIT = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Weights one, biases zero.
UNIT_INIT = (nn.LayerNorm, nn.RMSNorm, RMSNorm)


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """Random init by module type: :data:`NORMAL_INIT` weights normal(0, ``std``) (an embedding's
    padding row zero), :data:`UNIT_INIT` weights one, their biases zero; any other module with a
    ``reset_parameters()`` runs it. Parameters registered directly on other modules keep what
    their constructor gave them."""
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if isinstance(module, (*NORMAL_INIT, *UNIT_INIT)):
            _init_by_type(module, std)
        elif callable(reset):
            reset()


def _init_by_type(module: nn.Module, std: float) -> None:
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(weight, torch.Tensor):  # a norm without elementwise affine
        return
    if isinstance(module, UNIT_INIT):
        nn.init.ones_(weight)
    else:
        nn.init.normal_(weight, std=std)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            weight[module.padding_idx].zero_()
    if isinstance(bias, torch.Tensor):
        nn.init.zeros_(bias)


def _own_buffers(module: nn.Module, persistent: bool) -> list[str]:
    """Names of the buffers registered on ``module`` itself (not its children)."""
    skip = module._non_persistent_buffers_set
    return [n for n, b in module._buffers.items() if b is not None and (n not in skip) == persistent]


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full name -> buffer, for the buffers a state dict holds (those a checkpoint fills)."""
    return {
        f"{prefix}.{name}" if prefix else name: module._buffers[name]
        for prefix, module in model.named_modules()
        for name in _own_buffers(module, persistent=True)
    }


@torch.no_grad()
def reset_buffers(model: nn.Module) -> None:
    """Recompute every non-persistent buffer with its module's ``reset_parameters()``.

    Only modules that own such a buffer are reset, so loading never re-initialises the other
    layers' parameters; the checkpoint overwrites the parameters of those that are.

    Raises:
        MmzooError: a module owns a non-persistent buffer but has no ``reset_parameters``.
    """
    for prefix, module in model.named_modules():
        names = _own_buffers(module, persistent=False)
        if not names:
            continue
        reset = getattr(module, "reset_parameters", None)
        if not callable(reset):
            raise MmzooError(
                f"{type(module).__qualname__} '{prefix or '(root)'}' has non-persistent buffers "
                f"{', '.join(names)} but no reset_parameters() to recompute them after loading; "
                "define one that recomputes them in place (see mmzoo.nn.init)"
            )
        reset()


def materialize(model: nn.Module, device: str | torch.device) -> nn.Module:
    """Allocate a meta-device ``model`` on ``device`` (``to_empty``) and recompute its
    non-persistent buffers; parameters and persistent buffers are left for a checkpoint to fill."""
    model.to_empty(device=device)
    reset_buffers(model)
    return model
