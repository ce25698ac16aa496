"""Writing safetensors files one tensor at a time, so a shard never has to fit in memory.

The header (names, dtypes, shapes, offsets) is known before any data is read, so it is
written first and each tensor is appended as it is produced. Files read back with
``safetensors.safe_open`` like any other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType

import torch

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``dtype`` and ``shape``."""
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


class StreamingWriter:
    """A safetensors file whose tensors are written in a declared order.

    Args:
        path: the file to create.
        specs: ``(name, dtype, shape)`` of every tensor, in the order they will be written.
        metadata: the header's ``__metadata__`` strings.
    """

    def __init__(
        self,
        path: str | Path,
        specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._order = [(name, dtype, tuple(shape)) for name, dtype, shape in specs]
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, dtype, shape in self._order:
            size = nbytes(dtype, shape)
            header[name] = {
                "dtype": _DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        self.total_bytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` as ``name``; names, dtypes and shapes must follow the declared order."""
        expected = self._order[self._next]
        got = (name, tensor.dtype, tuple(tensor.shape))
        if got != expected:
            raise RuntimeError(f"{self.path}: expected {expected} next, got {got}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(data.numpy().data)
        self._next += 1

    def close(self) -> None:
        """Flush and fsync; every declared tensor must have been written."""
        if self._next != len(self._order):
            self._file.close()
            raise RuntimeError(f"{self.path}: {len(self._order) - self._next} declared tensors not written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        """Close the file without checking it (the caller removes it)."""
        self._file.close()

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
