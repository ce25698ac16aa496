"""Building models: compose a family's parts into a :class:`VLModel`, random init, overrides.

Below the checkpoint layer: checkpoint readers build their model here, then fill it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch

from mmzoo.errors import MmzooError, nearest
from mmzoo.model import VLModel
from mmzoo.nn import TextDecoder
from mmzoo.nn.init import init_weights
from mmzoo.registry import ModelSpec, get_model


def apply_overrides(config: Any, overrides: dict[str, Any], where: str = "") -> Any:
    """A copy of dataclass ``config`` with ``overrides``; nested dataclasses take dicts.

    Lists become tuples where the field holds a tuple, so a config read back from JSON
    equals the one written.
    """
    fields = {f.name: f for f in dataclasses.fields(config)}
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in fields:
            raise MmzooError(
                f"unknown config key '{where}{key}'{nearest(key, fields)}; keys: {', '.join(fields)}"
            )
        current = getattr(config, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = apply_overrides(current, value, f"{where}{key}.")
        elif isinstance(value, list) and (isinstance(current, tuple) or "tuple" in str(fields[key].type)):
            value = tuple(value)  # JSON and YAML give lists; configs hold (hashable) tuples
        changes[key] = value
    try:
        return dataclasses.replace(config, **changes)
    except (TypeError, ValueError) as exc:
        raise MmzooError(f"invalid config override {where or ''}{overrides}: {exc}") from exc


def compose(spec: ModelSpec, config: Any) -> VLModel:
    """Build the family's parts from ``config`` and compose them into a :class:`VLModel`."""
    return VLModel(
        vision_encoder=spec.build_vision_encoder(config),
        projector=spec.build_projector(config),
        text_decoder=spec.build_text_decoder(config),
        position_ids=spec.position_ids,
        feature_slots=spec.feature_slots,
        loss=spec.loss,
        config=config,
        name=spec.name,
    )


def use_text_backend(model: VLModel, backend: str) -> VLModel:
    """``model`` with its text decoder built by ``backend`` (``model.text_backend``): ``native``
    keeps it; ``megatron`` replaces it by a :class:`mmzoo.nn.megatron_decoder.MegatronTextDecoder`
    holding the same weights under the same names (split over tensor-parallel ranks:
    :func:`mmzoo.distributed.megatron_parallel.use_text_backend_split`). A decoder on the meta
    device stays there."""
    if backend == "native":
        return model
    if backend != "megatron":
        raise MmzooError(f"model.text_backend: {backend!r} is not one of native, megatron")
    from mmzoo.nn.megatron_decoder import MegatronTextDecoder

    native = model.text_decoder
    megatron = MegatronTextDecoder.empty_like(native)
    if not megatron.output_weight.is_meta:
        megatron.load_state_dict(native.state_dict(), strict=True)
    model.text_decoder = cast(TextDecoder, megatron)  # the same interface (embed, forward, logits)
    return model


def build_model(
    name: str,
    variant: str = "tiny",
    *,
    dtype: torch.dtype | None = None,
    text_backend: str = "native",
    **overrides: Any,
) -> VLModel:
    """A randomly initialised model of a registered family: by module type
    (:func:`mmzoo.nn.init.init_weights`), then the family's ``init_weights`` hook.

    Args:
        name: registry name (see ``mmzoo list-models``), e.g. ``"qwen2_5_vl"``.
        variant: size, e.g. ``"tiny"`` or ``"7b"``.
        dtype: parameter dtype (default float32).
        text_backend: ``native`` or ``megatron`` (:func:`use_text_backend`; the same initial weights).
        **overrides: config fields to change; nested configs take dicts,
            e.g. ``text=dict(num_layers=2)``.
    """
    spec = get_model(name)
    config = apply_overrides(spec.variant(variant), overrides)
    model = compose(spec, config)
    init_weights(model)
    if spec.init_weights is not None:
        with torch.no_grad():
            spec.init_weights(model, config)
    model = use_text_backend(model, text_backend)
    return model.to(dtype) if dtype is not None else model
