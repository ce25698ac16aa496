"""Attaching LoRA adapters to an mmzoo model with ``peft``, and reading them back.

``peft.inject_adapter_in_model`` replaces each target ``nn.Linear`` (mmzoo's fused
``linear_qkv`` and ``linear_fc1`` included) by a ``peft`` LoRA layer holding the original as
``base_layer``; the adapter adds ``B @ A * alpha / r`` to its weight. mmzoo resolves the target
module names itself and trains ``modules_to_save`` in place (the base model is not shared).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from mmzoo.config import LoraConfig
from mmzoo.errors import MmzooError
from mmzoo.model import VLModel

ADAPTER = "default"  # peft's adapter name; mmzoo attaches one adapter
INSTALL = "LoRA needs the peft package: pip install mmzoo[lora]"

# Target groups: (module name prefix, leaf names of the linear layers).
ATTENTION = ("self_attention.linear_qkv", "self_attention.linear_proj")
MLP = ("mlp.linear_fc1", "mlp.linear_fc2")
GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "text.attention": ("text_decoder.", ATTENTION),
    "text.mlp": ("text_decoder.", MLP),
    "vision.attention": ("image_encoder.encoder.", ATTENTION),
    "vision.mlp": ("image_encoder.encoder.", MLP),
    "projector": ("image_encoder.projector.", ()),  # every linear layer under the prefix
}


def require_peft() -> Any:
    """The ``peft`` module, or a one-line error saying how to install it."""
    try:
        import peft
    except ModuleNotFoundError as exc:
        if exc.name != "peft":
            raise
        raise MmzooError(INSTALL) from None
    return peft


def _matches(name: str, pattern: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _in_group(name: str, group: str) -> bool:
    prefix, leaves = GROUPS[group]
    return name.startswith(prefix) and (not leaves or name.endswith(tuple("." + leaf for leaf in leaves)))


def resolve_modules(model: nn.Module, entries: Iterable[str], field: str, *, linear: bool) -> list[str]:
    """Full names of the modules ``entries`` (groups or name patterns) select, in model order.

    Raises:
        MmzooError: an entry selects nothing (or, with ``linear``, a module that is not ``nn.Linear``).
    """
    modules = dict(model.named_modules())
    chosen: list[str] = []
    for entry in entries:
        if entry in GROUPS:
            found = [n for n, m in modules.items() if isinstance(m, nn.Linear) and _in_group(n, entry)]
        else:
            found = [n for n in modules if n and _matches(n, entry)]
        if not found:
            groups = ", ".join(GROUPS)
            raise MmzooError(
                f"{field}: '{entry}' matches no module; give a group ({groups}) or a module name"
            )
        wrong = [n for n in found if linear and not isinstance(modules[n], nn.Linear)]
        if wrong:
            raise MmzooError(
                f"{field}: '{entry}' matches {wrong[0]} ({type(modules[wrong[0]]).__name__}); "
                "LoRA adapts nn.Linear layers only"
            )
        chosen += [n for n in found if n not in chosen]
    return [n for n in modules if n in chosen]


def check_targets(model: VLModel, targets: list[str]) -> None:
    """Refuse layers whose weight the model reads outside their forward (the output layer: the
    loss multiplies by its weight directly, so an adapter there would be ignored)."""
    output = getattr(model.text_decoder, "output_layer", None)
    for name in targets:
        if output is not None and model.get_submodule(name) is output:
            raise MmzooError(
                f"model.lora.targets: {name} is the output layer, which the loss reads by weight; "
                "train it in full with model.lora.modules_to_save instead"
            )


def attach(
    model: VLModel,
    lora: LoraConfig,
    *,
    ranks: Mapping[str, int] | None = None,
    alphas: Mapping[str, float] | None = None,
) -> list[str]:
    """Attach LoRA adapters to ``model`` in place and freeze everything else but ``modules_to_save``.

    Args:
        model: an mmzoo model (native text backend).
        lora: the settings (``lora.enabled`` must be true).
        ranks, alphas: per-module rank and alpha by full module name, over ``lora.r`` and
            ``lora.alpha`` (imported adapters: fused layers get the sum of their parts' ranks).

    Returns:
        The adapted modules' full names.
    """
    peft = require_peft()
    targets = resolve_modules(model, lora.targets, "model.lora.targets", linear=True)
    check_targets(model, targets)
    saved = resolve_modules(model, lora.modules_to_save, "model.lora.modules_to_save", linear=False)
    overlap = sorted(set(targets) & set(saved))
    if overlap:
        raise MmzooError(f"model.lora: {overlap[0]} is both a target and in modules_to_save; choose one")
    config = peft.LoraConfig(
        r=int(lora.r or 0),
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        rank_pattern={re.escape(n): r for n, r in (ranks or {}).items()},
        alpha_pattern={re.escape(n): a for n, a in (alphas or {}).items()},
    )
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name) or name.startswith(tuple(s + "." for s in saved)))
    return targets


def is_adapter(name: str) -> bool:
    """Whether a parameter name is a LoRA adapter's (``...lora_A.default.weight``)."""
    return ".lora_A." in name or ".lora_B." in name


def lora_layers(model: nn.Module) -> dict[str, Any]:
    """Full module name -> its ``peft`` LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def base_name(name: str) -> str:
    """A parameter's name in the model without adapters (``.base_layer`` dropped)."""
    return name.replace(".base_layer.", ".")


def store_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen floating-point parameters to ``dtype`` (the trainable ones keep theirs)."""
    with torch.no_grad():
        for param in model.parameters():
            if not param.requires_grad and param.is_floating_point():
                param.data = param.data.to(dtype)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name: the adapters and ``modules_to_save``."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def delta(layer: Any) -> torch.Tensor:
    """A LoRA layer's weight update ``B @ A * scaling`` in float32 (``(out, in)``)."""
    a = layer.lora_A[ADAPTER].weight.float()
    b = layer.lora_B[ADAPTER].weight.float()
    return (b @ a) * layer.scaling[ADAPTER]
