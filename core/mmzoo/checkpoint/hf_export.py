"""Writing an mmzoo model as a Hugging Face checkpoint directory that ``transformers`` loads.

Tensors go through the family's weight mapping (the derived mm -> HF direction) one shard at a
time, so peak memory is the model plus one shard. The directory is written with
:func:`mmzoo.files.atomic_directory` (a temporary sibling, fsynced, renamed into place).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from mmzoo.checkpoint.sources import TensorSource, TensorSpec
from mmzoo.checkpoint.weights import resolve_dtype
from mmzoo.convert.mapping import Rule, WeightMapping
from mmzoo.errors import MmzooError
from mmzoo.files import atomic_directory, save_safetensors
from mmzoo.lora.merge import MergedTensors, has_adapters
from mmzoo.model import VLModel
from mmzoo.registry import ModelSpec, get_model

INDEX_NAME = "model.safetensors.index.json"

# Processor, tokenizer and generation files copied from ``template_dir`` (never weights or config).
TEMPLATE_FILES = (
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


class _ModelTensors:
    """A model's state dict as a tensor source (see :class:`mmzoo.checkpoint.sources.TensorSource`)."""

    def __init__(self, model: VLModel) -> None:
        self.tensors = {name: t.detach() for name, t in model.state_dict(keep_vars=True).items()}
        self.names = list(self.tensors)

    def spec(self, name: str) -> TensorSpec:
        return self.tensors[name].dtype, tuple(self.tensors[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def save_hf(model: VLModel, out_dir: str | Path, **options: Any) -> Path:
    """Write ``model`` as a Hugging Face checkpoint; the options are :func:`export_hf`'s. LoRA
    adapters are merged into the weights they adapt (``W + B @ A * alpha / r``)."""
    source = MergedTensors(model) if has_adapters(model) else _ModelTensors(model)
    return export_hf(source, get_model(model.name), model.config, out_dir, **options)


def export_hf(
    source: TensorSource,
    spec: ModelSpec,
    config: Any,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    template_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the mm tensors of ``source`` as a Hugging Face checkpoint (config.json + safetensors +
    tokenizer files), reading one tensor at a time: at most one output shard is in memory.

    Weights use the on-disk layout transformers writes (e.g. ``visual.*``, ``model.*``,
    ``lm_head.weight``, the latter absent when embeddings are tied). Over ``max_shard_bytes``
    they are split into ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``.

    Args:
        source: full mm tensors by name (a model's, or a checkpoint's read from disk).
        spec, config: the family and its config (``spec`` must provide ``config_to_hf``).
        out_dir: the checkpoint directory to create.
        tokenizer: written with ``tokenizer.save_pretrained`` when given.
        dtype: dtype of the written weights (default: the source's); also config.json's ``dtype``.
        max_shard_bytes: largest shard size; a single tensor group above it gets its own shard.
        template_dir: a checkpoint directory whose processor, tokenizer and generation files
            (:data:`TEMPLATE_FILES`) are copied when not already written.
        overwrite: replace an existing ``out_dir`` instead of raising.

    Returns:
        The path of the written directory.

    Raises:
        MmzooError: ``out_dir`` exists (without ``overwrite``), the family cannot export, or
            the mapping does not cover the source's tensors.
    """
    out = Path(out_dir)
    _check_target(out, overwrite)
    if max_shard_bytes <= 0:
        raise MmzooError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if spec.config_to_hf is None:
        raise MmzooError(
            f"model '{spec.name}' cannot be exported to Hugging Face format: its plugin gives no config_to_hf"
        )

    def floating() -> torch.dtype:  # the default: the source's own (of its first float tensor)
        return next(d for d in (source.spec(n)[0] for n in source.names) if d.is_floating_point)

    out_dtype = resolve_dtype(dtype or "auto", floating)
    mapping = spec.weight_mapping(config)
    _check_coverage(mapping, source.names, spec.name)
    hf_config = dict(spec.config_to_hf(config))
    hf_config["dtype"] = str(out_dtype).removeprefix("torch.")

    with atomic_directory(out, replace=overwrite) as tmp:
        _write_json(tmp / "config.json", hf_config)
        _write_weights(tmp, mapping, source, out_dtype, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if template_dir is not None:
            _copy_template(Path(template_dir), tmp)
    return out


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise MmzooError(f"{out}: already exists; choose a new directory or pass overwrite=True")
    if out.exists() and not out.is_dir():
        raise MmzooError(f"{out}: exists and is not a directory; it cannot be overwritten with a checkpoint")


def _check_coverage(mapping: WeightMapping, names: list[str], family: str) -> None:
    mapped = set(mapping.mm_names())
    unmapped = sorted(set(names) - mapped)
    absent = sorted(mapped - set(names))
    if unmapped or absent:
        raise MmzooError(
            f"{family} weight mapping does not match the model: unmapped parameters "
            f"{unmapped[:8] or 'none'}, mapped names the model lacks {absent[:8] or 'none'}"
        )


def plan_shards(rules: list[Rule], sizes: dict[str, int], max_shard_bytes: int) -> list[list[Rule]]:
    """Group rules greedily, in order, into shards of at most ``max_shard_bytes``.

    A rule's HF tensors stay together; their bytes equal the mm tensor's (the ops only split).
    A rule larger than the limit gets a shard of its own.
    """
    shards: list[list[Rule]] = []
    current: list[Rule] = []
    used = 0
    for rule in rules:
        if rule.mm is None:
            continue
        size = sizes[rule.mm]
        if current and used + size > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(rule)
        used += size
    if current:
        shards.append(current)
    return shards


def _write_weights(
    tmp: Path,
    mapping: WeightMapping,
    source: TensorSource,
    dtype: torch.dtype,
    max_shard_bytes: int,
) -> None:
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {name: math.prod(source.spec(name)[1]) * itemsize for name in source.names}
    shards = plan_shards(mapping.rules, sizes, max_shard_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    for i, rules in enumerate(shards, start=1):
        file = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        # Only this shard's HF tensors exist at once; the model's own tensors are not copied
        # beyond the dtype/device/layout conversion of each.
        shard = {
            name: t.to(device="cpu", dtype=dtype).contiguous()
            for name, t in WeightMapping(rules).to_hf(source.get)
        }
        save_safetensors(shard, tmp / file)
        weight_map.update(dict.fromkeys(shard, file))
        del shard
    if n > 1:
        total = sum(sizes[r.mm] for rules in shards for r in rules if r.mm is not None)
        _write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _copy_template(template_dir: Path, tmp: Path) -> None:
    if not template_dir.is_dir():
        raise MmzooError(f"{template_dir}: template_dir is not a directory")
    for name in TEMPLATE_FILES:
        source = template_dir / name
        if source.is_file() and not (tmp / name).exists():
            shutil.copyfile(source, tmp / name)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
