"""File modes for what mmzoo writes: checkpoints, exports and caches readable as the umask allows.

safetensors' ``save_file`` and ``tempfile.mkdtemp`` create owner-only files and directories;
outputs on a shared cluster must be readable like any file the user writes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file


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
