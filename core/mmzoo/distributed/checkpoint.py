"""Saving and resuming a run on many ranks with DCP (layout in :mod:`mmzoo.checkpoint.dcp`).

Every rank writes its shards of the model and optimizer state and its RNG states into one
staging directory that rank 0 created; rank 0 adds the JSON files and, once every rank has
succeeded, renames the directory into place and then points the tracker at it. A rank killed
mid-save leaves the previous checkpoint as it was. DCP reshards on load, so a checkpoint resumes
on any number of ranks, or in one process; tensors a tensor-parallel model holds in another row
order are saved and loaded in the checkpoints' order (:mod:`mmzoo.distributed.row_order`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from mmzoo.checkpoint.dcp import DCP_META, MODEL, OPTIMIZER, DCPSource, dcp_meta, read_dcp_meta
from mmzoo.checkpoint.dcp_reader import SINGLE_PROCESS, first_error
from mmzoo.checkpoint.mm import iteration_name, read_json, staged_iteration, write_json
from mmzoo.distributed.env import World, agree, barrier
from mmzoo.distributed.row_order import in_canonical_order
from mmzoo.errors import MmzooError
from mmzoo.lora.checkpoint import LORA
from mmzoo.nn.tp_layout import held_row_orders
from mmzoo.train.checkpoint import (
    MEDIA,
    SCHEDULER,
    TRAINER_STATE,
    SaveOptions,
    TrainingCheckpoint,
    prune,
    read_rng,
    write_rng,
)


def _rank_dir(iteration: Path, rank: int) -> Path:
    return iteration / "rng" / f"rank_{rank:05d}"


def _options(contents: TrainingCheckpoint) -> StateDictOptions:
    """A LoRA run's checkpoints hold only the trained parameters (the frozen base is rebuilt)."""
    lora = contents.lora is not None
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora)


def _state(contents: TrainingCheckpoint, with_optimizer: bool) -> dict[str, Any]:
    options = _options(contents)
    if not with_optimizer:  # get_state_dict would give an optimizer without state a first step
        return {MODEL: get_model_state_dict(contents.model, options=options)}
    model_state, optimizer_state = get_state_dict(contents.model, contents.optimizer, options=options)
    return {MODEL: model_state, OPTIMIZER: optimizer_state}


def _write(world: World, tmp: Path, contents: TrainingCheckpoint, options: SaveOptions) -> None:
    """Every rank's part of a save into the staging directory ``tmp``; failures raise on all ranks."""
    error: Exception | None = None
    try:
        state = _state(contents, options.save_optimizer)
        restore = in_canonical_order(state, held_row_orders(contents.model))
        try:
            dcp.save(state, checkpoint_id=str(tmp))
        finally:
            restore()  # the state dict shares the optimizer's own per-parameter dicts
        if options.save_rng:
            rank_dir = _rank_dir(tmp, world.rank)
            rank_dir.mkdir(parents=True, exist_ok=True)
            write_rng(rank_dir)
        if world.main:
            model = contents.model
            write_json(tmp / DCP_META, dcp_meta(model, variant=contents.variant, world_size=world.size))
            if contents.scheduler is not None:
                write_json(tmp / SCHEDULER, contents.scheduler.state_dict())
            write_json(tmp / TRAINER_STATE, contents.trainer_state)
            if contents.media is not None:
                write_json(tmp / MEDIA, contents.media)
            if contents.lora is not None:
                write_json(tmp / LORA, contents.lora)
    except Exception as exc:
        error = exc
    agree(world, error)


def save_dcp_checkpoint(
    world: World, output_dir: str | Path, step: int, contents: TrainingCheckpoint, options: SaveOptions
) -> Path:
    """Save ``output_dir/iter_{step:07d}`` from every rank (all must call it); returns the directory."""
    root = Path(output_dir)
    if world.main:
        with staged_iteration(root, step) as tmp:
            shared: list[Any] = [str(tmp)]
            dist.broadcast_object_list(shared, src=0)
            _write(world, tmp, contents, options)
    else:
        shared = [None]
        dist.broadcast_object_list(shared, src=0)
        _write(world, Path(shared[0]), contents, options)
    barrier(world)  # the directory and the tracker are in place before any rank goes on
    final = root / iteration_name(step)
    if world.main and options.keep_last is not None:
        prune(root, options.keep_last, final)
    return final


def load_dcp_checkpoint(
    world: World,
    iteration: Path,
    contents: TrainingCheckpoint,
    *,
    load_optimizer: bool = True,
    load_rng: bool = True,
) -> dict[str, Any]:
    """Restore a DCP checkpoint into ``contents``' model, optimizer and scheduler, on any number of
    ranks (every rank calls it); returns the saved trainer state."""
    meta = read_dcp_meta(iteration)
    if meta["model"] != contents.model.name:  # type: ignore[union-attr]
        raise MmzooError(f"{iteration}: holds a '{meta['model']}' model, not '{contents.model.name}'")
    DCPSource(iteration).check_files()  # a rank's file lost or cut short: one line, not a traceback
    state = _state(contents, load_optimizer)
    restore = in_canonical_order(state, held_row_orders(contents.model))
    try:
        with warnings.catch_warnings():  # one process resuming a run of many: torch says so, rightly
            warnings.filterwarnings("ignore", message=SINGLE_PROCESS, category=UserWarning)
            dcp.load(state, checkpoint_id=str(iteration))
    except (CheckpointException, RuntimeError, ValueError, KeyError) as exc:
        _, detail = first_error(exc)
        what = "no optimizer state (pass train.load_optimizer=false)" if load_optimizer else "damage"
        raise MmzooError(f"{iteration}: cannot load it ({detail}); does it hold {what}?") from exc
    restore()  # the parameters' own entries, filled through the canonical views
    if load_optimizer:
        set_state_dict(
            contents.model,
            contents.optimizer,
            model_state_dict=state[MODEL],
            optim_state_dict=state[OPTIMIZER],
            options=_options(contents),
        )
    else:
        set_model_state_dict(contents.model, state[MODEL], options=_options(contents))
    if contents.scheduler is not None:
        contents.scheduler.load_state_dict(read_json(iteration / SCHEDULER))
    rank_dir = _rank_dir(iteration, world.rank)
    if load_rng and (rank_dir / "rng.json").is_file():
        read_rng(rank_dir)
    saved = sum(1 for rank in range(world.size) if (_rank_dir(iteration, rank) / "rng.json").is_file())
    if load_rng and world.main and saved < world.size:
        warnings.warn(
            f"{iteration}: RNG states of {saved} ranks saved, {world.size} running; "
            f"the random streams of the other {world.size - saved} start afresh",
            stacklevel=2,
        )
    return read_json(iteration / TRAINER_STATE)
