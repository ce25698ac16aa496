"""Files on disk: the one atomic directory writer, and safetensors files in and out.

Atomic writes: a directory is staged in a hidden sibling that names its writer
(``.NAME.tmp[-KIND]-PID-RANDOM@HOST``), fsynced whole and renamed into place
(:func:`atomic_directory`); a single file is replaced the same way (:func:`atomic_file`). The
temporaries of writers that are gone are removed by the next write of the same name
(:func:`clean_stale_temporaries`), never a live writer's.

Modes: safetensors' ``save_file`` and ``tempfile.mkdtemp`` create owner-only files and
directories; outputs on a shared cluster must be readable like any file the user writes.
Reading: a truncated or corrupt file is an :class:`~mmzoo.errors.MmzooError` naming it.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mmzoo.errors import MmzooError

T = TypeVar("T")

_HOST = socket.gethostname()
_TEMPORARY = re.compile(r"\.(?P<name>.+?)\.tmp(?:-(?P<kind>[a-z]+))?-(?P<pid>\d+)-[0-9a-f]{8}@(?P<host>.+)")
# A temporary whose writer cannot be asked (another host, or a name without one) is stale after this.
STALE_AFTER_S = 24 * 3600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """``save_file`` (with ``format: pt`` metadata), then the mode a plain file write would get."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())


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


# --- atomic writes ------------------------------------------------------------------------------


def temporary_path(parent: Path, name: str, kind: str = "") -> Path:
    """A hidden sibling for ``parent / name`` that names this process as its writer.

    Args:
        parent: the directory it goes in.
        name: what it becomes (or was: ``kind="old"`` for a copy moved aside).
        kind: an optional lower-case tag, e.g. ``"old"`` or ``"del"``.
    """
    tag = f"-{kind}" if kind else ""
    return parent / f".{name}.tmp{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}@{_HOST}"


def _writer_gone(path: Path) -> bool:
    """Whether the process that made temporary ``path`` has ended.

    Only a process on this host can be asked; otherwise the temporary counts as abandoned once
    it is untouched for :data:`STALE_AFTER_S`.
    """
    m = _TEMPORARY.fullmatch(path.name)
    if m and m["host"] == _HOST and os.name == "posix":
        try:
            os.kill(int(m["pid"]), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return True
        except PermissionError:  # it exists, under another user
            return False
        return False
    return time.time() - path.lstat().st_mtime > STALE_AFTER_S


def _remove(path: Path) -> None:
    """Delete ``path``, a directory tree or a file."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale_temporaries(parent: Path, name: str | None = None) -> None:
    """Remove the temporaries in ``parent`` (of ``parent / name`` only, when given) whose writers
    are gone, e.g. a killed save's.

    A copy a killed writer had moved aside (``kind="old"``) while its replacement was not yet in
    place is renamed back instead, so the directory is there again, whole.
    """
    for stale in parent.glob(f".{'*' if name is None else glob.escape(name)}.tmp-*"):
        if not _writer_gone(stale):
            continue
        m = _TEMPORARY.fullmatch(stale.name)
        if m and m["kind"] == "old" and not (parent / m["name"]).exists():
            os.rename(stale, parent / m["name"])
        else:
            _remove(stale)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` (``root`` last) to disk."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(Path(folder, name))
        fsync_dir(folder)


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and dropped after.

    If the second rename fails, the old copy is put back; if the process dies between the two,
    :func:`clean_stale_temporaries` puts it back when it next runs for ``final``.
    """
    if not final.exists():
        os.rename(tmp, final)
        return
    old = temporary_path(final.parent, final.name, "old")
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    _remove(old)


def _publish(tmp: Path, final: Path, replace: bool | Literal["first-wins"]) -> None:
    """Rename the staged ``tmp`` to ``final`` as ``replace`` says (see :func:`atomic_directory`)."""
    if replace == "first-wins":
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            _remove(tmp)  # a concurrent writer's copy got there first: keep it
    elif replace:
        _swap_in(tmp, final)
    elif final.exists():
        raise MmzooError(f"{final}: already exists; choose a new directory or replace it explicitly")
    else:
        os.rename(tmp, final)


@contextmanager
def atomic_directory(final: str | Path, *, replace: bool | Literal["first-wins"] = False) -> Iterator[Path]:
    """Stage a directory in a hidden sibling of ``final``; on success it becomes ``final``.

    When the block ends normally, every file and directory staged is fsynced, the staging
    directory is renamed to ``final`` and the parent directory is fsynced. When the block raises
    (Ctrl-C included), the staging directory is removed and ``final`` is untouched. A process
    killed at any point leaves the old ``final`` or the new one (a copy moved aside is renamed
    back by the next clean-up), plus temporaries that the next write of ``final`` removes.

    Args:
        final: the directory to write; its parent is created when missing.
        replace: when ``final`` exists at the rename: ``False`` raises an MmzooError; ``True``
            replaces it (the old copy is moved aside, put back on failure, deleted on success);
            ``"first-wins"`` keeps it and discards the staged copy (concurrent builders of the
            same content).

    Yields:
        The empty staging directory, with the mode ``mkdir`` gives.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(final.parent, final.name)
    tmp = temporary_path(final.parent, final.name)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        _publish(tmp, final, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)


@contextmanager
def atomic_file(path: Path, binary: bool = False) -> Iterator[Any]:
    """Write a file atomically: yields a temporary sibling of ``path`` opened for writing (UTF-8
    text, or bytes with ``binary``); when the block ends it is fsynced and replaces ``path``, when
    it raises it is removed.
    """
    tmp = temporary_path(path.parent, path.name)
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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
