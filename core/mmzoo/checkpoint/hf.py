"""Reading Hugging Face checkpoint directories (config.json + safetensors), streaming tensors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mmzoo.checkpoint.weights import Weights, resolve_dtype
from mmzoo.errors import MmzooError
from mmzoo.files import SafetensorsFile
from mmzoo.registry import model_for_architecture


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


def open_hf_weights(path: str | Path, dtype: torch.dtype | str | None = None) -> Weights:
    """The mm tensors of a Hugging Face directory, produced by the family's mapping on demand.

    The family comes from ``architectures`` in config.json; both key layouts transformers has
    written are read. Names are checked before any tensor is read.
    """
    checkpoint = HFCheckpoint(path)
    spec = model_for_architecture(checkpoint.architecture)
    try:
        config = spec.config_from_hf(checkpoint.config)
    except (KeyError, TypeError, ValueError) as exc:
        raise MmzooError(f"{checkpoint.path / 'config.json'}: cannot read it as {spec.name}: {exc}") from exc
    mapping = spec.weight_mapping(config)
    canonical = {mapping.canonical_hf_name(k): k for k in checkpoint.keys()}
    missing, unexpected = mapping.check_hf_names(set(canonical))
    where = checkpoint.path
    if missing:
        raise MmzooError(
            f"{where}: {len(missing)} weights missing for {spec.name}: {', '.join(missing[:8])}"
            f"{' ...' if len(missing) > 8 else ''}; is this checkpoint complete and of this family?"
        )
    if unexpected:
        raise MmzooError(
            f"{where}: {len(unexpected)} unexpected weights for {spec.name}: {', '.join(unexpected[:8])}"
            f"{' ...' if len(unexpected) > 8 else ''}; does config.json match the weights?"
        )

    def items() -> Iterator[tuple[str, torch.Tensor]]:
        # The files are dropped after every tensor: a memory map kept open holds every page read
        # through it, which on a rank that keeps only its shards is the rest of the checkpoint.
        try:
            for item in mapping.to_mm(lambda n: checkpoint.get(canonical[n]), set(canonical)):
                checkpoint.close()
                yield item
        finally:
            checkpoint.close()

    hint = "does config.json match the weights?"
    config_dtype = checkpoint.config.get("dtype") or checkpoint.config.get("torch_dtype") or "float32"
    return Weights(spec, config, where, resolve_dtype(dtype, lambda: config_dtype), items, hint)
