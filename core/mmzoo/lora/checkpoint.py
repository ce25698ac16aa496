"""What a LoRA run records to be rebuilt, and loading its checkpoints.

A LoRA training checkpoint's ``model.safetensors`` holds only the trained parameters (the
adapters and ``modules_to_save``, under the model's own parameter names); ``lora.json`` beside
it holds the record :func:`lora_record` makes: the adapters' settings with their modules' full
names, and the base model: ``model.load``'s path, or the registry variant, overrides and seed of
a random init (the same seed builds the same weights).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from mmzoo.build import build_model
from mmzoo.checkpoint.dcp import DCPSource, dcp_iteration
from mmzoo.checkpoint.mm import is_mm_checkpoint, load_mm_weights, read_json, resolve_iteration, resolve_shard
from mmzoo.checkpoint.weights import resolve_dtype
from mmzoo.config import LoraConfig, ModelConfig
from mmzoo.errors import MmzooError
from mmzoo.lora.attach import attach, resolve_modules
from mmzoo.lora.peft_format import import_adapter
from mmzoo.model import VLModel

LORA = "lora.json"  # beside a LoRA run's training checkpoint


def lora_record(
    model_cfg: ModelConfig,
    seed: int,
    settings: LoraConfig,
    *,
    ranks: Mapping[str, int] | None = None,
    alphas: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The JSON record of an attached adapter: ``settings`` with full module names (see
    :func:`mmzoo.lora.attach.attach`) and the base model it needs."""
    load = str(Path(model_cfg.load).absolute()) if model_cfg.load else None
    base: dict[str, Any] = {"load": load, "name": model_cfg.name, "variant": model_cfg.variant, "seed": seed}
    base["overrides"] = {} if load else model_cfg.overrides
    return {
        "lora": dataclasses.asdict(settings),
        "ranks": dict(ranks or {}),
        "alphas": dict(alphas or {}),
        "base": base,
        "adapter": model_cfg.load_adapter,
    }


def attach_recorded(model: VLModel, record: Mapping[str, Any]) -> None:
    """Attach the adapters ``record`` describes (untrained) to ``model``."""
    lora = record["lora"]
    settings = LoraConfig(
        **{**lora, "targets": tuple(lora["targets"]), "modules_to_save": tuple(lora["modules_to_save"])}
    )
    attach(model, settings, ranks=record["ranks"], alphas=record["alphas"])


def frozen_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for ``train.precision=bf16`` on CUDA or an NPU (the CPU keeps float32), else ``None``."""
    return torch.bfloat16 if precision == "bf16" and device.type in ("cuda", "npu") else None


def _iteration(path: str | Path) -> Path:
    return dcp_iteration(path) or resolve_iteration(path)


def is_lora_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a training checkpoint (run, iteration or shard directory; one process's
    or DCP) of a LoRA run; anything else, damaged checkpoints included, is left to the other readers."""
    iteration = dcp_iteration(path)
    if iteration is None and is_mm_checkpoint(path):
        try:
            iteration = resolve_iteration(path)
        except MmzooError:
            return False
    return iteration is not None and (iteration / LORA).is_file()


@torch.no_grad()
def _fill_trained(model: VLModel, path: str | Path) -> None:
    """Copy a LoRA checkpoint's tensors into ``model``'s trainable parameters."""
    iteration = dcp_iteration(path)
    if iteration is None:
        load_mm_weights(model, resolve_shard(path), trainable_only=True)
        return
    source = DCPSource(iteration)
    for name, param in model.named_parameters():
        if param.requires_grad:
            if name not in source.names:
                raise MmzooError(f"{iteration}: no {name}; was it saved with these adapters?")
            param.copy_(source.get(name))


def load_lora_model(
    path: str | Path, dtype: torch.dtype | str | None, load_base: Callable[..., VLModel]
) -> VLModel:
    """The base model a LoRA checkpoint records with its trained adapters attached and loaded.

    Args:
        path: the checkpoint (run directory, ``iter_*`` or shard directory).
        dtype: as :func:`mmzoo.load_model`'s (the base's; the adapters follow it).
        load_base: :func:`mmzoo.load_model`, to load a base checkpoint.
    """
    file = _iteration(path) / LORA
    record = read_json(file)
    base = record["base"]
    if base["load"]:
        if not Path(base["load"]).exists():
            raise MmzooError(
                f"{file}: the base model {base['load']} it was trained on is gone; put it back there "
                "(the checkpoint holds only the adapters)"
            )
        model = load_base(base["load"], dtype)
    else:
        torch.manual_seed(base["seed"])  # a random init: the seed the run built it with
        model = build_model(base["name"], base["variant"], **base["overrides"])
        model = model.to(resolve_dtype(dtype, lambda: torch.float32))
    attach_recorded(model, record)
    _fill_trained(model, path)
    return model


def adapt(model: VLModel, model_cfg: ModelConfig, seed: int) -> dict[str, Any] | None:
    """Attach the adapters ``model.lora`` configures, or the PEFT adapter ``model.load_adapter``
    names, to ``model`` (the base, freshly built with ``seed``); returns their record, or ``None``
    when there are none."""
    settings = model_cfg.lora
    if not (settings.enabled or model_cfg.load_adapter):
        return None
    if model_cfg.text_backend != "native":
        raise MmzooError("model.lora needs model.text_backend=native (LoRA attaches to mmzoo's own layers)")
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    if model_cfg.load_adapter:
        imported = import_adapter(model, model_cfg.load_adapter, settings.modules_to_save)
        settings, ranks, alphas = imported.settings, imported.ranks, imported.alphas
    else:
        settings = dataclasses.replace(settings, targets=tuple(attach(model, settings)))
    saved = resolve_modules(model, settings.modules_to_save, "model.lora.modules_to_save", linear=False)
    full = dataclasses.replace(settings, modules_to_save=tuple(saved))
    return lora_record(model_cfg, seed, full, ranks=ranks, alphas=alphas)
