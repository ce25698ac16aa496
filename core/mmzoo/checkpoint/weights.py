"""A checkpoint's weights as a stream of full mm tensors, and the model they fill.

Readers of every format (HF directories, mm shards of any split) give :class:`Weights`; a model
built on the meta device is filled from it one tensor at a time, whether its parameters are
plain tensors or FSDP shards (``DTensor``): each process then holds its parameters plus one
tensor, never a second copy of the model. The checkpoint fills parameters and persistent buffers;
:func:`mmzoo.nn.init.materialize` recomputes the non-persistent buffers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmzoo.build import compose
from mmzoo.errors import MmzooError
from mmzoo.model import VLModel
from mmzoo.nn.init import materialize, persistent_buffers
from mmzoo.nn.tp_layout import held_row_orders


@dataclass
class Weights:
    """The weights of one checkpoint.

    Attributes:
        spec: the family's registry entry.
        config: the family config the checkpoint describes.
        where: the checkpoint, for error messages.
        dtype: the parameter dtype to build the model in.
        items: a function giving ``(mm name, full tensor)`` pairs, one tensor read at a time.
        hint: what to check when a shape does not match.
        read: the full tensor of one mm name, for readers that merge tensors on demand (mm
            shards, DCP): a pipeline stage then reads only its own tensors.
        tp_slice: ``(name, tp) -> TpSlice | None`` for checkpoints stored per tensor-parallel rank
            (mm shards): a rank of a mesh with the same ``tp`` reads its own shard only.
    """

    spec: Any
    config: Any
    where: Path
    dtype: torch.dtype
    items: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    hint: str = ""
    read: Callable[[str], torch.Tensor] | None = None
    tp_slice: Callable[[str, int], Any] | None = None

    def subset(self, names: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` of ``names`` only: read one by one where the reader can, else
        filtered from the whole stream (read and dropped one tensor at a time)."""
        if self.read is not None:
            for name in sorted(names):
                try:
                    tensor = self.read(name)
                except KeyError:  # not in the checkpoint: the caller reports what stayed unfilled
                    continue
                yield name, tensor
        else:
            yield from ((name, tensor) for name, tensor in self.items() if name in names)

    def empty_model(self) -> VLModel:
        """The model the weights describe, built on the meta device (no memory yet; see
        :func:`mmzoo.nn.init.materialize`)."""
        with torch.device("meta"):
            return compose(self.spec, self.config).to(self.dtype)


def resolve_dtype(dtype: torch.dtype | str | None, auto: Callable[[], torch.dtype | str]) -> torch.dtype:
    """``dtype`` as a torch dtype: ``None`` is float32, ``"auto"`` what ``auto()`` gives (the
    checkpoint's own dtype), a name like ``"bfloat16"`` that dtype; an unknown name is an MmzooError."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = auto() if dtype == "auto" else dtype or "float32"
    resolved = name if isinstance(name, torch.dtype) else getattr(torch, str(name), None)
    if not isinstance(resolved, torch.dtype):
        raise MmzooError(f"unknown dtype '{name}'; use e.g. float32, bfloat16, float16 or 'auto'")
    return resolved


def _is_dtensor(tensor: torch.Tensor) -> bool:
    # A DTensor exists only once torch.distributed.tensor is imported (which takes most of a second).
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


@torch.no_grad()
def fill_parameters(
    model: torch.nn.Module,
    weights: Weights,
    *,
    part: bool = False,
    params: dict[str, torch.Tensor] | None = None,
) -> None:
    """Copy every tensor of ``weights`` into the parameter or persistent buffer of the same name,
    one at a time.

    A parameter sharded by FSDP or tensor parallel (a ``DTensor``) takes only its own shard of the
    tensor (rows reordered first where the model holds them so, see :mod:`mmzoo.nn.tp_layout`). Names
    the weights lack or the model lacks, and shapes that differ, are MmzooErrors. With ``part``
    the model is a part of the whole (a pipeline stage's): only its own names are read. ``params``
    gives the tensors to fill by checkpoint name (default: the model's parameters and persistent
    buffers by their own names).
    """
    if params is None:
        params = {**dict(model.named_parameters()), **persistent_buffers(model)}
    orders = held_row_orders(model)  # tensor parallel: rows held in per-rank blocks
    loaded = _fill_from_own_shard(params, weights, orders)
    rest = set(params) - loaded
    for name, tensor in weights.subset(rest) if part or loaded else weights.items():
        param = params.get(name)
        if param is None:
            raise MmzooError(
                f"{weights.where}: '{name}' is not a parameter or persistent buffer of the "
                f"{weights.spec.name} model"
            )
        _check_shape(name, param, tensor, weights)
        copy_into(param, tensor.index_select(0, orders[name]) if name in orders else tensor)
        loaded.add(name)
    not_loaded = sorted(set(params) - loaded)
    if not_loaded:
        raise MmzooError(f"{weights.where}: no weights for {', '.join(not_loaded[:8])} in the checkpoint")


def _check_shape(name: str, param: torch.Tensor, tensor: torch.Tensor, weights: Weights) -> None:
    if param.shape != tensor.shape:
        raise MmzooError(
            f"{weights.where}: shape mismatch for {name}: checkpoint gives {tuple(tensor.shape)}, "
            f"the model expects {tuple(param.shape)}; {weights.hint}"
        )


def copy_into(param: torch.Tensor, tensor: torch.Tensor) -> None:
    """``tensor`` (whole) into ``param``; a ``DTensor`` takes only its own shard of it."""
    if _is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        # Each rank cuts its own shard from the full tensor: no communication, no full copy kept.
        sharded: Any = param
        shard = distribute_tensor(tensor, sharded.device_mesh, sharded.placements, src_data_rank=None)
        sharded.to_local().copy_(shard.to_local())
    else:
        param.copy_(tensor)


def _fill_from_own_shard(params: dict[str, Any], weights: Weights, orders: dict[str, Any]) -> set[str]:
    """On a mesh with tensor-parallel ranks, fill what ``weights`` stores per tensor-parallel rank
    with the same ``tp`` from the shards that hold this rank's part: its own shard for tensors
    every rank stores whole and for the model's tensor-parallel slices, and for a tensor the model
    only shards with FSDP, the shards its FSDP rows lie in. Returns the names filled; the rest
    (another ``tp``, a ``[gate; up]`` the model holds whole) is left to the full-tensor path."""
    place = _tp_place(params) if weights.tp_slice is not None else None
    if place is None:
        return set()
    tp, rank = place
    filled = set()
    for name, param in params.items():
        plan = weights.tp_slice(name, tp)  # type: ignore[misc]
        if plan is None:
            continue
        if plan.dim is None:
            tensor = plan.read(rank)
            _check_shape(name, param, tensor, weights)
            copy_into(param, tensor)
        elif (plan.glu and name not in orders) or not _copy_blocks(name, param, plan, tp, weights):
            continue
        filled.add(name)
    return filled


def _tp_place(params: dict[str, Any]) -> tuple[int, int] | None:
    """``(tp, this rank's tp coordinate)`` of the first parameter on a mesh with a ``tp`` dimension."""
    for param in params.values():
        names = param.device_mesh.mesh_dim_names or () if _is_dtensor(param) else ()
        if "tp" in names:
            axis = names.index("tp")
            return param.device_mesh.size(axis), param.device_mesh.get_local_rank(axis)
    return None


def _copy_blocks(name: str, param: Any, plan: Any, tp: int, weights: Weights) -> bool:
    """Copy ``param``'s own part (its FSDP / tensor-parallel shard, or all of it) from the
    tensor-parallel blocks it lies in, each read from its shard; ``False`` when the blocks are not
    even."""
    dim = plan.dim
    if param.shape[dim] % tp:
        return False
    rows = param.shape[dim] // tp
    if _is_dtensor(param):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        sizes, offsets = compute_local_shape_and_global_offset(
            param.shape, param.device_mesh, param.placements
        )
    else:
        sizes, offsets = param.shape, (0,) * param.ndim
    if not sizes[dim]:
        return True  # an empty shard: nothing to read
    first, last = offsets[dim] // rows, (offsets[dim] + sizes[dim] - 1) // rows
    blocks = [plan.read(block) for block in range(first, last + 1)]
    expected = [rows if d == dim else size for d, size in enumerate(param.shape)]
    wrong = next((b for b in blocks if list(b.shape) != expected), None)
    if wrong is not None:
        raise MmzooError(
            f"{weights.where}: a tensor-parallel slice of {name} is {tuple(wrong.shape)}, the model's "
            f"blocks are {tuple(expected)}; {weights.hint}"
        )
    piece = torch.cat(blocks, dim) if len(blocks) > 1 else blocks[0]
    for d, (offset, size) in enumerate(zip(offsets, sizes, strict=True)):
        piece = piece.narrow(d, offset - (first * rows if d == dim else 0), size)
    (param.to_local() if _is_dtensor(param) else param).copy_(piece)
    return True


def load_weights(weights: Weights, device: str | torch.device = "cpu") -> VLModel:
    """The model ``weights`` describe, built once on ``device`` and filled one tensor at a time."""
    model = weights.empty_model()
    materialize(model, device)
    fill_parameters(model, weights)
    return model
