"""Reading training records (chat-form or LLaVA-form JSON / JSONL) and reporting bad ones.

Chat form::

    {"messages": [{"role": "user", "content": "<image>\\nWhat is this?"},
                  {"role": "assistant", "content": "A cat."}],
     "images": ["images/cat.jpg"], "videos": []}

LLaVA form::

    {"id": "1", "image": "cat.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

The same records may come as rows of a parquet file or a ``datasets`` ``save_to_disk``
directory (see :mod:`mmzoo.data.tables`), with media as paths, bytes, or ``{"bytes", "path"}``
structs. Bad records are skipped and counted in a `SkipReport`; never dropped silently.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from mmzoo.data.media import MediaBytes
from mmzoo.data.tables import detect_format, table_rows
from mmzoo.errors import MmzooError, nearest

logger = logging.getLogger(__name__)

#: Why a record can be skipped. The first six are found here; the rest later, when media are
#: decoded and samples tokenized. `SkipReport.add` rejects others, so a typo cannot split a count.
REASONS = (
    "malformed_json",
    "unknown_role",
    "empty_answer",
    "placeholder_mismatch",
    "missing_file",
    "bad_structure",
    "corrupt_image",
    "unreadable_video",
    "too_long",
)
ROLES = ("system", "user", "assistant")
# LLaVA's senders, plus the chat-form names that some LLaVA-style files use.
_LLAVA_ROLES = {"human": "user", "gpt": "assistant", **{r: r for r in ROLES}}
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"


@dataclass(slots=True)
class Record:
    """One training sample in chat form.

    Attributes:
        messages: ``{"role": "system" | "user" | "assistant", "content": str}`` turns: an optional
            system turn, then user / assistant alternating, ending with an assistant answer.
        images: absolute image paths or embedded bytes, in ``<image>`` placeholder order (a chat
            prompt's may also be PIL images).
        videos: absolute video paths or embedded bytes, in ``<video>`` placeholder order.
        source: where the record came from: ``"file:line"`` (JSONL), ``"file:#index"`` (JSON
            array) or ``"file row index"`` (parquet / arrow, rows counted from 0).
    """

    messages: list[dict[str, str]]
    images: list[Path | MediaBytes] = field(default_factory=list)
    videos: list[Path | MediaBytes] = field(default_factory=list)
    source: str = ""


class SkipReport:
    """Counts skipped records per reason and keeps the first place and detail for each.

    Shared by the record reader and the media code (which adds ``corrupt_image`` and
    ``unreadable_video`` when decoding fails), so users see one summary.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.first: dict[str, tuple[str, str]] = {}

    def add(self, reason: str, source: str, detail: str) -> None:
        """Count one skipped record.

        Args:
            reason: one of `REASONS`.
            source: ``"file:line"`` or ``"file:#index"`` of the record.
            detail: what is wrong, e.g. ``"images/x.jpg not found"``.
        """
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}{nearest(reason, REASONS)}")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.first.setdefault(reason, (source, detail))

    def merge(self, other: SkipReport) -> None:
        """Add another report's counts (e.g. from a data-loader worker); first places kept if set."""
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            self.first.setdefault(reason, other.first[reason])

    @property
    def total(self) -> int:
        """Number of skipped records, all reasons together."""
        return sum(self.counts.values())

    def summary_lines(self) -> list[str]:
        """One line per reason, e.g. ``skipped 3 records (missing_file), first at d.jsonl:17: ...``."""
        lines = []
        for reason, n in self.counts.items():
            source, detail = self.first[reason]
            noun = "record" if n == 1 else "records"
            lines.append(f"skipped {n} {noun} ({reason}), first at {source}: {detail}")
        return lines


class _Skip(Exception):
    """A bad record: carries the skip reason and a short detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def read_records(data: str, dataset_dir: str | None = None, **options: Any) -> list[Record]:
    """:func:`stream_records` as a list: all records in memory (media bytes embedded in parquet /
    arrow rows included); training and ``mmzoo data inspect`` stream them instead."""
    return list(stream_records(data, dataset_dir, **options))


def stream_records(
    data: str,
    dataset_dir: str | None = None,
    max_samples: int | None = None,
    strict: bool = False,
    report: SkipReport | None = None,
    format: str = "auto",
) -> Iterator[Record]:
    """The good records of one or more data files, in file order, read as they are consumed: each
    file by :func:`iter_records`, its skips merged into ``report`` once it is read.

    Args:
        data: a path, or several joined by commas.
        dataset_dir: directory that relative media paths are resolved against; default: each data
            file's own directory. Absolute media paths are kept.
        max_samples: keep at most this many good records per data file (reading stops there).
        strict: raise at the first bad record instead of skipping it.
        report: where skips are counted; if None, the summary is logged as warnings instead.
        format: ``auto``, ``json``, ``parquet`` or ``arrow`` (see :func:`iter_records`).

    Raises:
        MmzooError: a data file is missing or unreadable, a file yields no good record, or
            (with ``strict``) a record is bad.
    """
    paths = [p.strip() for p in data.split(",") if p.strip()]
    if not paths:
        raise MmzooError(f"no data file given (data={data!r}); pass a JSON/JSONL path, or several with ,")
    for path in paths:
        local = SkipReport()
        yield from iter_records(path, dataset_dir, max_samples, strict, local, format)
        if report is not None:
            report.merge(local)
        else:
            for line in local.summary_lines():
                logger.warning(line)


def iter_records(
    path: str,
    dataset_dir: str | None = None,
    max_samples: int | None = None,
    strict: bool = False,
    report: SkipReport | None = None,
    format: str = "auto",
) -> Iterator[Record]:
    """The good records of one data file, in order; bad ones are counted in ``report``.

    JSON: a file whose first non-blank character is ``[`` is a JSON array, anything else is
    JSONL (one object per line, blank lines ignored); it is parsed whole. Parquet files and
    ``save_to_disk`` directories are read lazily, a slice of rows at a time, their records
    named ``"file row N"``. ``format`` ``auto`` picks by the path (see
    :func:`mmzoo.data.tables.detect_format`).

    Raises:
        MmzooError: as :func:`stream_records`; "no usable records" only once the file is read.
    """
    if max_samples is not None and max_samples < 1:
        raise MmzooError(f"max_samples must be at least 1 (or unset), got {max_samples}")
    report = report if report is not None else SkipReport()
    file = Path(path).expanduser()
    if not file.exists():
        hint = nearest(file.name, os.listdir(file.parent)) if file.parent.is_dir() else ""
        raise MmzooError(f"{path}: data file not found{hint}")
    fmt = detect_format(file, format)
    base = os.path.abspath(os.path.expanduser(dataset_dir) if dataset_dir else file.parent)
    if fmt == "json":
        # Hundreds of thousands of new dicts and lists set off repeated full collections that find
        # no cycles; pausing the collector makes reading about 1.5x faster.
        collecting = gc.isenabled()
        gc.disable()
        try:
            found = _read_json(path, file, base, max_samples, strict, report)
        finally:
            if collecting:
                gc.enable()
        yield from found
        count = len(found)
    else:
        count = 0
        for record in _read_table(path, file, fmt, base, max_samples, strict, report):
            yield record
            count += 1
    if not count:
        raise MmzooError(_empty_message(path, report))


def _read_table(
    path: str, file: Path, fmt: str, base: str, max_samples: int | None, strict: bool, report: SkipReport
) -> Iterator[Record]:
    seen: dict[str, Path | None] = {}
    count = 0
    for index, row in table_rows(file, fmt):
        source = f"{path} row {index}"
        try:
            record = _parse(row, source, base, seen)
        except _Skip as skip:
            _skip(skip, source, strict, report)
            continue
        yield record
        count += 1
        if max_samples is not None and count >= max_samples:
            return


def _read_json(
    path: str, file: Path, base: str, max_samples: int | None, strict: bool, report: SkipReport
) -> list[Record]:
    # Media shared by many records is checked on disk once; the Path is built once too (it costs
    # about as much as parsing the record's JSON).
    seen: dict[str, Path | None] = {}
    records: list[Record] = []
    try:
        with open(file, encoding="utf-8-sig") as f:
            for source, obj in _objects(f, path, report, strict):
                try:
                    records.append(_parse(obj, source, base, seen))
                except _Skip as skip:
                    _skip(skip, source, strict, report)
                    continue
                if max_samples is not None and len(records) >= max_samples:
                    break
    except UnicodeDecodeError as exc:
        where = f"{exc.reason} at byte {exc.start}"
        raise MmzooError(f"{path}: not UTF-8 text ({where}); save it as UTF-8") from None
    return records


def _skip(skip: _Skip, source: str, strict: bool, report: SkipReport) -> None:
    if strict:
        raise _strict_error(source, skip.reason, skip.detail) from None
    report.add(skip.reason, source, skip.detail)


def _strict_error(source: str, reason: str, detail: str) -> MmzooError:
    return MmzooError(
        f"{source}: {reason}: {detail} (strict mode; fix the record, or turn strict off to skip bad records)"
    )


def _objects(f: TextIO, path: str, report: SkipReport, strict: bool) -> Iterator[tuple[str, Any]]:
    """Yield ``(source, object)`` pairs from an open JSON-array or JSONL file."""
    first = ""
    while not first:
        chunk = f.read(4096)
        if not chunk:
            return  # empty file: reported by the caller as a dataset with no records
        first = chunk.lstrip()[:1]
    f.seek(0)
    if first == "[":
        try:
            items = json.load(f)
        except json.JSONDecodeError as exc:
            raise MmzooError(
                f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); a file starting with '[' is read as "
                "one JSON array"
            ) from None
        for index, obj in enumerate(items):
            yield f"{path}:#{index}", obj
        return
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        source = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            detail = f"{exc.msg} at column {exc.colno}"
            if strict:
                raise _strict_error(source, "malformed_json", detail) from None
            report.add("malformed_json", source, detail)
            continue
        yield source, obj


def _parse(obj: Any, source: str, base: str, seen: dict[str, Path | None]) -> Record:
    """Turn one decoded JSON object into a Record, or raise _Skip."""
    if not isinstance(obj, dict):
        raise _Skip("bad_structure", f"record is a JSON {type(obj).__name__}, expected an object")
    if "messages" in obj:
        messages = _chat_messages(obj["messages"])
        images = _media(obj.get("images"), "images")
        videos = _media(obj.get("videos"), "videos")
    elif "conversations" in obj:
        messages = _llava_messages(obj["conversations"])
        images = _media(obj.get("image"), "image")
        videos = _media(obj.get("video"), "video")
        _llava_placeholders(messages, len(images), len(videos))
    else:
        keys = ", ".join(list(obj)[:5])
        raise _Skip("bad_structure", f"no 'messages' or 'conversations' key (keys: {keys})")
    _check_turns(messages)
    text = "\n".join([m["content"] for m in messages])
    for token, files, noun in ((IMAGE_TOKEN, images, "image"), (VIDEO_TOKEN, videos, "video")):
        count = text.count(token)
        if count != len(files):
            raise _Skip("placeholder_mismatch", f"{count} {token} placeholders for {len(files)} {noun}(s)")
    return Record(
        messages,
        _resolve(images, base, seen) if images else [],
        _resolve(videos, base, seen) if videos else [],
        source,
    )


def _chat_messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list):
        raise _Skip("bad_structure", f"'messages' is a {type(raw).__name__}, expected a list")
    messages = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise _Skip("bad_structure", f"messages[{i}] is not a {{'role', 'content'}} object")
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            hint = nearest(str(role), ROLES)
            if role in _LLAVA_ROLES:
                hint = " (LLaVA senders go in 'conversations' as 'from'/'value')"
            raise _Skip("unknown_role", f"messages[{i}] has role {role!r}{hint}")
        if not isinstance(content, str):
            kind = type(content).__name__
            raise _Skip("bad_structure", f"messages[{i}] content is a {kind}, expected a string")
        messages.append({"role": role, "content": content})
    return messages


def _llava_messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list):
        raise _Skip("bad_structure", f"'conversations' is a {type(raw).__name__}, expected a list")
    messages = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise _Skip("bad_structure", f"conversations[{i}] is not a {{'from', 'value'}} object")
        role, value = _LLAVA_ROLES.get(turn["from"]), turn["value"]
        if role is None:
            sender = str(turn["from"])
            hint = nearest(sender, _LLAVA_ROLES)
            raise _Skip("unknown_role", f"conversations[{i}] is from {sender!r}{hint}")
        if not isinstance(value, str):
            kind = type(value).__name__
            raise _Skip("bad_structure", f"conversations[{i}] value is a {kind}, expected a string")
        messages.append({"role": role, "content": value})
    return messages


def _llava_placeholders(messages: list[dict[str, str]], n_images: int, n_videos: int) -> None:
    """Apply LLaVA's placeholder conventions in place, before placeholders are counted."""
    text = "".join(m["content"] for m in messages)
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if first_user is None:
        return  # no user turn: _check_turns reports it
    # LLaVA-Video data marks its video with <image>.
    if n_videos and not n_images and VIDEO_TOKEN not in text and text.count(IMAGE_TOKEN) == n_videos:
        for m in messages:
            m["content"] = m["content"].replace(IMAGE_TOKEN, VIDEO_TOKEN)
        return
    # LLaVA puts the image before the first question when the text does not place it.
    if n_images and IMAGE_TOKEN not in text:
        first_user["content"] = (IMAGE_TOKEN + "\n") * n_images + first_user["content"]
    if n_videos and VIDEO_TOKEN not in text:
        first_user["content"] = (VIDEO_TOKEN + "\n") * n_videos + first_user["content"]


def _check_turns(messages: list[dict[str, str]]) -> None:
    """Optional system turn, then user/assistant alternating, ending with a non-empty answer."""
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise _Skip("empty_answer", "no assistant turn")
    start = 1 if roles[0] == "system" else 0
    # Compared as whole lists (fast path for hundreds of thousands of good records); the
    # offending turn is searched for only when the comparison fails.
    n = len(roles) - start
    expected = ["user", "assistant"] * (n // 2) + ["user"] * (n % 2)
    if roles[start:] != expected:
        j = next(j for j in range(n) if roles[start + j] != expected[j])
        role, want = roles[start + j], expected[j]
        raise _Skip("bad_structure", f"turn {start + j} is {role!r}, expected {want!r}; roles must alternate")
    if roles[-1] != "assistant":
        raise _Skip("bad_structure", f"last turn is {roles[-1]!r}; a record must end with an answer")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise _Skip("empty_answer", f"turn {i} (assistant) is empty")


def _media(raw: Any, key: str) -> list[str | MediaBytes]:
    """A media field: a path, bytes or a ``{"bytes", "path"}`` struct (``datasets``' Image and
    Video features), or a list of them; bytes win over a struct's path."""
    if raw is None:
        return []
    items = raw if isinstance(raw, list) else [raw]
    media: list[str | MediaBytes] = []
    for i, item in enumerate(items):
        name = f"{key}[{i}]"
        if isinstance(item, dict) and item.keys() <= {"bytes", "path"}:
            if item.get("path"):
                name += f" ({item['path']})"
            item = item["bytes"] if item.get("bytes") is not None else item.get("path")
        if isinstance(item, str) and item:
            media.append(item)
        elif isinstance(item, bytes) and item:
            media.append(MediaBytes(item, name))
        else:
            kind = type(item).__name__
            want = "a path, bytes or a {'bytes', 'path'} struct, or a list of them"
            raise _Skip("bad_structure", f"{name} is a {kind}; '{key}' must be {want}")
    return media


def _resolve(
    media: list[str | MediaBytes], base: str, seen: dict[str, Path | None]
) -> list[Path | MediaBytes]:
    resolved: list[Path | MediaBytes] = []
    for raw in media:
        if isinstance(raw, MediaBytes):
            resolved.append(raw)
            continue
        full = os.path.normpath(os.path.join(base, os.path.expanduser(raw)))  # join keeps absolute paths
        if full in seen:
            path = seen[full]
        else:
            path = seen[full] = Path(full) if os.path.isfile(full) else None
        if path is None:
            where = "" if os.path.isabs(raw) else f" under {base}"
            raise _Skip("missing_file", f"{raw} not found{where}")
        resolved.append(path)
    return resolved


def _empty_message(path: str, report: SkipReport) -> str:
    if not report.counts:
        return (
            f"{path}: no records in this file; it should be a JSON array of objects, JSONL, "
            "parquet or a datasets save_to_disk directory"
        )
    counts = ", ".join(f"{n} {reason}" for reason, n in report.counts.items())
    source, detail = next(iter(report.first.values()))
    hint = ""
    if "missing_file" in report.counts:
        hint = "; media paths are resolved against dataset_dir (default: the data file's directory)"
    elif set(report.counts) == {"malformed_json"}:
        hint = "; records must be a JSON array or one JSON object per line"
    return f"{path}: no usable records (skipped {counts}; first at {source}: {detail}){hint}"
