"""On-disk cache of prepared samples: safetensors shards plus an index written last.

One cache entry per data file, keyed by the file's content and the preprocessing settings,
so a second run reads token ids and resized media from disk and decodes nothing. Entries are
built in a temporary sibling directory and renamed into place: concurrent runs never see a
half-written entry (the first rename wins; the loser's copy is discarded). Each shard is
fsynced before the index naming it is written, and the index before the rename, so a crash
never leaves an index that names lost data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from mmzoo.data.pipeline import Prepared
from mmzoo.files import SafetensorsFile, fsync_dir, fsync_file, save_safetensors, share_dir

INDEX = "index.json"
SHARD_BYTES = 256 << 20


def file_digest(path: str | Path) -> str:
    """sha256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(data_file: str | Path, settings: dict[str, Any]) -> str:
    """Key of one data file's entry: its content plus everything that changes preprocessing."""
    blob = json.dumps({"file": file_digest(data_file), "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _tensors(i: int, sample: Prepared) -> dict[str, torch.Tensor]:
    out = {
        f"{i}.input_ids": sample.input_ids,
        f"{i}.labels": sample.labels,
        f"{i}.position_ids": sample.position_ids,
    }
    for kind, frames in (("image", sample.images), ("video", sample.videos)):
        for j, f in enumerate(frames):
            out[f"{i}.{kind}.{j}"] = torch.tensor(f)
    return out


def write_entry(root: Path, key: str, samples: Iterable[Prepared], skips: dict[str, Any]) -> Path:
    """Write prepared samples as entry ``root/key``; returns its directory."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    share_dir(tmp)
    shards: list[str] = []
    entries: list[dict[str, Any]] = []
    pending: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal pending, size
        if pending:
            name = f"samples-{len(shards):05d}.safetensors"
            save_safetensors(pending, tmp / name)
            fsync_file(tmp / name)
            shards.append(name)
            pending, size = {}, 0

    try:
        for i, sample in enumerate(samples):
            tensors = _tensors(i, sample)
            pending.update(tensors)
            size += sum(t.numel() * t.element_size() for t in tensors.values())
            entries.append(
                {
                    "shard": len(shards),
                    "length": len(sample),
                    "images": len(sample.images),
                    "videos": len(sample.videos),
                    "second_per_grid_ts": sample.second_per_grid_ts,
                    "source": sample.source,
                }
            )
            if size >= SHARD_BYTES:
                flush()
        flush()
        index = {"shards": shards, "samples": entries, "skips": skips}
        with open(tmp / INDEX, "w") as f:
            json.dump(index, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
    except BaseException:  # e.g. a strict-mode error or Ctrl-C while preprocessing: leave no debris
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    target = root / key
    try:
        os.rename(tmp, target)
    except OSError:  # another run finished the same entry first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(root)
    return target


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
            images=[handle.get_tensor(f"{i}.image.{j}").numpy() for j in range(entry["images"])],
            videos=[handle.get_tensor(f"{i}.video.{j}").numpy() for j in range(entry["videos"])],
            second_per_grid_ts=entry["second_per_grid_ts"],
            source=entry["source"],
        )

    def __getstate__(self) -> dict[str, Any]:  # file handles do not cross into data-loader workers
        return {**self.__dict__, "_handles": {}}
