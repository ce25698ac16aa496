"""Rows of columnar training data: parquet files and ``datasets`` ``save_to_disk`` directories.

Both are read with pyarrow a slice at a time, so a file of many gigabytes (embedded images
included) is never held whole: a parquet file one row group at a time, a ``save_to_disk``
directory through its memory-mapped Arrow stream files (those ``state.json`` lists under
``_data_files``; the ``datasets`` package is not needed). Rows come out as plain Python dicts
with null cells dropped, so the record parser treats a null column like a missing key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmzoo.errors import MmzooError

#: What ``data.format`` may be; ``auto`` picks by path (see :func:`detect_format`).
FORMATS = ("auto", "json", "parquet", "arrow")
#: Columns the record parser reads (either record form); others are not read from disk.
COLUMNS = ("messages", "images", "videos", "conversations", "image", "video")
_SLICE = 64  # rows turned into Python objects at once


def detect_format(path: Path, fmt: str = "auto") -> str:
    """The reader for ``path``: ``fmt`` unless ``auto``, else by the path (directory: ``arrow``,
    ``*.parquet``: ``parquet``, anything else: ``json``).

    Raises:
        MmzooError: ``fmt`` is not one of :data:`FORMATS`, or the path does not fit the format.
    """
    if fmt not in FORMATS:
        raise MmzooError(f"data.format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = "arrow" if path.is_dir() else "parquet" if path.suffix.lower() == ".parquet" else "json"
    if (fmt == "arrow") != path.is_dir():
        want = "a datasets save_to_disk directory" if fmt == "arrow" else "a file"
        raise MmzooError(f"{path}: data.format {fmt} reads {want}; set data.format to match the path")
    return fmt


def table_rows(path: Path, fmt: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row index, row)`` pairs, counted from 0 over the whole file or directory.

    Args:
        path: a parquet file (``fmt="parquet"``) or a ``save_to_disk`` directory (``"arrow"``).
        fmt: ``parquet`` or ``arrow``.

    Raises:
        MmzooError: the file or directory is not readable as that format.
    """
    import pyarrow as pa

    batches = _parquet_batches(path) if fmt == "parquet" else _arrow_batches(path)
    index = 0
    try:
        for batch in batches:
            for start in range(0, batch.num_rows, _SLICE):
                for row in batch.slice(start, _SLICE).to_pylist():
                    yield index, {k: v for k, v in row.items() if v is not None}
                    index += 1
    except (pa.ArrowException, OSError) as exc:
        raise MmzooError(f"{path}: cannot read as {fmt} ({exc}); it is truncated or not {fmt}") from None


def _columns(names: list[str]) -> list[str] | None:
    """The record columns present, or None (all columns: the parser then names what is there)."""
    wanted = [c for c in COLUMNS if c in names]
    return wanted if {"messages", "conversations"} & set(wanted) else None


def _parquet_batches(path: Path) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise MmzooError(f"{path}: not a readable parquet file ({exc})") from None
    columns = _columns(parquet.schema_arrow.names)
    for group in range(parquet.num_row_groups):
        yield parquet.read_row_group(group, columns=columns)


def arrow_files(directory: Path) -> list[Path]:
    """The Arrow stream files of a ``save_to_disk`` directory, in row order (from ``state.json``).

    Raises:
        MmzooError: not a ``save_to_disk`` directory of one split.
    """
    if (directory / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in directory.iterdir() if p.is_dir())
        raise MmzooError(
            f"{directory}: a DatasetDict ({', '.join(splits)}); pass one split's directory, "
            f"e.g. {directory / (splits[0] if splits else 'train')}"
        )
    state = directory / "state.json"
    if not state.is_file():
        raise MmzooError(f"{directory}: no state.json; pass a directory written by datasets' save_to_disk")
    try:
        names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise MmzooError(f"{state}: no _data_files list ({exc}); write it again with save_to_disk") from None
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise MmzooError(f"{directory}: {missing[0]} (listed in state.json) is missing")
    return [directory / n for n in names]


def _arrow_batches(directory: Path) -> Iterator[Any]:
    import pyarrow as pa

    for file in arrow_files(directory):
        with pa.memory_map(str(file)) as source:
            reader = pa.ipc.open_stream(source)
            columns = _columns(reader.schema.names)
            for batch in reader:
                yield batch if columns is None else batch.select(columns)
