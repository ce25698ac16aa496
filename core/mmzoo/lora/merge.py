"""A model with LoRA adapters as the full weights of the model without them: ``W + B @ A * scaling``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmzoo.checkpoint.sources import TensorSpec
from mmzoo.lora.attach import base_name, delta, is_adapter, lora_layers


class MergedTensors:
    """A tensor source (:class:`mmzoo.checkpoint.sources.TensorSource`) of a model's state dict
    under the names it has without adapters, each adapted weight merged when read (in float32,
    returned in the weight's dtype): one merged tensor exists at a time."""

    def __init__(self, model: nn.Module) -> None:
        self.layers: dict[str, Any] = {f"{name}.weight": layer for name, layer in lora_layers(model).items()}
        self.tensors = {
            base_name(name): t.detach()
            for name, t in model.state_dict(keep_vars=True).items()
            if not is_adapter(name)
        }
        self.names = list(self.tensors)

    def spec(self, name: str) -> TensorSpec:
        return self.tensors[name].dtype, tuple(self.tensors[name].shape)

    def get(self, name: str) -> torch.Tensor:
        tensor, layer = self.tensors[name], self.layers.get(name)
        if layer is None:
            return tensor
        return (tensor.float() + delta(layer).to(tensor.device)).to(tensor.dtype)


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` holds LoRA adapters."""
    return any(is_adapter(name) for name, _ in model.named_parameters())
