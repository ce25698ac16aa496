"""The process group of a run started by ``torchrun``, and the few collectives the loop needs.

One process (no ``WORLD_SIZE`` above 1 in the environment) gets a :class:`World` of size 1
whose collectives are no-ops, so the single-process run does exactly what it did before.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from mmzoo.errors import MmzooError

T = TypeVar("T")

# The process group's backend per device type; CPU tensors (object collectives) always use gloo.
BACKENDS = {"cuda": "cuda:nccl,cpu:gloo", "npu": "npu:hccl,cpu:gloo", "cpu": "gloo"}


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of the run.

    Attributes:
        rank: global rank.
        size: number of ranks (1: not distributed).
        local_rank: rank on this node (picks the device).
        local_size: ranks on this node.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints, logs metrics and writes single files."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """``device`` narrowed to this rank's accelerator (``cuda:LOCAL_RANK``); the CPU stays the CPU."""
        if device.type == "cpu" or not self.distributed:
            return device
        return torch.device(device.type, self.local_rank)


def world_from_env() -> World:
    """The :class:`World` ``torchrun`` describes in the environment (size 1 without it)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    try:
        return World(
            rank=int(os.environ["RANK"]),
            size=size,
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            local_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(size))),
        )
    except KeyError as exc:
        raise MmzooError(
            f"WORLD_SIZE={size} but {exc.args[0]} is not set; start the run with torchrun"
        ) from exc


def init_process_group(world: World, device: torch.device, timeout_s: float) -> None:
    """Join the run's process group (once) on ``device``'s backend, collectives timing out after
    ``timeout_s`` so that a rank that died never leaves the others waiting for ever."""
    if not world.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type == "npu":
        torch.npu.set_device(device)  # type: ignore[attr-defined]
    dist.init_process_group(
        BACKENDS.get(device.type, "gloo"),
        rank=world.rank,
        world_size=world.size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type != "cpu" else None,
    )


def close_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(world: World, *values: float) -> list[float]:
    """Each value summed over the ranks (a list even for one value)."""
    if not world.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_rank(world: World, flag: bool) -> bool:
    """Whether ``flag`` is true on any rank."""
    return bool(all_sum(world, float(flag))[0]) if world.distributed else flag


def agree(world: World, error: BaseException | None) -> None:
    """Raise on every rank if any rank failed, with the first failing rank's message.

    Called by every rank at the same point; ``error`` is this rank's failure, or ``None``.
    """
    if not world.distributed:
        if error is not None:
            raise error
        return
    messages: list[str | None] = [None] * world.size
    dist.all_gather_object(messages, None if error is None else str(error))
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if not failed:
        return
    rank, message = failed[0]
    if error is not None and rank == world.rank:
        raise error
    raise MmzooError(f"rank {rank}: {message}")


@contextmanager
def checked(world: World) -> Iterator[None]:
    """Run a block on every rank; a failure on any rank is raised on all of them (:func:`agree`).

    For work between collectives (set-up, loading, preprocessing): a rank that fails there
    would otherwise leave the others waiting in their next collective.
    """
    try:
        yield
    except Exception as exc:
        agree(world, exc)
        raise
    agree(world, None)


def node_first(world: World, work: Callable[[], T]) -> T:
    """``work()`` on local rank 0 first, then on the other ranks of its node, which then find a
    shared cache built (once per node). A failure on any rank is raised on every rank."""
    first = world.local_rank == 0
    result, error = _attempt(work) if first else (None, None)
    barrier(world)
    agree(world, error)  # a failure of the first ranks stops the others before they start
    if not first:
        result, error = _attempt(work)
    agree(world, error)
    return result  # type: ignore[return-value]


def _attempt(work: Callable[[], T]) -> tuple[T | None, Exception | None]:
    try:
        return work(), None
    except Exception as exc:
        return None, exc


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
