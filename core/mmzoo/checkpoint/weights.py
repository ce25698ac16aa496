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
    """

    spec: Any
    config: Any
    where: Path
    dtype: torch.dtype
    items: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    hint: str = ""
    read: Callable[[str], torch.Tensor] | None = None

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
def fill_parameters(model: torch.nn.Module, weights: Weights, *, part: bool = False) -> None:
    """Copy every tensor of ``weights`` into the parameter or persistent buffer of the same name,
    one at a time.

    A parameter sharded by FSDP or tensor parallel (a ``DTensor``) takes only its own shard of the
    tensor (rows reordered first where the model holds them so, see :mod:`mmzoo.nn.tp_layout`). Names
    the weights lack or the model lacks, and shapes that differ, are MmzooErrors. With ``part``
    the model is a part of the whole (a pipeline stage's): only its own names are read.
    """
    params = {**dict(model.named_parameters()), **persistent_buffers(model)}
    orders = held_row_orders(model)  # tensor parallel: rows held in per-rank blocks
    loaded: set[str] = set()
    for name, tensor in weights.subset(set(params)) if part else weights.items():
        param = params.get(name)
        if param is None:
            raise MmzooError(
                f"{weights.where}: '{name}' is not a parameter or persistent buffer of the "
                f"{weights.spec.name} model"
            )
        if param.shape != tensor.shape:
            raise MmzooError(
                f"{weights.where}: shape mismatch for {name}: checkpoint gives {tuple(tensor.shape)}, "
                f"the model expects {tuple(param.shape)}; {weights.hint}"
            )
        if name in orders:
            tensor = tensor.index_select(0, orders[name])
        if _is_dtensor(param):
            from torch.distributed.tensor import distribute_tensor

            # Each rank cuts its own shard from the full tensor: no communication, no full copy kept.
            sharded: Any = param
            shard = distribute_tensor(tensor, sharded.device_mesh, sharded.placements, src_data_rank=None)
            sharded.to_local().copy_(shard.to_local())
        else:
            param.copy_(tensor)
        loaded.add(name)
    not_loaded = sorted(set(params) - loaded)
    if not_loaded:
        raise MmzooError(f"{weights.where}: no weights for {', '.join(not_loaded[:8])} in the checkpoint")


def load_weights(weights: Weights, device: str | torch.device = "cpu") -> VLModel:
    """The model ``weights`` describe, built once on ``device`` and filled one tensor at a time."""
    model = weights.empty_model()
    materialize(model, device)
    fill_parameters(model, weights)
    return model
