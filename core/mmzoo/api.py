"""The Python API: ``build_model`` (random init) and ``load_model`` (from a checkpoint)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from mmzoo.checkpoint.hf import HFCheckpoint
from mmzoo.errors import MmzooError, nearest
from mmzoo.model import VLModel
from mmzoo.nn import RMSNorm
from mmzoo.registry import ModelSpec, get_model, model_for_architecture


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


def init_weights(model: torch.nn.Module, std: float = 0.02) -> None:
    """Random init as transformers does: normal(0, std) weights, zero biases, unit norms."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv3d)):
            torch.nn.init.normal_(module.weight, std=std)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                torch.nn.init.zeros_(bias)
        elif isinstance(module, RMSNorm):
            torch.nn.init.ones_(module.weight)


def compose(spec: ModelSpec, config: Any) -> VLModel:
    """Build the family's parts from ``config`` and compose them into a :class:`VLModel`."""
    return VLModel(
        vision_encoder=spec.build_vision_encoder(config),
        projector=spec.build_projector(config),
        text_decoder=spec.build_text_decoder(config),
        position_ids=spec.position_ids,
        loss=spec.loss,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        config=config,
        name=spec.name,
    )


def build_model(
    name: str, variant: str = "tiny", *, dtype: torch.dtype | None = None, **overrides: Any
) -> VLModel:
    """A randomly initialised model of a registered family.

    Args:
        name: registry name (see ``mmzoo list-models``), e.g. ``"qwen2_5_vl"``.
        variant: size, e.g. ``"tiny"`` or ``"7b"``.
        dtype: parameter dtype (default float32).
        **overrides: config fields to change; nested configs take dicts,
            e.g. ``text=dict(num_layers=2)``.
    """
    spec = get_model(name)
    config = apply_overrides(spec.variant(variant), overrides)
    model = compose(spec, config)
    init_weights(model)
    return model.to(dtype) if dtype is not None else model


def _resolve_dtype(dtype: torch.dtype | str | None, checkpoint: HFCheckpoint) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32
    name = dtype
    if dtype == "auto":
        name = checkpoint.config.get("dtype") or checkpoint.config.get("torch_dtype") or "float32"
    resolved = getattr(torch, str(name), None)
    if not isinstance(resolved, torch.dtype):
        raise MmzooError(f"unknown dtype '{name}'; use e.g. float32, bfloat16, float16 or 'auto'")
    return resolved


def load_model(path: str | Path, dtype: torch.dtype | str | None = None) -> VLModel:
    """Load a Hugging Face or mm checkpoint directory into an mmzoo model.

    A Hugging Face directory: the family is chosen from ``architectures`` in config.json and
    both key layouts transformers has written are read. An mm checkpoint (a root holding
    ``latest_checkpointed_iteration.txt``, an ``iter_*``/``release`` directory, or its
    ``mp_rank_00`` shard) goes to :func:`mmzoo.checkpoint.mm.load_mm_model`. Either
    way tensors are streamed from the safetensors files straight into the model's parameters
    (never a second full copy).

    Args:
        path: checkpoint directory (HF: config.json + safetensors, sharded or not; or mm).
        dtype: parameter dtype; ``None`` means float32, ``"auto"`` the checkpoint's own dtype.
    """
    # Imported here: mm_checkpoint builds models with this module's compose() (import cycle).
    from mmzoo.checkpoint.mm import is_mm_checkpoint, load_mm_model

    if is_mm_checkpoint(path):
        return load_mm_model(path, dtype)
    checkpoint = HFCheckpoint(path)
    spec = model_for_architecture(checkpoint.architecture)
    try:
        config = spec.config_from_hf(checkpoint.config)
    except (KeyError, TypeError, ValueError) as exc:
        raise MmzooError(f"{checkpoint.path / 'config.json'}: cannot read it as {spec.name}: {exc}") from exc
    torch_dtype = _resolve_dtype(dtype, checkpoint)
    mapping = spec.weight_mapping(config)

    canonical = {mapping.canonical_hf_name(k): k for k in checkpoint.keys()}
    missing, unexpected = mapping.check_hf_names(set(canonical))
    where = checkpoint.path
    if missing:
        raise MmzooError(
            f"{where}: {len(missing)} weights missing for {spec.name}: {', '.join(missing[:8])}"
            f"{' ...' if len(missing) > 8 else ''}; is this checkpoint complete and of this family?"
        )
    if unexpected:
        raise MmzooError(
            f"{where}: {len(unexpected)} unexpected weights for {spec.name}: {', '.join(unexpected[:8])}"
            f"{' ...' if len(unexpected) > 8 else ''}; does config.json match the weights?"
        )

    with torch.device("meta"):
        model = compose(spec, config)
    model = model.to(torch_dtype).to_empty(device="cpu")
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in mapping.to_mm(lambda n: checkpoint.get(canonical[n]), set(canonical)):
        param = params.get(name)
        if param is None:
            raise MmzooError(f"{spec.name} mapping produced '{name}', which the model does not have")
        if param.shape != tensor.shape:
            raise MmzooError(
                f"{where}: shape mismatch for {name}: checkpoint gives {tuple(tensor.shape)}, "
                f"the model built "
                f"from config.json expects {tuple(param.shape)}; does config.json match the weights?"
            )
        with torch.no_grad():
            param.copy_(tensor)
        loaded.add(name)
    checkpoint.close()
    not_loaded = sorted(set(params) - loaded)
    if not_loaded:
        raise MmzooError(f"{where}: no weights for {', '.join(not_loaded[:8])} in the checkpoint")
    return model
