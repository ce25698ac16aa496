"""Training checkpoints of runs on many ranks: ``torch.distributed.checkpoint`` (DCP) directories
under the mm tracker rule, readable on any number of ranks, or by one process one tensor at a time
(``mmzoo.load_model``, and ``mmzoo convert``'s mm-to-hf and resplit).

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
from typing import TYPE_CHECKING, Any

import torch

from mmzoo.checkpoint.mm import read_json, read_tracker, spec_and_config
from mmzoo.checkpoint.mm_meta import meta_state
from mmzoo.checkpoint.sources import TensorSpec, first_dtype, listing
from mmzoo.checkpoint.weights import Weights, resolve_dtype
from mmzoo.convert.parallel import FUSED
from mmzoo.errors import MmzooError

if TYPE_CHECKING:
    from mmzoo.checkpoint.dcp_reader import Reader

DCP_META = "dcp_meta.json"
DCP_FORMAT_VERSION = 1
METADATA = ".metadata"  # DCP's own index of every entry and where its bytes are
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


def _is_dcp(directory: Path) -> bool:
    return (directory / DCP_META).is_file() or (directory / METADATA).is_file()


def dcp_iteration(path: str | Path) -> Path | None:
    """The DCP iteration directory ``path`` is or whose tracker names it; ``None`` when not DCP."""
    path = Path(path)
    if _is_dcp(path):
        return path
    if path.is_dir():
        tracked = read_tracker(path)
        if tracked is not None and _is_dcp(tracked):
            return tracked
    return None


def read_dcp_meta(iteration: Path) -> dict[str, Any]:
    file = iteration / DCP_META
    if not file.is_file():
        raise MmzooError(f"{file}: missing; every save writes it, so the checkpoint is incomplete")
    meta = read_json(file)
    missing = [k for k in ("model", "variant", "config", "world_size") if k not in meta]
    if missing:
        raise MmzooError(f"{file}: missing {', '.join(missing)}; the checkpoint is damaged")
    return meta


def _open_reader(iteration: Path) -> Reader:
    """The checkpoint's :class:`~mmzoo.checkpoint.dcp_reader.Reader`; a missing or unreadable
    ``.metadata`` is an MmzooError."""
    from mmzoo.checkpoint.dcp_reader import Reader  # imports torch.distributed.checkpoint

    file = iteration / METADATA
    if not file.is_file():
        raise MmzooError(f"{file}: missing; the checkpoint is incomplete (a partial copy?)")
    try:
        return Reader(iteration)
    except Exception as exc:  # unpickling damaged bytes can raise almost any exception type
        raise MmzooError(
            f"{file}: cannot read it ({type(exc).__name__}: {exc}); the checkpoint is damaged"
        ) from exc


class DCPSource:
    """The full model tensors of a DCP training checkpoint, each read alone by this process, from
    however many ranks' chunks it was saved in.

    Args:
        iteration: the ``iter_*`` directory (see :func:`dcp_iteration`).
    """

    def __init__(self, iteration: Path) -> None:
        # Imported here: torch.distributed.checkpoint takes most of a second to import.
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.iteration = iteration
        self._reader = _open_reader(iteration)
        prefix = MODEL + "."
        self._specs: dict[str, TensorSpec] = {
            key[len(prefix) :]: (entry.properties.dtype, tuple(entry.size))
            for key, entry in self._reader.metadata.state_dict_metadata.items()
            if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
        }
        self.names = list(self._specs)

    def check(self, expected: dict[str, torch.Tensor]) -> None:
        """Names and shapes against the model's (``expected``: its state dict on the meta device),
        and every data file that holds them present and whole."""
        missing = sorted(set(expected) - set(self._specs))
        unexpected = sorted(set(self._specs) - set(expected))
        hint = f"does {DCP_META}'s config describe the model saved?"
        if missing:
            raise MmzooError(f"{self.iteration}: {len(missing)} weights missing: {listing(missing)}; {hint}")
        if unexpected:
            raise MmzooError(
                f"{self.iteration}: {len(unexpected)} unexpected weights: {listing(unexpected)}; {hint}"
            )
        for name, (_, shape) in self._specs.items():
            if shape != tuple(expected[name].shape):
                raise MmzooError(
                    f"{self.iteration}: shape mismatch for {name}: checkpoint gives {shape}, the "
                    f"model expects {tuple(expected[name].shape)}; {hint}"
                )
        self.check_files()

    def check_files(self) -> None:
        """Every data file holding model entries is there and as long as ``.metadata`` says (a
        rank's file lost or cut short is an MmzooError)."""
        ends: dict[str, int] = {}
        for index, info in self._reader.metadata.storage_data.items():
            if index.fqn.startswith(MODEL + "."):
                ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
        for relative, end in sorted(ends.items()):
            file = self.iteration / relative
            if not file.is_file():
                raise MmzooError(f"{file}: missing; {METADATA} lists weights in it (incomplete checkpoint)")
            size = file.stat().st_size
            if size < end:
                raise MmzooError(f"{file}: {size} bytes, but {METADATA} needs {end}; the file is truncated")

    def spec(self, name: str) -> TensorSpec:
        return self._specs[name]

    def get(self, name: str) -> torch.Tensor:
        dtype, shape = self._specs[name]
        tensor = torch.empty(shape, dtype=dtype)
        self._reader.load(MODEL, name, tensor)
        return tensor


def open_dcp(path: str | Path) -> tuple[dict[str, Any], Any, Any, DCPSource]:
    """``(meta, spec, config, source)`` of a DCP training checkpoint, checked before any tensor is
    read: names and shapes against the config, every rank's data file present and whole.

    Args:
        path: the run directory (its tracker names the iteration) or an ``iter_*`` directory.

    Returns:
        ``meta`` is ``dcp_meta.json`` plus ``layout`` (``fused``: tensors as the model holds them).
    """
    iteration = dcp_iteration(path)
    if iteration is None:
        raise MmzooError(f"{path}: not a DCP training checkpoint (no {DCP_META})")
    meta = read_dcp_meta(iteration)
    spec, config = spec_and_config(meta, iteration / DCP_META)
    source = DCPSource(iteration)
    source.check(meta_state(spec, config))
    return {**meta, "layout": FUSED}, spec, config, source


def open_dcp_weights(path: str | Path, dtype: torch.dtype | str | None = None) -> Weights:
    """The weights of a DCP training checkpoint (its run directory or an ``iter_*`` directory).

    Args:
        path: the checkpoint.
        dtype: parameter dtype; ``None`` means float32, ``"auto"`` the dtype training kept.
    """
    _, spec, config, source = open_dcp(path)

    def items() -> Iterator[tuple[str, torch.Tensor]]:
        for name in source.names:
            yield name, source.get(name)

    resolved = resolve_dtype(dtype, lambda: first_dtype(source))
    hint = "is the checkpoint complete?"
    return Weights(spec, config, source.iteration, resolved, items, hint, read=source.get)
