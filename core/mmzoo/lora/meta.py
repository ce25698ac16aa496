"""LoRA on a model built on the meta device, for sharded loading on many ranks.

``peft`` creates each adapter on the CPU, draws its initial values there, then moves it to its
base layer's device: on a meta-device base the values are lost. :func:`adapt_on_meta` therefore
attaches twice from the same random state: to a *hollow* copy of the model, whose linear layers
hold zero-stride CPU weights (no memory), which gives the adapters' initial values exactly as
attaching to a loaded model in one process does (or the imported adapter's values), and to the
meta-device model itself, which gets the same structure and names. After sharding and
materializing, :func:`fill_adapters` copies the values in; the base comes from the checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mmzoo.checkpoint.weights import copy_into
from mmzoo.config import ModelConfig
from mmzoo.lora.attach import base_name, is_adapter
from mmzoo.lora.checkpoint import adapt, attach_recorded
from mmzoo.model import VLModel
from mmzoo.nn.init import persistent_buffers


def _hollow(model: VLModel) -> VLModel:
    """A copy of a meta-device ``model`` whose linear layers hold zero-stride CPU parameters."""
    hollow = copy.deepcopy(model)
    for module in hollow.modules():
        if isinstance(module, nn.Linear):
            for name, param in list(module.named_parameters(recurse=False)):
                zero = torch.zeros((), dtype=param.dtype).expand(param.shape)
                setattr(module, name, nn.Parameter(zero, requires_grad=param.requires_grad))
    return hollow


def adapt_on_meta(
    model: VLModel, model_cfg: ModelConfig, seed: int
) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
    """Attach the adapters :func:`mmzoo.lora.checkpoint.adapt` would to a meta-device ``model``;
    returns their record and their initial values (CPU) by parameter name. The random state
    ends where attaching in one process leaves it."""
    hollow = _hollow(model)
    before = torch.get_rng_state()
    record = adapt(hollow, model_cfg, seed)
    if record is None:
        return None, {}
    after = torch.get_rng_state()
    torch.set_rng_state(before)
    attach_recorded(model, record)
    torch.set_rng_state(after)
    values = {name: p.detach() for name, p in hollow.named_parameters() if is_adapter(name)}
    return record, values


def base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's parameters and persistent buffers under their checkpoint names (without
    ``.base_layer``), adapters left out: what :func:`mmzoo.checkpoint.weights.fill_parameters` fills."""
    named = {**dict(model.named_parameters()), **persistent_buffers(model)}
    return {base_name(name): t for name, t in named.items() if not is_adapter(name)}


@torch.no_grad()
def fill_adapters(model: nn.Module, values: Mapping[str, torch.Tensor]) -> None:
    """Copy the adapters' ``values`` into ``model``'s (sharded or not) adapter parameters."""
    for name, param in model.named_parameters():
        if is_adapter(name):
            copy_into(param, values[name])
