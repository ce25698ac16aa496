"""LoRA adapters in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``) under
transformers' module names, to and from mmzoo's fused layers.

The family's weight mapping says how each fused mm weight splits into transformers' weights
(``linear_qkv`` -> ``q_proj``/``k_proj``/``v_proj`` with the per-KV-group rows undone,
``linear_fc1`` -> ``gate_proj``/``up_proj``); every op splits output rows, so an adapter splits
the same way: its ``lora_A`` is shared by the parts and its ``lora_B`` rows split as the
weight's. Importing separate adapters onto a fused layer is exact too: the parts' ranks add up,
``A = [A_q; A_k; A_v]`` and ``B`` is block-diagonal, its rows laid out as the weight's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmzoo.checkpoint.mm import write_json
from mmzoo.config import LoraConfig
from mmzoo.convert.mapping import QKV, Concat, Identity, Rule, WeightMapping
from mmzoo.errors import MmzooError
from mmzoo.files import SafetensorsFile, atomic_directory, save_safetensors
from mmzoo.lora.attach import ADAPTER, attach, lora_layers, require_peft
from mmzoo.model import VLModel
from mmzoo.registry import get_model

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix before transformers' module names


def _row_split(rule: Rule) -> bool:
    """Whether ``rule``'s op only splits (or reorders) output rows."""
    op = rule.op
    return isinstance(op, (Identity, QKV)) or (isinstance(op, Concat) and op.dim == 0)


def _memory_name(mapping: WeightMapping, disk: str) -> str:
    """transformers' in-memory module name of an on-disk name (the aliases reversed)."""
    found = [(mem, d) for mem, d in mapping.hf_aliases.items() if disk.startswith(d)]
    if not found:
        return disk
    mem, d = max(found, key=lambda pair: len(pair[1]))
    return mem + disk[len(d) :]


def _weight_rules(model: VLModel) -> tuple[WeightMapping, dict[str, Rule]]:
    mapping = get_model(model.name).weight_mapping(model.config)
    return mapping, {rule.mm: rule for rule in mapping.rules if rule.mm is not None}


def adapter_tensors(model: VLModel) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]]]:
    """PEFT's tensors of ``model``'s adapters and each transformers module's ``(r, alpha)``."""
    mapping, rules = _weight_rules(model)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, tuple[int, float]] = {}
    for name, layer in lora_layers(model).items():
        rule = rules.get(f"{name}.weight")
        if rule is None or not _row_split(rule):
            raise MmzooError(f"--save-peft: {name} has no row-wise Hugging Face counterpart to export to")
        a = layer.lora_A[ADAPTER].weight.detach().float().cpu()
        b = layer.lora_B[ADAPTER].weight.detach().float().cpu()
        rank, scaling = a.shape[0], layer.scaling[ADAPTER]
        for hf, part in zip(rule.hf, rule.op.split(b), strict=True):
            module = _memory_name(mapping, hf.removesuffix(".weight"))
            tensors[f"{PREFIX}{module}.lora_A.weight"] = a.clone()
            tensors[f"{PREFIX}{module}.lora_B.weight"] = part.contiguous()
            modules[module] = (rank, scaling * rank)
    return tensors, modules


def save_peft(
    model: VLModel, out_dir: str | Path, *, base: str | None = None, overwrite: bool = False
) -> Path:
    """Write ``model``'s adapters as a PEFT adapter directory for transformers' model of its family.

    Args:
        model: an mmzoo model with LoRA adapters (and no ``modules_to_save``).
        out_dir: the directory to create.
        base: recorded as ``base_model_name_or_path`` (the Hugging Face checkpoint trained on).
        overwrite: replace an existing ``out_dir``.
    """
    peft = require_peft()
    layers = lora_layers(model)
    if not layers:
        raise MmzooError("--save-peft: the model has no LoRA adapters (set model.lora)")
    full = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]
    if full:
        raise MmzooError(
            f"--save-peft: {full[0]} is trained in full (modules_to_save); export with --save-hf"
        )
    tensors, modules = adapter_tensors(model)
    first = next(iter(layers.values()))
    r, alpha = next(iter(modules.values()))
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=float(first.lora_dropout[ADAPTER].p)
        if hasattr(first.lora_dropout[ADAPTER], "p")
        else 0.0,
        target_modules=sorted(modules),
        rank_pattern={re.escape(m): ra[0] for m, ra in modules.items() if ra[0] != r},
        alpha_pattern={re.escape(m): ra[1] for m, ra in modules.items() if ra[1] != alpha},
        base_model_name_or_path=base,
    )
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise MmzooError(f"{out}: already exists; choose a new directory")
    with atomic_directory(out, replace=overwrite) as tmp:
        save_safetensors(tensors, tmp / WEIGHTS)
        write_json(tmp / CONFIG, _jsonable(config.to_dict()))
    return out


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


@dataclass
class ImportedAdapter:
    """A PEFT adapter fused onto mmzoo's layers: settings for :func:`mmzoo.lora.attach.attach`
    and the tensors, by mmzoo module name."""

    settings: LoraConfig
    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (A, B)


def _read_config(directory: Path) -> Any:
    peft = require_peft()
    file = directory / CONFIG
    if not file.is_file() or not (directory / WEIGHTS).is_file():
        raise MmzooError(f"model.load_adapter: {directory} is not a PEFT adapter (no {CONFIG} and {WEIGHTS})")
    config = peft.LoraConfig.from_pretrained(str(directory))
    problems = {
        "use_dora": bool(config.use_dora),
        "bias": config.bias != "none",
        "modules_to_save": bool(config.modules_to_save),
        "layers_to_transform": config.layers_to_transform is not None,
    }
    bad = [key for key, wrong in problems.items() if wrong]
    if bad:
        raise MmzooError(f"{file}: {bad[0]} is not supported for import; only plain LoRA adapters load")
    return config


def _module_settings(config: Any, module: str) -> tuple[int, float]:
    """A transformers module's ``(rank, scaling)`` under ``config``'s patterns."""
    from peft.utils.other import get_pattern_key

    rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return rank, alpha / (rank**0.5 if config.use_rslora else rank)


def _read_tensors(directory: Path, mapping: WeightMapping) -> dict[str, dict[str, torch.Tensor]]:
    """On-disk HF weight name -> {"A": ..., "B": ...}, and the module's in-memory name as "module"."""
    found: dict[str, dict[str, Any]] = {}
    with SafetensorsFile(directory / WEIGHTS) as f:
        for key in f.keys():
            match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
            if match is None:
                raise MmzooError(
                    f"{directory / WEIGHTS}: {key} is not a LoRA weight; only plain LoRA adapters load"
                )
            module, part = match.groups()
            disk = mapping.canonical_hf_name(f"{module}.weight")
            found.setdefault(disk, {"module": module})[part] = f.get_tensor(key).float()
    return found


def _fuse(rule: Rule, parts: Mapping[str, Mapping[str, Any]], config: Any, where: str) -> tuple[Any, ...]:
    """One mm layer's adapter from its HF parts' adapters: ``(A, B, rank, scaling)``."""
    present = [hf for hf in rule.hf if hf in parts]
    settings = {hf: _module_settings(config, parts[hf]["module"]) for hf in present}
    scalings = {scaling for _, scaling in settings.values()}
    if len(scalings) > 1:
        raise MmzooError(
            f"{where}: {', '.join(present)} have different alpha/r ({sorted(scalings)}); mmzoo fuses them "
            "into one layer with one scaling: give them equal alpha/r"
        )
    a = torch.cat([parts[hf]["A"] for hf in present])  # (sum of ranks, in)
    rank = a.shape[0]
    blocks, start = [], 0
    for hf, rows in zip(rule.hf, _part_rows(rule, parts), strict=True):
        block = torch.zeros(rows, rank)
        if hf in parts:
            b = parts[hf]["B"]
            block[:, start : start + b.shape[1]] = b
            start += b.shape[1]
        blocks.append(block)
    return a, rule.op.merge(blocks), rank, scalings.pop()


def _part_rows(rule: Rule, parts: Mapping[str, Mapping[str, Any]]) -> list[int]:
    """Output rows of each HF part of ``rule`` (from the present parts' ``B``; QKV's sizes)."""
    op = rule.op
    if isinstance(op, QKV) and not op.fused_source:
        q, kv = op.num_heads * op.head_dim, op.num_kv_heads * op.head_dim
        return [q, kv, kv]
    rows = {parts[hf]["B"].shape[0] for hf in rule.hf if hf in parts}
    return [rows.pop()] * len(rule.hf)


def _check_adaptable(
    model: VLModel, directory: Path, found: Mapping[str, Any], by_hf: Mapping[str, Rule]
) -> None:
    """Refuse adapters on tensors mmzoo has no row-wise linear layer for (e.g. a patch Conv2d)."""
    for hf in sorted(found):
        rule = by_hf.get(hf)
        if rule is None or rule.mm is None or not _row_split(rule):
            raise MmzooError(f"model.load_adapter: {directory} adapts {hf}, which mmzoo cannot adapt")
        module = model.get_submodule(rule.mm.removesuffix(".weight"))
        if not isinstance(getattr(module, "base_layer", module), nn.Linear):
            raise MmzooError(
                f"model.load_adapter: {directory} adapts {hf} ({type(module).__name__} {rule.mm}); "
                "mmzoo adapts nn.Linear layers only"
            )


def read_peft(model: VLModel, directory: str | Path) -> ImportedAdapter:
    """A PEFT adapter trained on transformers' model of ``model``'s family, fused onto ``model``'s
    layers (a fused layer's rank is the sum of its parts'; its scaling theirs, which must agree)."""
    directory = Path(directory)
    config = _read_config(directory)
    mapping, rules = _weight_rules(model)
    by_hf = {hf: rule for rule in rules.values() for hf in rule.hf}
    found = _read_tensors(directory, mapping)
    _check_adaptable(model, directory, found, by_hf)
    imported = ImportedAdapter(LoraConfig())
    for mm in dict.fromkeys(by_hf[hf].mm for hf in found):
        assert mm is not None
        a, b, rank, scaling = _fuse(rules[mm], found, config, str(directory))
        module = mm.removesuffix(".weight")
        imported.tensors[module] = (a, b)
        imported.ranks[module], imported.alphas[module] = rank, scaling * rank
    targets = tuple(imported.tensors)
    imported.settings = LoraConfig(
        r=config.r, alpha=config.lora_alpha, dropout=config.lora_dropout, targets=targets
    )
    return imported


@torch.no_grad()
def load_imported(model: VLModel, imported: ImportedAdapter) -> None:
    """Copy an imported adapter's tensors into the LoRA layers attached for it."""
    layers = lora_layers(model)
    for module, (a, b) in imported.tensors.items():
        layer = layers[module]
        layer.lora_A[ADAPTER].weight.copy_(a)
        layer.lora_B[ADAPTER].weight.copy_(b)


def import_adapter(
    model: VLModel, directory: str | Path, modules_to_save: tuple[str, ...] = ()
) -> ImportedAdapter:
    """Attach the PEFT adapter in ``directory`` to ``model`` (in place, base frozen); returns it."""
    imported = read_peft(model, directory)
    imported.settings = replace(imported.settings, modules_to_save=modules_to_save)
    attach(model, imported.settings, ranks=imported.ranks, alphas=imported.alphas)
    load_imported(model, imported)
    return imported
