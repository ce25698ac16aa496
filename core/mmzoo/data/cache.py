"""On-disk cache of prepared samples: safetensors shards plus an index written last.

One cache entry per data file (or ``save_to_disk`` directory), keyed by its content (media
embedded in parquet / arrow rows included) and the preprocessing settings,
so a second run reads token ids and resized media from disk and decodes nothing. Entries are
written with :func:`mmzoo.files.atomic_directory` (built in a temporary sibling, fsynced,
renamed into place), so no run sees a half-written entry and a crash never leaves an index
naming lost data; of concurrent builders of one entry the first rename wins.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from mmzoo.data.pipeline import Prepared
from mmzoo.files import SafetensorsFile, atomic_directory, save_safetensors
from mmzoo.protocols import MediaItem

INDEX = "index.json"
SHARD_BYTES = 256 << 20


def file_digest(path: str | Path) -> str:
    """sha256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_digest(path: str | Path) -> str:
    """sha256 of a data file's content, or of a directory's (each file's name and content, in
    name order): media embedded in parquet or arrow data are keyed by their bytes."""
    path = Path(path)
    if not path.is_dir():
        return file_digest(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_digest(file)}\0".encode())
    return digest.hexdigest()


def cache_key(data_file: str | Path, settings: dict[str, Any]) -> str:
    """Key of one data file's entry: its content plus everything that changes preprocessing."""
    blob = json.dumps({"file": source_digest(data_file), "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _tensors(i: int, sample: Prepared) -> dict[str, torch.Tensor]:
    out = {
        f"{i}.input_ids": sample.input_ids,
        f"{i}.labels": sample.labels,
        f"{i}.position_ids": sample.position_ids,
    }
    for j, item in enumerate(sample.media):
        out[f"{i}.media.{j}"] = torch.tensor(item.frames)
    return out


def write_entry(root: Path, key: str, samples: Iterable[Prepared], skips: dict[str, Any]) -> Path:
    """Write prepared samples as entry ``root/key``; returns its directory.

    Concurrent builders of one key all succeed: the first to finish puts its entry in place and
    the others' copies, which hold the same samples, are discarded.
    """
    target = root / key
    with atomic_directory(target, replace="first-wins") as tmp:
        _write_samples(tmp, samples, skips)
    return target


def _write_samples(directory: Path, samples: Iterable[Prepared], skips: dict[str, Any]) -> None:
    """Shards of about :data:`SHARD_BYTES` each, then the index naming them."""
    shards: list[str] = []
    entries: list[dict[str, Any]] = []
    pending: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal pending, size
        if pending:
            name = f"samples-{len(shards):05d}.safetensors"
            save_safetensors(pending, directory / name)
            shards.append(name)
            pending, size = {}, 0

    for i, sample in enumerate(samples):
        tensors = _tensors(i, sample)
        pending.update(tensors)
        size += sum(t.numel() * t.element_size() for t in tensors.values())
        entries.append(
            {
                "shard": len(shards),
                "length": len(sample),
                "media": [{"kind": item.kind, "info": item.info} for item in sample.media],
                "source": sample.source,
            }
        )
        if size >= SHARD_BYTES:
            flush()
    flush()
    (directory / INDEX).write_text(json.dumps({"shards": shards, "samples": entries, "skips": skips}))


class CacheEntry(Sequence[Prepared]):
    """A finished cache entry, read lazily one sample at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        index = json.loads((path / INDEX).read_text())
        self.shards: list[str] = index["shards"]
        self.entries: list[dict[str, Any]] = index["samples"]
        self.skips: dict[str, Any] = index["skips"]
        self._handles: dict[int, Any] = {}

    @staticmethod
    def find(root: Path, key: str) -> CacheEntry | None:
        """The entry for ``key`` if a finished one exists."""
        path = root / key
        return CacheEntry(path) if (path / INDEX).is_file() else None

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def lengths(self) -> list[int]:
        return [e["length"] for e in self.entries]

    def __getitem__(self, i: int) -> Prepared:  # type: ignore[override]  # ints only, no slices
        entry = self.entries[i]
        handle = self._handles.get(entry["shard"])
        if handle is None:
            handle = SafetensorsFile(self.path / self.shards[entry["shard"]])
            self._handles[entry["shard"]] = handle
        return Prepared(
            input_ids=handle.get_tensor(f"{i}.input_ids"),
            labels=handle.get_tensor(f"{i}.labels"),
            position_ids=handle.get_tensor(f"{i}.position_ids"),
            media=[
                MediaItem(m["kind"], handle.get_tensor(f"{i}.media.{j}").numpy(), m["info"])
                for j, m in enumerate(entry["media"])
            ],
            source=entry["source"],
        )

    def __getstate__(self) -> dict[str, Any]:  # file handles do not cross into data-loader workers
        return {**self.__dict__, "_handles": {}}
