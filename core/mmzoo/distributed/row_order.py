"""DCP entries in the checkpoints' row order for tensors a tensor-parallel model holds reordered.

A model under tensor parallel holds a gated ``linear_fc1`` as ``[gate_0; up_0; gate_1; up_1; ...]``
(:mod:`mmzoo.nn.tp_layout`); DCP checkpoints keep ``[gate; up]`` whatever the mesh, so that they
resume on any number of tensor-parallel ranks and read as any other. Each rank's rows (a
contiguous block in the held order) are a few runs of rows in the canonical order: they are
written and read as the chunks of a ``ShardedTensor`` that views the rank's own data, so nothing
is copied or communicated.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, MutableMapping
from typing import Any

import torch
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset


def _runs(
    tensor: DTensor, order: torch.Tensor, coordinate: list[int]
) -> list[tuple[int, list[int], list[int]]]:
    """The rows the rank at ``coordinate`` of the tensor's mesh holds, as runs of consecutive
    canonical rows: ``(first local row, canonical offsets, sizes)`` of each run."""
    mesh = tensor.device_mesh
    sizes, offsets = _compute_local_shape_and_global_offset(
        tensor.shape, mesh.shape, coordinate, tensor.placements
    )
    rows = order[offsets[0] : offsets[0] + sizes[0]]
    if not len(rows):
        return []
    cuts = ((rows.diff() != 1).nonzero().squeeze(1) + 1).tolist()
    return [
        (start, [int(rows[start]), *offsets[1:]], [end - start, *sizes[1:]])
        for start, end in zip([0, *cuts], [*cuts, len(rows)], strict=True)
    ]


def canonical_view(tensor: DTensor, order: torch.Tensor) -> ShardedTensor | None:
    """``tensor`` (held rows ``canonical[order]``) as chunks of the canonical tensor, this rank's
    viewing its data; ``None`` when this rank holds no rows."""
    mesh, local = tensor.device_mesh, tensor.to_local()
    mine = list(mesh.get_coordinate() or [])
    shards, everyone = [], []
    for coordinate in itertools.product(*(range(n) for n in mesh.shape)):
        rank = int(mesh.mesh[coordinate])
        device = local.device if list(coordinate) == mine else local.device.type
        for start, offsets, sizes in _runs(tensor, order, list(coordinate)):
            metadata = ShardMetadata(offsets, sizes, placement=f"rank:{rank}/{device}")
            everyone.append(metadata)
            if list(coordinate) == mine:
                shards.append(Shard(local[start : start + sizes[0]], metadata))
    if not shards:
        return None
    properties = TensorProperties.create_from_tensor(local)
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        shards, ShardedTensorMetadata(everyone, tensor.shape, properties)
    )


def in_canonical_order(state: dict[str, Any], orders: dict[str, torch.Tensor]) -> Callable[[], None]:
    """Swap, in place, every entry of a DCP state dict (``get_state_dict``'s ``model`` and ``optim``
    parts) whose parameter is held reordered for its :func:`canonical_view`; returns a function
    that puts the original entries back: after ``dcp.load`` filled them through the views, and
    after ``dcp.save`` (the optimizer part shares the optimizer's own per-parameter dicts)."""
    swapped: list[tuple[MutableMapping[str, Any], str, Any]] = []

    def swap(entries: MutableMapping[str, Any], key: str, order: torch.Tensor) -> None:
        value = entries[key]
        if isinstance(value, DTensor) and value.shape[:1] == order.shape:
            view = canonical_view(value, order)
            if view is not None:
                swapped.append((entries, key, value))
                entries[key] = view

    for name, order in orders.items():
        for part in state.values():
            if name in part:
                swap(part, name, order)
            per_param = part.get("state", {}).get(name, {})
            for key in list(per_param):
                swap(per_param, key, order)

    def restore() -> None:
        for entries, key, value in swapped:
            entries[key] = value

    return restore
