"""Converting LLaVA-form JSON (e.g. ``llava_instruct_150k.json``) to chat-form JSONL or parquet."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from mmzoo.data.parquet_out import write_parquet
from mmzoo.data.records import REASONS, Record, SkipReport, read_records
from mmzoo.errors import MmzooError
from mmzoo.files import atomic_file

logger = logging.getLogger(__name__)


def convert_llava(
    src: str | Path, image_dir: str | Path, out: str | Path, *, report: SkipReport | None = None
) -> dict[str, int]:
    """Convert a LLaVA JSON / JSONL file to chat-form JSONL, or parquet, written atomically.

    Records are read with `read_records`, so the same checks apply: records whose image is
    missing under ``image_dir`` (or that are otherwise bad) are skipped and counted; text-only
    records are kept. LLaVA records with an image but no ``<image>`` get one before the first
    question, as LLaVA does.

    Media paths in JSONL output are absolute: `read_records` keeps absolute paths whatever
    ``dataset_dir`` is, so the output can be mixed with other datasets in one ``data`` list.
    Moving the images means converting again. Parquet output (``out`` ending in ``.parquet``)
    holds the media themselves (see :func:`mmzoo.data.parquet_out.write_parquet`): one
    self-contained file.

    Args:
        src: the LLaVA file.
        image_dir: directory the records' ``image`` / ``video`` paths are relative to.
        out: the chat-form JSONL (or ``.parquet``) to write; its directory is created if needed.
        report: where skipped records are counted (for a per-reason summary); if None, the
            summary is logged as warnings.

    Returns:
        Counts: ``read``, ``written``, ``text_only``, ``skipped``, and one entry per skip reason
        that occurred (e.g. ``missing_file``).

    Raises:
        MmzooError: ``src`` or ``image_dir`` is missing, or no record is usable.
    """
    if not os.path.isdir(image_dir):
        raise MmzooError(f"{image_dir}: image directory not found; pass the folder the image paths start in")
    log_skips = report is None
    report = report if report is not None else SkipReport()
    before = dict(report.counts)  # the caller's report may already hold other datasets' skips
    records = read_records(str(src), dataset_dir=str(image_dir), report=report)
    skipped = {r: report.counts.get(r, 0) - before.get(r, 0) for r in REASONS}
    skipped = {r: n for r, n in skipped.items() if n}

    out = Path(out)
    if out.suffix.lower() == ".parquet":
        write_parquet(out, records)
    else:
        _write_jsonl(out, records)
    if log_skips:
        for line in report.summary_lines():
            logger.warning(line)
    text_only = sum(1 for r in records if not r.images and not r.videos)
    return {
        "read": len(records) + sum(skipped.values()),
        "written": len(records),
        "text_only": text_only,
        "skipped": sum(skipped.values()),
        **skipped,
    }


def _write_jsonl(out: Path, records: list[Record]) -> None:
    """Chat-form JSONL written atomically (``mmzoo.files.atomic_file``): never half a dataset."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as f:
        for record in records:
            row: dict[str, object] = {"messages": record.messages}
            if record.images:
                row["images"] = [str(p) for p in record.images]
            if record.videos:
                row["videos"] = [str(p) for p in record.videos]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
