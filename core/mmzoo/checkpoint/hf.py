"""Reading Hugging Face checkpoint directories (config.json + safetensors), streaming tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmzoo.errors import MmzooError
from mmzoo.files import SafetensorsFile


class HFCheckpoint:
    """A Hugging Face checkpoint directory; tensors are read one at a time (``safe_open``).

    Args:
        path: directory holding ``config.json`` and ``*.safetensors`` (one file, or shards with a
            ``model.safetensors.index.json``).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise MmzooError(f"{self.path}: no such directory; pass a Hugging Face checkpoint directory")
        if not self.path.is_dir():
            raise MmzooError(f"{self.path}: not a directory; pass the checkpoint directory, not a file in it")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise MmzooError(
                f"{self.path}: no config.json here; pass a Hugging Face checkpoint directory "
                "(config.json + *.safetensors)"
            )
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise MmzooError(f"{config_path}: not valid JSON ({exc})") from exc
        self.files = self._index()
        self._handles: dict[str, Any] = {}

    def _index(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise MmzooError(f"{index}: has no 'weight_map' object")
            for name in sorted(set(weight_map.values())):
                if not (self.path / name).is_file():
                    raise MmzooError(f"{index}: lists shard {name}, which is missing from {self.path}")
            return dict(weight_map)
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise MmzooError(
                f"{self.path}: no *.safetensors weights found (pickled .bin weights are not read)"
            )
        files: dict[str, str] = {}
        for shard in shards:
            with SafetensorsFile(shard) as f:
                for key in f.keys():
                    files[key] = shard.name
        return files

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if not archs:
            raise MmzooError(
                f"{self.path / 'config.json'}: no 'architectures' entry, so the model family is unknown"
            )
        return archs[0]

    def keys(self) -> set[str]:
        return set(self.files)

    def _handle(self, name: str) -> Any:
        file = self.files[name]
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = SafetensorsFile(self.path / file)
        return handle

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor from its shard."""
        return self._handle(name).get_tensor(name)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """``(safetensors dtype name, shape)`` of one tensor, read from the header only."""
        info = self._handle(name).get_slice(name)
        return info.get_dtype(), tuple(info.get_shape())

    def close(self) -> None:
        """Drop the open files (and the memory maps' resident pages with them)."""
        self._handles.clear()
