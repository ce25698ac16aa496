"""The meta of an mm checkpoint that has no ``mm_meta.json`` (MindSpeed-MM writes none).

tp and pp come from the ``mp_rank_TT[_PPP]`` directories, each stage's layer counts from the
layer indices its tensor names hold after each stack's prefix in the family's weight mapping,
the layout (fused or canonical) from which layout's names the shards hold, and the tensors'
shapes are checked against the config. The config comes
from an HF ``config.json``: one the caller names, else ``hf_assets/config.json`` beside the
shards; without either, every registered variant is tried and the one the names and shapes fit
is taken.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from mmzoo.build import compose
from mmzoo.checkpoint.sources import (
    FORMAT_VERSION,
    HF_ASSETS,
    META,
    MMSource,
    ShardWeights,
    shard_dirs,
    shard_ranks,
)
from mmzoo.convert.mapping import WeightMapping
from mmzoo.convert.parallel import FUSED, GROUPS, LAYOUTS, ParallelLayout, depths
from mmzoo.errors import MmzooError
from mmzoo.registry import ModelSpec, all_models, model_for_architecture


def meta_state(spec: ModelSpec, config: Any) -> dict[str, torch.Tensor]:
    """The model's state dict on the meta device: names, shapes and dtypes, no memory."""
    with torch.device("meta"):
        return dict(compose(spec, config).state_dict())


def _grid(iteration: Path) -> tuple[int, int]:
    """(tp, pp) from the shard directories; a hole in the grid is an MmzooError."""
    dirs = shard_dirs(iteration)
    if not dirs:
        raise MmzooError(f"{iteration}: no mp_rank_* directories; the checkpoint is incomplete")
    ranks = {shard_ranks(d) for d in dirs}
    tp, pp = max(t for t, _ in ranks) + 1, max(p for _, p in ranks) + 1
    layout = ParallelLayout(tp, (0,) * pp, (0,) * pp)
    missing = [layout.shard_name(t, p) for p, t in layout.shards() if (t, p) not in ranks]
    if missing or len(ranks) != len(dirs):
        listed = ", ".join(missing) if missing else "mp_rank_TT and mp_rank_TT_PPP mixed"
        raise MmzooError(f"{iteration}: shard directories do not form a tp x pp grid ({listed})")
    return tp, pp


def _fit(
    iteration: Path, spec: ModelSpec, config: Any, tp: int, stage_names: list[set[str]]
) -> dict[str, Any] | str:
    """The meta of the checkpoint read as ``config``, or why it does not fit."""
    mapping: WeightMapping = spec.weight_mapping(config)
    want = depths(mapping)
    held = [mapping.layers_held(names) for names in stage_names]
    counts = {group: tuple(h.get(group, 0) for h in held) for group in GROUPS}
    for group in GROUPS:
        if sum(counts[group]) != want[group]:
            return f"the shards hold {sum(counts[group])} {group} layers, the config {want[group]}"
    parallels = [ParallelLayout(tp, counts["vision"], counts["text"], layout) for layout in LAYOUTS]
    parallel = next(
        (
            p
            for p in parallels
            if all({e.name for e in p.stage_entries(mapping, s)} == n for s, n in enumerate(stage_names))
        ),
        None,
    )
    if parallel is None:
        fused = parallels[LAYOUTS.index(FUSED)]
        for stage, have in enumerate(stage_names):
            want_names = {e.name for e in fused.stage_entries(mapping, stage)}
            missing, unexpected = sorted(want_names - have), sorted(have - want_names)
            if missing or unexpected:
                shard = fused.shard_name(0, stage)
                return (
                    f"{shard} lacks {len(missing)} names of the fused layout ({', '.join(missing[:3])}) "
                    f"and has {len(unexpected)} others ({', '.join(unexpected[:3])})"
                )
    assert parallel is not None
    meta = {
        "model": spec.name,
        "variant": spec.variant_of(config),
        "config": dataclasses.asdict(config),
        "tp": tp,
        "pp": parallel.pp,
        "vit_pp_layers": list(parallel.vit_pp_layers),
        "llm_pp_layers": list(parallel.llm_pp_layers),
        "layout": parallel.layout,
        "format_version": FORMAT_VERSION,
    }
    try:
        parallel.check(want)
        source = MMSource(iteration, meta, mapping)
        source.check()
    except MmzooError as exc:
        return str(exc)
    expected = meta_state(spec, config)
    for name in source.names:
        shape = source.spec(name)[1]
        if shape != tuple(expected[name].shape):
            return f"{name} has shape {shape}, the config implies {tuple(expected[name].shape)}"
    return meta


def _config_file(iteration: Path, hf_dir: str | Path | None) -> Path | None:
    if hf_dir is not None:
        file = Path(hf_dir) / "config.json"
        if not file.is_file():
            raise MmzooError(
                f"{hf_dir}: no config.json; pass the HF checkpoint directory the model came from"
            )
        return file
    file = iteration / HF_ASSETS / "config.json"
    return file if file.is_file() else None


def infer_meta(iteration: Path, hf_dir: str | Path | None = None) -> dict[str, Any]:
    """The ``mm_meta.json`` contents an iteration directory without one implies.

    Args:
        iteration: an ``iter_*``/``release`` directory of ``mp_rank_*`` shards.
        hf_dir: an HF checkpoint directory whose ``config.json`` describes the model (default:
            ``iteration/hf_assets/config.json`` if present, else the registered variants).
    """
    tp, pp = _grid(iteration)
    layout = ParallelLayout(tp, (0,) * pp, (0,) * pp)
    stage_names = [ShardWeights(iteration / layout.shard_name(0, stage)).keys() for stage in range(pp)]
    file = _config_file(iteration, hf_dir)
    if file is not None:
        try:
            hf = json.loads(file.read_text())
            spec = model_for_architecture((hf.get("architectures") or ["(none)"])[0])
            config = spec.config_from_hf(hf)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise MmzooError(f"{file}: cannot read the model config from it ({exc})") from exc
        found = _fit(iteration, spec, config, tp, stage_names)
        if isinstance(found, str):
            raise MmzooError(f"{iteration}: does not hold the {spec.name} model {file} describes: {found}")
        return found
    tried = []
    for spec in (registered.spec for registered in all_models()):
        for variant, config in spec.variants.items():
            found = _fit(iteration, spec, config, tp, stage_names)
            if not isinstance(found, str):
                return found
            tried.append(f"{spec.name} {variant}")
    raise MmzooError(
        f"{iteration}: has no {META}, and its names and shapes match no registered variant "
        f"({', '.join(tried)}); pass the HF checkpoint it came from (--hf-template) or copy that "
        f"checkpoint's config.json to {iteration / HF_ASSETS / 'config.json'}"
    )
