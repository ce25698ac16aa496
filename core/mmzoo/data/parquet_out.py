"""Writing chat-form records to one self-contained parquet file, media embedded as bytes."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmzoo.data.media import MediaBytes
from mmzoo.data.records import Record
from mmzoo.files import atomic_file

#: A row group ends at this many rows or after about this many bytes of media, whichever first.
GROUP_ROWS = 256
GROUP_BYTES = 64 << 20


def schema() -> Any:
    """``messages`` as role/content structs; ``images`` and ``videos`` as lists of the
    ``{"bytes", "path"}`` struct that ``datasets``' Image and Video features use."""
    import pyarrow as pa

    media = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.schema([("messages", pa.list_(turn)), ("images", media), ("videos", media)])


def _embedded(item: Path | MediaBytes) -> dict[str, Any]:
    if isinstance(item, MediaBytes):
        return {"bytes": item.data, "path": None}
    return {"bytes": item.read_bytes(), "path": item.name}


def write_parquet(out: Path, records: Iterable[Record]) -> None:
    """Write ``records`` to ``out`` atomically, their image and video files read in as bytes.

    Media are read a row group at a time, so memory holds one group's media, not the dataset's.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    size = 0
    with atomic_file(out, binary=True) as f, pq.ParquetWriter(f, schema()) as writer:
        for record in records:
            row = {
                "messages": record.messages,
                "images": [_embedded(p) for p in record.images],
                "videos": [_embedded(p) for p in record.videos],
            }
            rows.append(row)
            size += sum(len(m["bytes"]) for m in row["images"] + row["videos"])
            if len(rows) >= GROUP_ROWS or size >= GROUP_BYTES:
                writer.write_table(pa.Table.from_pylist(rows, schema()))
                rows, size = [], 0
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema()))
