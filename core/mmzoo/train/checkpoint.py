"""Training checkpoints: the mm layout plus optimizer, scheduler, RNG and trainer state.

One ``OUTPUT/iter_0000010/`` directory per save, written atomically (see
:mod:`mmzoo.checkpoint.mm`)::

    mp_rank_00/model.safetensors, mm_meta.json    the weights, loadable with mmzoo.load_model
    mp_rank_00/optimizer.safetensors, .json       state tensors keyed "<parameter name>/<key>"
    mp_rank_00/rng.safetensors, rng.json          torch CPU/CUDA, numpy and Python RNG states
    scheduler.json                                the LR scheduler's state_dict
    trainer_state.json                            what the loop passes (step, epoch, ...)
    media.json                                    the data.media settings training used
    lora.json                                     LoRA runs: the adapters and the base model

A LoRA run's ``model.safetensors`` and optimizer state hold only the trained parameters (the
adapters and ``modules_to_save``); ``lora.json`` says how to rebuild the rest (see
:mod:`mmzoo.lora.checkpoint`).

Optimizer and RNG state sit in the rank directory because they are per rank once the
model is split; the scheduler and trainer state are global. Nothing is pickled.
"""

from __future__ import annotations

import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmzoo.checkpoint.mm import (
    TRACKER,
    is_mm_checkpoint,
    iteration_dirs,
    iteration_name,
    load_mm_weights,
    read_json,
    read_mm_meta,
    read_tracker,
    resolve_iteration,
    resolve_shard,
    staged_iteration,
    write_json,
    write_model_shard,
    write_tensors,
)
from mmzoo.errors import MmzooError
from mmzoo.files import SafetensorsFile, temporary_path
from mmzoo.lora.checkpoint import LORA

OPTIMIZER = "optimizer"
RNG = "rng"
SCHEDULER = "scheduler.json"
TRAINER_STATE = "trainer_state.json"
MEDIA = "media.json"


def _group_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Parameter names of each optimizer group, in the group's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        unknown = sum(id(p) not in names for p in group["params"])
        if unknown:
            raise MmzooError(f"optimizer group {i} holds {unknown} parameters that are not in the model")
        groups.append([names[id(p)] for p in group["params"]])
    return groups


def _write_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, shard: Path) -> None:
    groups = _group_names(model, optimizer)
    flat = [n for g in groups for n in g]  # state_dict() numbers parameters in this order
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{flat[index]}/{key}"] = value
            else:
                scalars.setdefault(flat[index], {})[key] = value
    param_groups = [
        {**{k: v for k, v in saved.items() if k != "params"}, "params": names}
        for saved, names in zip(state["param_groups"], groups, strict=True)
    ]
    write_tensors(shard / f"{OPTIMIZER}.safetensors", tensors)
    write_json(
        shard / f"{OPTIMIZER}.json",
        {"type": type(optimizer).__name__, "param_groups": param_groups, "state_scalars": scalars},
    )


def _read_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, shard: Path) -> None:
    saved = read_json(shard / f"{OPTIMIZER}.json")
    where = shard / f"{OPTIMIZER}.json"
    if saved["type"] != type(optimizer).__name__:
        raise MmzooError(f"{where}: saved by {saved['type']}, cannot load into {type(optimizer).__name__}")
    groups = _group_names(model, optimizer)
    if len(saved["param_groups"]) != len(groups):
        raise MmzooError(
            f"{where}: {len(saved['param_groups'])} parameter groups saved, the optimizer has {len(groups)}"
        )
    for i, (group, names) in enumerate(zip(saved["param_groups"], groups, strict=True)):
        missing, extra = sorted(set(names) - set(group["params"])), sorted(set(group["params"]) - set(names))
        if missing or extra:
            raise MmzooError(
                f"{where}: group {i} differs from the optimizer's: "
                f"not saved: {', '.join(missing[:4]) or '-'}; "
                f"saved but not optimized: {', '.join(extra[:4]) or '-'}; were the same parameters frozen?"
            )
    index = {n: i for i, n in enumerate(n for g in groups for n in g)}
    state: dict[int, dict[str, Any]] = {}
    with SafetensorsFile(shard / f"{OPTIMIZER}.safetensors") as f:
        for key in f.keys():
            name, _, field = key.rpartition("/")
            state.setdefault(index[name], {})[field] = f.get_tensor(key)
    for name, values in saved["state_scalars"].items():
        state.setdefault(index[name], {}).update(values)
    param_groups = []
    for group, current, names in zip(saved["param_groups"], optimizer.param_groups, groups, strict=True):
        restored = {
            k: tuple(v) if isinstance(v, list) and isinstance(current.get(k), tuple) else v
            for k, v in group.items()
            if k != "params"
        }
        # load_state_dict pairs saved indices with the optimizer's parameters by position.
        param_groups.append({**restored, "params": [index[n] for n in names]})
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def write_rng(shard: Path) -> None:
    """This process's torch, CUDA, numpy and Python RNG states into ``shard/rng.{safetensors,json}``."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    tensors.update({f"cuda_{i}": s for i, s in enumerate(cuda)})
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, py_state, gauss_next = random.getstate()
    info = {
        "cuda_devices": len(cuda),
        "numpy": {
            "kind": kind,
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
    }
    write_tensors(shard / f"{RNG}.safetensors", tensors)
    write_json(shard / f"{RNG}.json", info)


def read_rng(shard: Path) -> None:
    """Restore the RNG states :func:`write_rng` saved."""
    info = read_json(shard / f"{RNG}.json")
    with SafetensorsFile(shard / f"{RNG}.safetensors") as f:
        torch.set_rng_state(f.get_tensor("torch_cpu"))
        if info["cuda_devices"] and torch.cuda.is_available():
            for i in range(min(info["cuda_devices"], torch.cuda.device_count())):
                torch.cuda.set_rng_state(f.get_tensor(f"cuda_{i}"), i)
        keys = f.get_tensor("numpy_keys").numpy().astype(np.uint32)
    n = info["numpy"]
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = info["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))


def _remove(iteration: Path) -> None:
    # Hide it first so a crash mid-delete leaves no half-deleted iter_* in view.
    hidden = temporary_path(iteration.parent, iteration.name, "del")
    iteration.rename(hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def prune(root: Path, keep_last: int, current: Path) -> None:
    """Delete the oldest ``iter_*`` directories but ``current`` so that ``keep_last`` remain."""
    others = [p for _, p in iteration_dirs(root) if p != current]
    for old in others[: max(0, len(others) - (keep_last - 1))]:
        _remove(old)


def remove_checkpoints(output_dir: str | Path) -> None:
    """Delete a run directory's tracker (first, so it never names a deleted directory) and iterations."""
    root = Path(output_dir)
    (root / TRACKER).unlink(missing_ok=True)
    for _, iteration in iteration_dirs(root):
        _remove(iteration)


@dataclass
class TrainingCheckpoint:
    """What a training checkpoint holds.

    Attributes:
        model: a :class:`mmzoo.VLModel` (its state dict names are the mm names).
        optimizer: its state is saved keyed by parameter name.
        scheduler: an LR scheduler with a JSON-able ``state_dict()`` (LambdaLR is), or ``None``.
        trainer_state: JSON-able loop state (step, epoch, position in the epoch, tokens seen, ...).
        variant: the registry variant the model's config started from (``None``: none).
        media: the media processor options the model was trained with (``data.media``);
            ``mmzoo infer`` and ``mmzoo eval`` size media the same way by default.
        lora: a LoRA run's record (:func:`mmzoo.lora.checkpoint.lora_record`): only the trained
            parameters are saved, and the record says how to rebuild the rest.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    trainer_state: dict[str, Any] = field(default_factory=dict)
    variant: str | None = None
    media: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None


@dataclass(frozen=True)
class SaveOptions:
    """How checkpoints are written (``train.save_optimizer``, ``train.save_rng``, ``train.keep_last``).

    Attributes:
        save_optimizer: write the optimizer state (needed to resume exactly).
        save_rng: write the RNG states.
        keep_last: keep this many ``iter_*`` directories (the new one included); ``None``: all.
    """

    save_optimizer: bool = True
    save_rng: bool = True
    keep_last: int | None = None

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            keep = self.keep_last
            raise MmzooError(f"train.keep_last must be at least 1 (or null to keep all), got {keep}")


def save_training_checkpoint(
    output_dir: str | Path, step: int, contents: TrainingCheckpoint, options: SaveOptions = SaveOptions()
) -> Path:
    """Write ``output_dir/iter_{step:07d}`` atomically, point the tracker at it, prune old ones.

    Args:
        output_dir: run directory (created if missing).
        step: optimizer steps taken; names the directory.
        contents: the model, optimizer, scheduler and loop state to save.
        options: what to include and how many checkpoints to keep.

    Returns:
        The new iteration directory.
    """
    root = Path(output_dir)
    model = contents.model
    with staged_iteration(root, step) as tmp:
        trained = None if contents.lora is None else _trained(model)
        shard = write_model_shard(model, tmp, variant=contents.variant, tensors=trained)  # type: ignore[arg-type]
        if options.save_optimizer:
            _write_optimizer(contents.optimizer, model, shard)
        if contents.scheduler is not None:
            write_json(tmp / SCHEDULER, contents.scheduler.state_dict())
        if options.save_rng:
            write_rng(shard)
        write_json(tmp / TRAINER_STATE, contents.trainer_state)
        if contents.media is not None:
            write_json(tmp / MEDIA, contents.media)
        if contents.lora is not None:
            write_json(tmp / LORA, contents.lora)
    final = root / iteration_name(step)
    if options.keep_last is not None:
        prune(root, options.keep_last, final)
    return final


def _trained(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def trained_media(path: str | Path) -> dict[str, Any]:
    """The media options a checkpoint was trained with (``{}`` when it records none).

    Args:
        path: any checkpoint directory; only mm checkpoints saved by ``mmzoo train`` have them.
    """
    if not is_mm_checkpoint(path):
        return {}
    file = resolve_iteration(path) / MEDIA
    if not file.is_file():
        return {}
    media = read_json(file)
    if not isinstance(media, dict):
        raise MmzooError(f"{file}: expected a mapping of media options, found {type(media).__name__}")
    return media


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The iteration directory ``output_dir``'s tracker names, or ``None`` if nothing was saved.

    A tracker naming a missing directory is an MmzooError.
    """
    return read_tracker(output_dir) if Path(output_dir).is_dir() else None


def load_training_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    *,
    load_optimizer: bool = True,
    load_rng: bool = True,
) -> dict[str, Any]:
    """Restore a training checkpoint into existing objects, in place.

    Args:
        path: the run directory (the tracker picks the iteration) or an ``iter_*`` directory.
        model: receives the weights (names and shapes must match exactly).
        optimizer: receives its state, matched by parameter name.
        scheduler: receives ``scheduler.json`` (skipped when ``None``).
        load_optimizer: restore the optimizer (an error if the checkpoint has none).
        load_rng: restore the RNG states (a warning if the checkpoint has none).

    Returns:
        The saved ``trainer_state``.
    """
    shard = resolve_shard(path)
    directory = shard.parent
    meta = read_mm_meta(shard)
    name = getattr(model, "name", None)
    if name is not None and meta["model"] != name:
        raise MmzooError(f"{directory}: holds a '{meta['model']}' model, cannot load it into '{name}'")
    # Check every file first so a bad checkpoint leaves the objects untouched.
    if load_optimizer:
        if optimizer is None:
            raise MmzooError("load_optimizer=True needs an optimizer; pass one or load_optimizer=False")
        if not (shard / f"{OPTIMIZER}.json").is_file():
            raise MmzooError(
                f"{directory}: has no optimizer state (saved with save_optimizer=False); "
                "pass load_optimizer=False to start a fresh optimizer"
            )
    if scheduler is not None and not (directory / SCHEDULER).is_file():
        raise MmzooError(f"{directory}: has no {SCHEDULER}; it was saved without a scheduler")
    if not (directory / TRAINER_STATE).is_file():
        raise MmzooError(f"{directory}: no {TRAINER_STATE}; is this a training checkpoint?")
    trainer_state = read_json(directory / TRAINER_STATE)
    schedule = read_json(directory / SCHEDULER) if scheduler is not None else None

    lora = (directory / LORA).is_file()
    if lora != any(".lora_A." in name for name, _ in model.named_parameters()):
        saved, model_has = ("with", "none") if lora else ("without", "some")
        raise MmzooError(
            f"{directory}: saved {saved} LoRA adapters, the model has {model_has}; "
            "set model.lora as the run that saved it did"
        )
    load_mm_weights(model, shard, trainable_only=lora)
    if load_optimizer:
        assert optimizer is not None
        _read_optimizer(optimizer, model, shard)
    if scheduler is not None:
        scheduler.load_state_dict(schedule)
    if load_rng:
        if (shard / f"{RNG}.json").is_file():
            read_rng(shard)
        else:
            warnings.warn(f"{directory}: no RNG state saved; random streams start afresh", stacklevel=2)
    return trainer_state


__all__ = [
    "SaveOptions",
    "TrainingCheckpoint",
    "latest_checkpoint",
    "load_training_checkpoint",
    "remove_checkpoints",
    "save_training_checkpoint",
    "trained_media",
]
