"""DCP entries in the checkpoints' row order for tensors a tensor-parallel model holds reordered.

A model under tensor parallel holds a gated ``linear_fc1`` as ``[gate_0; up_0; gate_1; up_1; ...]``
(:mod:`mmzoo.nn.tp_layout`); DCP checkpoints keep ``[gate; up]`` whatever the mesh, so that they
resume on any number of tensor-parallel ranks and read as any other. Each rank's rows (a
contiguous block in the held order) are a few runs of rows in the canonical order: they are
written and read as the chunks of a ``ShardedTensor`` that views the rank's own data, so nothing
is copied or communicated.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def canonical_view(tensor: DTensor, order: torch.Tensor) -> ShardedTensor | None:
    """``tensor`` (held rows ``canonical[order]``) as chunks of the canonical tensor viewing this
    rank's data; ``None`` when this rank holds no rows."""
    sizes, offsets = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, tensor.placements
    )
    local = tensor.to_local()
    rows = order[offsets[0] : offsets[0] + sizes[0]]
    if not len(rows):
        return None
    cuts = ((rows.diff() != 1).nonzero().squeeze(1) + 1).tolist()
    shards = []
    for start, end in zip([0, *cuts], [*cuts, len(rows)], strict=True):
        metadata = ShardMetadata(
            shard_offsets=[int(rows[start]), *offsets[1:]],
            shard_sizes=[end - start, *sizes[1:]],
            placement=f"rank:{dist.get_rank()}/{local.device}",
        )
        shards.append(Shard(local[start:end], metadata))
    # Only this rank's chunks: DCP plans each rank's own and never checks the others.
    global_metadata = ShardedTensorMetadata(
        [shard.metadata for shard in shards], tensor.shape, TensorProperties.create_from_tensor(local)
    )
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, global_metadata)


def in_canonical_order(state: dict[str, Any], orders: dict[str, torch.Tensor]) -> Callable[[], None]:
    """Swap, in place, every entry of a DCP state dict (``get_state_dict``'s ``model`` and ``optim``
    parts) whose parameter is held reordered for its :func:`canonical_view`; returns a function
    that puts the original entries back (after ``dcp.load`` filled them through the views)."""
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
