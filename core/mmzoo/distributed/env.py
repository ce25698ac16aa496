"""The process group of a run started by ``torchrun``, and the few collectives the loop needs.

One process (no ``WORLD_SIZE`` above 1 in the environment) gets a :class:`World` of size 1
whose collectives are no-ops, so the single-process run does exactly what it did before.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from mmzoo.errors import USER_ERRORS, MmzooError

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


class RankError(MmzooError):
    """One rank's failure as every rank reports it: ``rank R: message``."""


def describe(error: BaseException) -> str:
    """``error`` in one line: a user error's message; any other error with its type, which says what broke."""
    return str(error) if isinstance(error, USER_ERRORS) else f"{type(error).__name__}: {error}"


def agree(world: World, error: BaseException | None) -> None:
    """Raise on every rank if any rank failed, with the first failing rank's message.

    Called by every rank at the same point; ``error`` is this rank's failure, or ``None``. Every
    rank raises a :class:`RankError`, except that the failing rank re-raises a bug (not a user
    error) itself, so its traceback is shown where it happened.
    """
    if not world.distributed:
        if error is not None:
            raise error
        return
    messages: list[str | None] = [None] * world.size
    dist.all_gather_object(messages, None if error is None else describe(error))
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if not failed:
        return
    rank, message = failed[0]
    if error is not None and rank == world.rank and not isinstance(error, USER_ERRORS):
        raise error
    raise RankError(f"rank {rank}: {message}") from error


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


class StopRequests:
    """Ctrl-C (SIGINT) or SIGTERM on any rank stops every rank at the same step boundary.

    On many ranks a signal only notes the request once :meth:`listen` was called (when the
    process group is up; before, a signal ends the process at once, so that torchrun's SIGTERM
    ends the ranks waiting to join a rank that failed); :meth:`check`, called by every rank
    between steps, asks all ranks (one all-reduce) and raises ``KeyboardInterrupt`` on all of
    them at once, so they save together. One process keeps Python's own Ctrl-C.
    """

    def __init__(self, world: World) -> None:
        self.world = world
        self.seen = False
        self._previous: dict[int, Any] = {}

    def listen(self) -> None:
        """Note SIGINT and SIGTERM from now on (many ranks only)."""
        if self.world.distributed and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self.seen = True

    def check(self) -> None:
        if self.world.distributed and any_rank(self.world, self.seen):
            raise KeyboardInterrupt

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


FAILURE_KEY = "mmzoo/failure"


def first_failure(world: World, error: BaseException) -> BaseException:
    """The error a failing rank should report: the first failure any rank published (a
    :class:`RankError`), else its own, which it publishes for the others.

    A rank that fails makes the others fail in their next collective; they report its message,
    not their own lost connection. The first failing rank reports a user error as ``rank R:
    message`` too, and a bug as itself (its traceback). A :class:`RankError` is already what
    every rank reports (:func:`agree`) and is returned as it is.
    """
    if not (world.distributed and dist.is_initialized()) or isinstance(error, RankError):
        return error
    mine = f"rank {world.rank}: {describe(error)}"
    try:
        store = dist.distributed_c10d._get_default_store()
        first = store.compare_set(FAILURE_KEY, "", mine).decode()
    except Exception:  # the store went with rank 0 (a run not started by torchrun): report our own
        first = mine
    if first != mine:
        return RankError(first)
    return RankError(mine) if isinstance(error, USER_ERRORS) else error
