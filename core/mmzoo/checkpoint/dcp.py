"""Training checkpoints of runs on many ranks: ``torch.distributed.checkpoint`` (DCP) directories
under the mm tracker rule, readable on any number of ranks, or by one process one tensor at a time.

Layout::

    OUTPUT/latest_checkpointed_iteration.txt
    OUTPUT/iter_0000010/.metadata, __R_0.distcp   DCP: "model.<mm name>" and "optim.<...>" entries
    OUTPUT/iter_0000010/dcp_meta.json             model, variant, config, world_size, format_version
    OUTPUT/iter_0000010/rng/rank_RRRRR/rng.*      each rank's RNG states
    OUTPUT/iter_0000010/scheduler.json, trainer_state.json, media.json   as single-process checkpoints
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mmzoo.checkpoint.mm import read_json, read_tracker, spec_and_config
from mmzoo.checkpoint.sources import TensorSpec
from mmzoo.checkpoint.weights import Weights
from mmzoo.errors import MmzooError

DCP_META = "dcp_meta.json"
DCP_FORMAT_VERSION = 1
MODEL = "model"  # the state dict's top-level keys: DCP names entries "model.<mm name>"
OPTIMIZER = "optim"


def dcp_meta(model: Any, *, variant: str | None, world_size: int) -> dict[str, Any]:
    """What ``dcp_meta.json`` says about a checkpoint of ``model`` written by ``world_size`` ranks."""
    return {
        "model": model.name,
        "variant": variant,
        "config": dataclasses.asdict(model.config),
        "world_size": world_size,
        "format_version": DCP_FORMAT_VERSION,
    }


def dcp_iteration(path: str | Path) -> Path | None:
    """The DCP iteration directory ``path`` is or whose tracker names it; ``None`` when not DCP."""
    path = Path(path)
    if (path / DCP_META).is_file():
        return path
    if path.is_dir():
        tracked = read_tracker(path)
        if tracked is not None and (tracked / DCP_META).is_file():
            return tracked
    return None


def read_dcp_meta(iteration: Path) -> dict[str, Any]:
    meta = read_json(iteration / DCP_META)
    missing = [k for k in ("model", "variant", "config", "world_size") if k not in meta]
    if missing:
        raise MmzooError(f"{iteration / DCP_META}: missing {', '.join(missing)}; the checkpoint is damaged")
    return meta


class DCPSource:
    """The full model tensors of a DCP training checkpoint, each read alone by this process.

    Args:
        iteration: the ``iter_*`` directory (see :func:`dcp_iteration`).
    """

    def __init__(self, iteration: Path) -> None:
        # Imported here: torch.distributed.checkpoint takes most of a second to import.
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.iteration = iteration
        try:
            metadata = FileSystemReader(str(iteration)).read_metadata()
        except (OSError, ValueError, RuntimeError) as exc:
            raise MmzooError(
                f"{iteration}: cannot read its DCP metadata ({exc}); the checkpoint is damaged"
            ) from exc
        prefix = MODEL + "."
        self._specs: dict[str, TensorSpec] = {
            key[len(prefix) :]: (entry.properties.dtype, tuple(entry.size))
            for key, entry in metadata.state_dict_metadata.items()
            if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
        }
        self.names = list(self._specs)

    def spec(self, name: str) -> TensorSpec:
        return self._specs[name]

    def get(self, name: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader

        dtype, shape = self._specs[name]
        tensor = torch.empty(shape, dtype=dtype)
        # no_dist: this process reads alone, even inside a run's process group.
        dcp.load({MODEL: {name: tensor}}, storage_reader=FileSystemReader(str(self.iteration)), no_dist=True)
        return tensor


def open_dcp_weights(path: str | Path, dtype: torch.dtype | str | None = None) -> Weights:
    """The weights of a DCP training checkpoint (its run directory or an ``iter_*`` directory).

    Args:
        path: the checkpoint.
        dtype: parameter dtype; ``None`` means float32, ``"auto"`` the dtype training kept.
    """
    iteration = dcp_iteration(path)
    if iteration is None:
        raise MmzooError(f"{path}: not a DCP training checkpoint (no {DCP_META})")
    meta = read_dcp_meta(iteration)
    spec, config = spec_and_config(meta, iteration)
    source = DCPSource(iteration)

    def items() -> Iterator[tuple[str, torch.Tensor]]:
        for name in source.names:
            yield name, source.get(name)

    return Weights(spec, config, iteration, _dtype(dtype, source), items, "is the checkpoint complete?")


def _dtype(dtype: torch.dtype | str | None, source: DCPSource) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return source.spec(source.names[0])[0] if source.names else torch.float32
    resolved = getattr(torch, dtype or "float32", None)
    if not isinstance(resolved, torch.dtype):
        raise MmzooError(f"unknown dtype '{dtype}'; use e.g. float32, bfloat16, float16 or 'auto'")
    return resolved
