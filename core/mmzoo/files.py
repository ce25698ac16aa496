"""Safetensors files in and out.

Writing: safetensors' ``save_file`` and ``tempfile.mkdtemp`` create owner-only files and
directories; outputs on a shared cluster must be readable like any file the user writes.
Reading: a truncated or corrupt file is an :class:`~mmzoo.errors.MmzooError` naming it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mmzoo.errors import MmzooError

T = TypeVar("T")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """``save_file`` (with ``format: pt`` metadata), then the mode a plain file write would get."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())


def share_dir(path: str | Path) -> None:
    """Give a ``mkdtemp`` directory the mode ``mkdir`` would."""
    os.chmod(path, 0o777 & ~_umask())


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s data to disk (a rename or an index naming it is only as durable as the data)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (new names, renames) to disk; a no-op where it cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _named(path: Path) -> Iterator[None]:
    """Turn safetensors' and the OS's read errors into one-line MmzooErrors naming ``path``."""
    try:
        yield
    except SafetensorError as exc:
        raise MmzooError(
            f"{path}: not a readable safetensors file ({exc}); it is truncated or corrupt, "
            "copy or download it again"
        ) from exc
    except OSError as exc:
        raise MmzooError(f"{path}: cannot read it ({exc.strerror or exc})") from exc


class SafetensorsFile:
    """``safe_open(path, framework="pt")`` whose read errors are MmzooErrors naming the file.

    safetensors checks the header against the file size when it opens a file, so a truncated
    file fails here; a tensor read that fails later (a file cut short while open) is caught too.

    Args:
        path: the ``.safetensors`` file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with _named(self.path):
            self._file = safe_open(str(self.path), framework="pt")

    def _read(self, fn: Callable[..., T], *args: Any) -> T:
        with _named(self.path):
            return fn(*args)

    def keys(self) -> list[str]:
        """Tensor names, from the header."""
        return self._read(self._file.keys)

    def get_tensor(self, name: str) -> torch.Tensor:
        """One tensor, read from the file."""
        return self._read(self._file.get_tensor, name)

    def get_slice(self, name: str) -> Any:
        """safetensors' lazy slice of one tensor (``get_dtype()``, ``get_shape()`` from the header)."""
        return self._read(self._file.get_slice, name)

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.__exit__(*exc)
