"""Checkpoint conversion: HF -> mm, mm -> HF, and mm -> mm with another tp/pp/layout (resplit).

The mm side read (mm -> HF, resplit) may also be a DCP training checkpoint of a run on many
ranks (:mod:`mmzoo.checkpoint.dcp`), whose tensors are read whole, one at a time.

Everything is checked before anything is written (layout, names, shapes, family, target);
output is written with :func:`mmzoo.files.atomic_directory` (a temporary sibling renamed into
place at the end), so a failed or killed conversion leaves no half-written checkpoint. Tensors
stream one at a time.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmzoo.checkpoint.dcp import DCPSource, dcp_iteration, open_dcp
from mmzoo.checkpoint.hf import HFCheckpoint
from mmzoo.checkpoint.hf_export import INDEX_NAME, TEMPLATE_FILES
from mmzoo.checkpoint.hub import resolve_model_dir
from mmzoo.checkpoint.megatron_pt import MEGATRON_WEIGHTS
from mmzoo.checkpoint.mm import iteration_name, open_mm, write_json, write_tracker
from mmzoo.checkpoint.mm_meta import meta_state
from mmzoo.checkpoint.sources import FORMAT_VERSION, HF_ASSETS, HFSource, MMSource, weights_file
from mmzoo.checkpoint.writers import (
    MEGATRON,
    SAFETENSORS,
    Report,
    Totals,
    stderr_report,
    write_hf_files,
    write_mm_shards,
)
from mmzoo.convert.mapping import REPLICATE, WeightMapping
from mmzoo.convert.parallel import FUSED, ParallelLayout, depths, tp_problem
from mmzoo.errors import MmzooError
from mmzoo.files import atomic_directory
from mmzoo.registry import ModelSpec, model_for_architecture

WEIGHT_MAP = "weight_map.json"
DEFAULT_SHARD_BYTES = 5 * 2**30


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise MmzooError(f"{out}: already exists; choose a new directory or pass --force")


def make_layout(
    depths: dict[str, int],
    tp: int,
    vit_pp_layers: Sequence[int] | None,
    llm_pp_layers: Sequence[int] | None,
    layout: str,
) -> ParallelLayout:
    """A checked :class:`ParallelLayout`; missing pp lists mean one stage holding every layer."""
    llm = tuple(llm_pp_layers) if llm_pp_layers else (depths["text"],)
    vit = tuple(vit_pp_layers) if vit_pp_layers else (depths["vision"],) + (0,) * (len(llm) - 1)
    result = ParallelLayout(tp, vit, llm, layout)
    result.check(depths)
    return result


def _check_tp(mapping: WeightMapping, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], tp: int) -> None:
    for rule in mapping.rules:
        if rule.mm is None or rule.tp == REPLICATE or rule.mm not in specs:
            continue
        problem = rule.op.tp_problem(tp) or tp_problem(rule.mm, specs[rule.mm][1], rule.tp, tp)
        if problem:
            raise MmzooError(f"cannot split {rule.mm} for tp={tp}: {problem}")


def _copy_hf_assets(src: Path, dst: Path, files: Sequence[str]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in files:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _open_source(
    path: str | Path, template: str | Path | None
) -> tuple[dict[str, Any], ModelSpec, Any, MMSource | DCPSource]:
    """``(meta, spec, config, source)`` of an mm checkpoint or a DCP training checkpoint, checked."""
    if dcp_iteration(path) is not None:
        return open_dcp(path)
    return open_mm(path, template)


def _template(template: str | Path | None) -> Path | None:
    """An HF template directory, or the Hub snapshot a ``org/name[@revision]`` id names."""
    return None if template is None else resolve_model_dir(template)


def _weights_format(source: MMSource | DCPSource) -> str:
    """The weights format of a source's shards (a DCP checkpoint's: the default, safetensors)."""
    if isinstance(source, MMSource) and weights_file(source.shard(0, 0)).name == MEGATRON_WEIGHTS:
        return MEGATRON
    return SAFETENSORS


def _read_hf(hf_dir: str | Path, model: str | None) -> tuple[HFCheckpoint, ModelSpec, Any]:
    """An HF checkpoint, its family (which must be ``model`` when given) and its model config."""
    checkpoint = HFCheckpoint(resolve_model_dir(hf_dir))
    spec = model_for_architecture(checkpoint.architecture)
    if model is not None and spec.name != model:
        raise MmzooError(
            f"{checkpoint.path}: is a {spec.name} checkpoint ({checkpoint.architecture}), not {model}"
        )
    try:
        return checkpoint, spec, spec.config_from_hf(checkpoint.config)
    except (KeyError, TypeError, ValueError) as exc:
        raise MmzooError(f"{checkpoint.path / 'config.json'}: cannot read it as {spec.name}: {exc}") from exc


def hf_to_mm(
    hf_dir: str | Path,
    mm_dir: str | Path,
    *,
    model: str | None = None,
    tp: int = 1,
    vit_pp_layers: Sequence[int] | None = None,
    llm_pp_layers: Sequence[int] | None = None,
    layout: str = FUSED,
    weights_format: str = SAFETENSORS,
    force: bool = False,
    report: Report = stderr_report,
) -> Path:
    """Convert an HF checkpoint directory into an mm checkpoint root (``release``).

    Args:
        hf_dir: config.json + safetensors (either HF key layout), or a Hub id ``org/name[@revision]``.
        mm_dir: the checkpoint root to create.
        model: expected family (registry name); an HF checkpoint of another family is an error.
        tp: tensor-parallel size.
        vit_pp_layers: vision layers per pipeline stage (default: all on one stage).
        llm_pp_layers: LLM layers per pipeline stage (default: all on one stage).
        layout: ``"fused"`` or ``"canonical"``.
        weights_format: ``"safetensors"`` (``model.safetensors``) or ``"megatron"``
            (MindSpeed-MM's ``model_optim_rng.pt``); ``mm_meta.json`` is written beside either.
        force: replace an existing ``mm_dir``.
        report: receives progress lines.

    Returns:
        ``mm_dir``.
    """
    out = Path(mm_dir)
    _check_target(out, force)
    checkpoint, spec, config = _read_hf(hf_dir, model)
    mapping = spec.weight_mapping(config)
    parallel = make_layout(depths(mapping), tp, vit_pp_layers, llm_pp_layers, layout)
    source = HFSource(checkpoint, mapping)
    source.check_names()
    expected = meta_state(spec, config)
    source.check_shapes(expected)
    specs = {name: source.spec(name) for name in source.names}
    _check_tp(mapping, specs, tp)
    meta = {
        "model": spec.name,
        "variant": spec.variant_of(config),
        "config": dataclasses.asdict(config),
        "format_version": FORMAT_VERSION,
    }
    totals = Totals()
    with atomic_directory(out, replace=force) as tmp:
        iteration = tmp / iteration_name(None)
        iteration.mkdir()
        write_mm_shards(iteration, source, mapping, parallel, meta, totals, report, weights_format)
        assets = iteration / HF_ASSETS
        _copy_hf_assets(checkpoint.path, assets, ("config.json", *TEMPLATE_FILES))
        write_json(assets / WEIGHT_MAP, dict(sorted(checkpoint.files.items())))
        write_tracker(tmp, None)
    report(totals.summary(out))
    return out


def resplit(
    src: str | Path,
    dst: str | Path,
    *,
    tp: int = 1,
    vit_pp_layers: Sequence[int] | None = None,
    llm_pp_layers: Sequence[int] | None = None,
    layout: str | None = None,
    weights_format: str | None = None,
    template: str | Path | None = None,
    force: bool = False,
    report: Report = stderr_report,
) -> Path:
    """Rewrite an mm checkpoint, or a DCP training checkpoint, with another tp/pp split (and
    optionally layout and weights format: ``None`` keeps the source's) under ``dst``.

    The result equals :func:`hf_to_mm` straight to the new split, bit for bit. The source's
    iteration name and HF assets are kept. ``template``: an HF checkpoint directory whose
    config.json describes a source without mm_meta.json (see :func:`open_mm`).
    """
    out = Path(dst)
    _check_target(out, force)
    meta, spec, config, source = _open_source(src, _template(template))
    iteration, mapping = source.iteration, spec.weight_mapping(config)
    parallel = make_layout(depths(mapping), tp, vit_pp_layers, llm_pp_layers, layout or meta["layout"])
    _check_tp(mapping, {name: source.spec(name) for name in source.names}, tp)
    weights_format = weights_format or _weights_format(source)
    base = {**{k: meta[k] for k in ("model", "variant", "config")}, "format_version": FORMAT_VERSION}
    totals = Totals()
    with atomic_directory(out, replace=force) as tmp:
        target = tmp / iteration.name
        target.mkdir()
        write_mm_shards(target, source, mapping, parallel, base, totals, report, weights_format)
        if (iteration / HF_ASSETS).is_dir():
            shutil.copytree(iteration / HF_ASSETS, target / HF_ASSETS)
        number = None if iteration.name == "release" else int(iteration.name.removeprefix("iter_"))
        write_tracker(tmp, number)
    report(totals.summary(out))
    return out


def _hf_file_plan(
    mapping: WeightMapping,
    source: MMSource | DCPSource,
    weight_map: dict[str, str] | None,
    max_shard_bytes: int,
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(file -> canonical HF names, canonical -> written name): the original's sharding when it
    covers every tensor, else greedy shards of at most ``max_shard_bytes``."""
    produced = [h for r in mapping.rules if r.mm is not None for h in r.hf]
    if weight_map:
        original = {mapping.canonical_hf_name(k): k for k in weight_map}
        if all(h in original for h in produced):
            files: dict[str, list[str]] = {}
            order = {h: i for i, h in enumerate(produced)}
            for h in sorted(produced, key=lambda h: (weight_map[original[h]], order[h])):
                files.setdefault(weight_map[original[h]], []).append(h)
            return files, original
    groups: list[list[str]] = []
    used = 0
    for rule in mapping.rules:
        if rule.mm is None:
            continue
        dtype, shape = source.spec(rule.mm)
        size = torch.empty(shape, dtype=dtype, device="meta").nbytes
        if groups and used + size <= max_shard_bytes:
            groups[-1].extend(rule.hf)
            used += size
        else:
            groups.append(list(rule.hf))
            used = size
    n = len(groups)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    )
    return dict(zip(names, groups, strict=True)), {}


def mm_to_hf(
    mm_dir: str | Path,
    hf_dir: str | Path,
    *,
    template: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    report: Report = stderr_report,
) -> Path:
    """Convert an mm checkpoint (any tp/pp/layout/weights format), or a DCP training checkpoint
    (a run directory or its ``iter_*`` directory), into an HF checkpoint directory.

    config.json, tokenizer and processor files come from ``template`` (an HF checkpoint
    directory, e.g. the original) or else from the mm checkpoint's ``hf_assets``; config.json
    falls back to the family's ``config_to_hf``. Weights are sharded as the original was
    (its weight map, key layout included) when known, else in shards of ``max_shard_bytes``.
    A checkpoint without mm_meta.json (MindSpeed-MM's) takes its model config from
    ``template`` or ``hf_assets`` when there, else from the registered variant it matches.
    """
    out = Path(hf_dir)
    _check_target(out, force)
    template = _template(template)
    meta, spec, config, source = _open_source(mm_dir, template)
    iteration, mapping = source.iteration, spec.weight_mapping(config)
    assets = iteration / HF_ASSETS
    weight_map: dict[str, str] | None = None
    side: Path | None = assets if assets.is_dir() else None
    if template is not None:
        reference = HFCheckpoint(template)
        if model_for_architecture(reference.architecture).name != spec.name:
            raise MmzooError(f"{reference.path}: is not a {spec.name} checkpoint ({reference.architecture})")
        weight_map, side = reference.files, reference.path
    elif (assets / WEIGHT_MAP).is_file():
        weight_map = json.loads((assets / WEIGHT_MAP).read_text())
    files, rename = _hf_file_plan(mapping, source, weight_map, max_shard_bytes)
    totals = Totals()
    with atomic_directory(out, replace=force) as tmp:
        written = write_hf_files(tmp, source, mapping, files, rename, totals, report)
        if side is not None:
            _copy_hf_assets(side, tmp, ("config.json", *TEMPLATE_FILES))
        if not (tmp / "config.json").is_file():
            if spec.config_to_hf is None:
                raise MmzooError(f"model '{spec.name}' gives no config_to_hf; pass --hf-template")
            hf_config = dict(spec.config_to_hf(config))
            hf_config["dtype"] = str(source.spec(source.names[0])[0]).removeprefix("torch.")
            write_json(tmp / "config.json", hf_config)
        if len(files) > 1:
            write_json(tmp / INDEX_NAME, {"metadata": {"total_size": totals.bytes}, "weight_map": written})
    report(totals.summary(out))
    return out
