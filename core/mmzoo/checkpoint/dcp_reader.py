"""Reading tensors of a DCP checkpoint in one process, without a process group.

Apart from :mod:`mmzoo.checkpoint.dcp` and imported on first use: ``torch.distributed.checkpoint``
takes most of a second to import.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata

from mmzoo.errors import MmzooError

# dcp.load(no_dist=True) says so on every call; reading in one process is the intent here.
SINGLE_PROCESS = re.escape("torch.distributed is disabled, unavailable or uninitialized")


def first_error(exc: BaseException) -> tuple[BaseException, str]:
    """The error behind ``exc`` (a ``CheckpointException``, DCP's BaseException wrapping each rank's
    error, gives its first rank's) and its message on one line."""
    error = next(iter(exc.failures.values()))[0] if isinstance(exc, CheckpointException) else exc
    return error, " ".join(str(error).split())


class Reader(FileSystemReader):
    """A ``FileSystemReader`` that unpickles ``.metadata`` once, here (``dcp.load`` asks for it on
    every call, and it lists every entry of the model and the optimizer).

    Args:
        iteration: the DCP directory.
    """

    def __init__(self, iteration: Path) -> None:
        super().__init__(str(iteration))
        self.iteration = iteration
        self.metadata = super().read_metadata()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self.metadata

    def load(self, group: str, name: str, tensor: torch.Tensor) -> None:
        """Fill ``tensor`` in place with the entry ``name`` of the saved state dict's ``group``
        (DCP's ``group.name``), whatever the chunks it was saved in."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=SINGLE_PROCESS, category=UserWarning)
            try:
                # no_dist: this process reads alone, even inside a run's process group.
                dcp.load({group: {name: tensor}}, storage_reader=self, no_dist=True)
            except CheckpointException as exc:  # a BaseException, not an Exception
                error, detail = first_error(exc)
                raise MmzooError(
                    f"{self.iteration}: cannot read {name} ({type(error).__name__}: {detail}); "
                    "the checkpoint is damaged"
                ) from error
