"""The mm checkpoint format: MindSpeed-MM's directories and names, safetensors plus a small JSON.

Layout (unsharded: tp=1, pp=1)::

    ROOT/latest_checkpointed_iteration.txt      "release" or an iteration number, e.g. "10"
    ROOT/{release|iter_0000010}/mp_rank_00/model.safetensors   weights under their mm names
    ROOT/{release|iter_0000010}/mp_rank_00/mm_meta.json        what the shard is

Sharded checkpoints (written by :mod:`mmzoo.checkpoint.conversion`) have one ``mp_rank_TT`` (pp=1)
or ``mp_rank_TT_PPP`` directory per rank; :func:`load_mm_model` merges any of them. A shard may
hold MindSpeed-MM's ``model_optim_rng.pt`` instead of ``model.safetensors``, and may lack
``mm_meta.json`` (then the meta is inferred: :mod:`mmzoo.checkpoint.mm_meta`). Checkpoints of
format 1 (mmzoo's earlier names, ``vision_encoder.*``/``projector.*``) are read too.

Writes are atomic: an iteration directory is written with :func:`mmzoo.files.atomic_directory`
(a temporary sibling, fsynced, renamed into place), and only then is the tracker replaced.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mmzoo.build import apply_overrides
from mmzoo.checkpoint.megatron_pt import MEGATRON_WEIGHTS
from mmzoo.checkpoint.mm_meta import infer_meta
from mmzoo.checkpoint.sources import FORMAT_VERSION, META, WEIGHTS, MMSource, first_dtype
from mmzoo.checkpoint.weights import Weights, load_weights, resolve_dtype
from mmzoo.convert.parallel import LAYOUTS, depths
from mmzoo.errors import MmzooError
from mmzoo.files import (
    SafetensorsFile,
    atomic_directory,
    atomic_file,
    clean_stale_temporaries,
    save_safetensors,
)
from mmzoo.model import VLModel
from mmzoo.registry import get_model

TRACKER = "latest_checkpointed_iteration.txt"
SHARD = "mp_rank_00"
FIRST_PP_SHARD = "mp_rank_00_000"
_ITER = re.compile(r"iter_(\d+)")
_SHARD_NAME = re.compile(r"mp_rank_\d{2}(?:_\d{3})?")


def iteration_name(iteration: int | None) -> str:
    """``None`` -> ``"release"``, ``10`` -> ``"iter_0000010"``."""
    if iteration is None:
        return "release"
    if iteration < 0:
        raise MmzooError(f"checkpoint iteration must be >= 0, got {iteration}")
    return f"iter_{iteration:07d}"


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON; a value JSON cannot hold is an MmzooError.

    Like :func:`write_tensors`, it writes inside an :func:`~mmzoo.files.atomic_directory`, which
    fsyncs every file before the directory is renamed into place.
    """
    try:
        text = json.dumps(obj, indent=2)
    except (TypeError, ValueError) as exc:
        raise MmzooError(f"cannot write {path.name}: {exc}; only JSON values can be saved") from exc
    path.write_text(text + "\n")


def read_json(path: Path) -> Any:
    """The JSON value in ``path``; a truncated or corrupt file is an MmzooError naming it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MmzooError(f"{path}: not valid JSON ({exc}); it is truncated or corrupt") from exc


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` to a safetensors file."""
    save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)


def iteration_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """The ``iter_*`` directories under ``root`` as ``(iteration, path)``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _ITER.fullmatch(p.name))]
    return sorted(found)


def write_tracker(root: Path, iteration: int | None) -> None:
    """Point ``root``'s tracker at ``iteration`` with an atomic replace."""
    with atomic_file(root / TRACKER) as f:
        f.write("release" if iteration is None else str(iteration))


@contextmanager
def staged_iteration(root: str | Path, iteration: int | None) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it becomes ``root/<iteration>`` (replacing
    one of that name) and then the tracker names it. On an exception nothing visible changes.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(root)  # every killed save's, the tracker's and other iterations' too
    with atomic_directory(root / iteration_name(iteration), replace=True) as tmp:
        yield tmp
    write_tracker(root, iteration)  # last: readers only ever see a complete directory


def mm_meta(model: VLModel, *, variant: str | None) -> dict[str, Any]:
    """The ``mm_meta.json`` contents describing ``model``'s (single) shard."""
    layers = depths(get_model(model.name).weight_mapping(model.config))
    return {
        "model": model.name,
        "variant": variant,
        "config": dataclasses.asdict(model.config),
        "tp": 1,
        "pp": 1,
        "vit_pp_layers": [layers["vision"]],
        "llm_pp_layers": [layers["text"]],
        "layout": "fused",
        "format_version": FORMAT_VERSION,
    }


def write_model_shard(
    model: VLModel,
    directory: Path,
    *,
    variant: str | None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``directory/mp_rank_00/{model.safetensors, mm_meta.json}``; returns the shard dir.

    ``tensors`` (default: the model's state dict) are the weights written, e.g. only the trained
    ones of a LoRA run."""
    shard = directory / SHARD
    shard.mkdir(parents=True, exist_ok=True)
    write_tensors(shard / WEIGHTS, model.state_dict() if tensors is None else tensors)
    write_json(shard / META, mm_meta(model, variant=variant))
    return shard


def save_mm(model: VLModel, root: str | Path, iteration: int | None = None, *, variant: str) -> Path:
    """Save ``model`` as an mm checkpoint under ``root`` and point the tracker at it.

    Args:
        model: the model; its ``state_dict()`` names are the mm names.
        root: checkpoint root (created if missing).
        iteration: training iteration, or ``None`` for a ``release`` checkpoint.
        variant: the registry variant the model's config started from (e.g. ``"tiny"``).

    Returns:
        The iteration directory, e.g. ``root/release``.
    """
    with staged_iteration(root, iteration) as tmp:
        write_model_shard(model, tmp, variant=variant)
    return Path(root) / iteration_name(iteration)


def read_tracker(root: str | Path) -> Path | None:
    """The iteration directory ``root``'s tracker names, or ``None`` when there is no tracker."""
    root = Path(root)
    tracker = root / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if text != "release" and not text.isdigit():
        raise MmzooError(f"{tracker}: expected an iteration number or 'release', found '{text[:40]}'")
    directory = root / iteration_name(None if text == "release" else int(text))
    if not directory.is_dir():
        try:  # a save killed while re-saving this iteration left its old copy aside
            clean_stale_temporaries(root, directory.name)
        except OSError:  # e.g. a read-only checkpoint: report it as it is
            pass
    if not directory.is_dir():
        raise MmzooError(f"{tracker} names '{text}' but {directory} is missing; the checkpoint is incomplete")
    return directory


def _is_shard(path: Path) -> bool:
    """Whether ``path`` is a shard directory (mm_meta.json, or an ``mp_rank_*`` with weights)."""
    if (path / META).is_file():
        return True
    named = bool(_SHARD_NAME.fullmatch(path.name))
    return named and any((path / name).is_file() for name in (WEIGHTS, MEGATRON_WEIGHTS))


def is_mm_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` looks like an mm checkpoint root, iteration or shard directory."""
    path = Path(path)
    return (
        (path / TRACKER).is_file()
        or _is_shard(path / SHARD)
        or _is_shard(path / FIRST_PP_SHARD)
        or _is_shard(path)
        or (path.is_dir() and (path.name == "release" or bool(_ITER.fullmatch(path.name))))
    )


def resolve_iteration(path: str | Path) -> Path:
    """The iteration directory for a checkpoint root (via the tracker), iteration or shard."""
    path = Path(path)
    if not path.is_dir():
        raise MmzooError(f"{path}: no such checkpoint directory")
    if _is_shard(path):
        return path.parent
    if (path / SHARD).is_dir() or (path / FIRST_PP_SHARD).is_dir():
        return path
    tracked = read_tracker(path)
    if tracked is None:
        raise MmzooError(
            f"{path}: not an mm checkpoint: no {TRACKER} here and no {SHARD}/ directory; "
            "pass the checkpoint root or an iter_*/release directory"
        )
    return tracked


def resolve_shard(path: str | Path) -> Path:
    """The first shard (``mp_rank_00`` or ``mp_rank_00_000``) of a checkpoint root, iteration or
    shard directory; a shard directory is returned as is."""
    path = Path(path)
    if path.is_dir() and _is_shard(path):
        return path
    iteration = resolve_iteration(path)
    for name in (SHARD, FIRST_PP_SHARD):
        if (iteration / name).is_dir():
            return iteration / name
    raise MmzooError(
        f"{iteration}: no {SHARD}/ or {FIRST_PP_SHARD}/; the checkpoint is incomplete or not in mm format"
    )


def read_mm_meta(path: str | Path, hf_dir: str | Path | None = None) -> dict[str, Any]:
    """The ``mm_meta.json`` of a checkpoint root, iteration or shard directory, checked.

    Without one (a MindSpeed-MM checkpoint) the meta is inferred from the shards, the config
    from ``hf_dir``'s config.json when given (see :func:`mmzoo.checkpoint.mm_meta.infer_meta`).
    """
    shard = resolve_shard(path)
    file = shard / META
    if not file.is_file():
        return infer_meta(shard.parent, hf_dir)
    meta = read_json(file)
    required = ("model", "variant", "config", "tp", "pp", "layout", "format_version")
    missing = [k for k in required if k not in meta]
    if missing:
        raise MmzooError(f"{file}: missing keys {', '.join(missing)}")
    if meta["format_version"] > FORMAT_VERSION:
        raise MmzooError(
            f"{file}: format_version {meta['format_version']} is newer than this mmzoo reads "
            f"({FORMAT_VERSION}); upgrade mmzoo"
        )
    if meta["layout"] not in LAYOUTS:
        raise MmzooError(f"{file}: unknown layout {meta['layout']!r}; expected 'fused' or 'canonical'")
    return meta


def load_mm_weights(model: torch.nn.Module, shard: Path, *, trainable_only: bool = False) -> None:
    """Copy ``shard/model.safetensors`` into ``model``'s parameters in place, one tensor at a time.

    Names are compared before any tensor is read; missing, unexpected and mis-shaped names
    are MmzooErrors, and so is a shard of format 1 (its names are not the model's). With
    ``trainable_only`` the shard holds (and fills) just the parameters that need gradients.
    """
    if read_mm_meta(shard)["format_version"] < FORMAT_VERSION:
        raise MmzooError(
            f"{shard}: written by an earlier mmzoo (format_version 1: other parameter names); its "
            "training state cannot be resumed: start a new run from its weights (model.load)"
        )
    file = shard / WEIGHTS
    if not file.is_file():
        raise MmzooError(f"{shard}: no {WEIGHTS}; the checkpoint is incomplete")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad or not trainable_only}
    with SafetensorsFile(file) as f:
        keys = set(f.keys())
        missing, unexpected = sorted(set(params) - keys), sorted(keys - set(params))
        if missing:
            raise MmzooError(
                f"{file}: {len(missing)} weights missing: {', '.join(missing[:8])}"
                f"{' ...' if len(missing) > 8 else ''}; does mm_meta.json's config match the weights?"
            )
        if unexpected:
            raise MmzooError(
                f"{file}: {len(unexpected)} unexpected weights: {', '.join(unexpected[:8])}"
                f"{' ...' if len(unexpected) > 8 else ''}; does mm_meta.json's config match the weights?"
            )
        for name, param in params.items():
            shape = tuple(f.get_slice(name).get_shape())
            if shape != tuple(param.shape):
                raise MmzooError(
                    f"{file}: shape mismatch for {name}: checkpoint gives {shape}, the model "
                    f"expects {tuple(param.shape)}; does mm_meta.json's config match the weights?"
                )
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(f.get_tensor(name))


def spec_and_config(meta: dict[str, Any], file: Path) -> tuple[Any, Any]:
    """The registry spec and the config an ``mm_meta.json`` (or ``dcp_meta.json``) describes;
    ``file``, the JSON file, is named in errors.

    ``variant`` may be ``null`` (a checkpoint converted from HF): the saved config is complete,
    so any variant serves as the base it is applied to.
    """
    try:
        spec = get_model(meta["model"])
        base = spec.variant(meta["variant"]) if meta["variant"] else next(iter(spec.variants.values()))
        return spec, apply_overrides(base, meta["config"])
    except MmzooError as exc:
        raise MmzooError(f"{file}: {exc}") from exc


def open_mm(path: str | Path, hf_dir: str | Path | None = None) -> tuple[dict[str, Any], Any, Any, MMSource]:
    """``(meta, spec, config, source)`` of an mm checkpoint, every shard's names and shapes checked.

    Args:
        path: checkpoint root, iteration or shard directory.
        hf_dir: HF checkpoint directory whose config.json describes the model, for a
            checkpoint without mm_meta.json (optional; see :func:`read_mm_meta`).
    """
    shard = resolve_shard(path)
    meta = read_mm_meta(shard, hf_dir)
    spec, config = spec_and_config(meta, shard / META)
    source = MMSource(shard.parent, meta, spec.weight_mapping(config))
    source.check()
    return meta, spec, config, source


def open_mm_weights(
    path: str | Path, dtype: torch.dtype | str | None = None, hf_dir: str | Path | None = None
) -> Weights:
    """The weights of an mm checkpoint as full mm tensors, merged from their shards on demand.

    Any tensor/pipeline-parallel split, either layout (fused, canonical) and either weights
    file (safetensors, MindSpeed-MM's ``model_optim_rng.pt``) is merged back one tensor at a time.

    Args:
        path: checkpoint root (the tracker picks the iteration), an ``iter_*``/``release``
            directory, or one of its shard directories.
        dtype: parameter dtype; ``None`` means float32, ``"auto"`` the checkpoint's own dtype.
        hf_dir: an HF directory whose config.json describes a checkpoint without mm_meta.json.
    """
    _, spec, config, source = open_mm(path, hf_dir)

    def items() -> Iterator[tuple[str, torch.Tensor]]:
        for name in source.names:
            yield name, source.get(name)

    resolved = resolve_dtype(dtype, lambda: first_dtype(source))
    hint = "is the checkpoint complete?"
    return Weights(
        spec, config, source.iteration, resolved, items, hint, read=source.get, tp_slice=source.tp_slice
    )


def load_mm_model(path: str | Path, dtype: torch.dtype | str | None = None) -> VLModel:
    """Build the model an mm checkpoint describes and stream its weights in (see :func:`open_mm_weights`)."""
    return load_weights(open_mm_weights(path, dtype))
