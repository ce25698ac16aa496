"""Per-question results and summaries: csv always, xlsx when ``openpyxl`` is installed."""

from __future__ import annotations

import csv
import json
import re
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmzoo.errors import MmzooError
from mmzoo.eval.datasets import Dataset, Question, Scored, option_columns


def result_rows(
    questions: Sequence[Question], predictions: Sequence[str], scored: Sequence[Scored]
) -> list[dict]:
    """One row per question: the question, options, answer, prediction, extraction and score."""
    letters = option_columns(questions)
    rows = []
    for q, prediction, s in zip(questions, predictions, scored, strict=True):
        row: dict[str, Any] = {"index": q.index, "category": q.category, "question": q.question}
        row.update({letter: q.options.get(letter, "") for letter in letters})
        row.update(
            answer=q.answer, prediction=prediction, extracted=s.extracted, score=s.score, unparsed=s.unparsed
        )
        rows.append(row)
    return rows


def summarize(dataset: Dataset, questions: Sequence[Question], scored: Sequence[Scored]) -> dict[str, Any]:
    """Overall and per-category scores in percent, question counts and the unparsed count."""
    by_category: dict[str, list[float]] = defaultdict(list)
    for q, s in zip(questions, scored, strict=True):
        if q.category:
            by_category[q.category].append(s.score)
    total = [s.score for s in scored]

    def percent(values: list[float]) -> float:
        return round(100 * sum(values) / len(values), 2) if values else 0.0

    return {
        "dataset": dataset.name,
        "metric": dataset.metric,
        "score": percent(total),
        "count": len(total),
        "unparsed": sum(s.unparsed for s in scored),
        "categories": {
            name: {"score": percent(values), "count": len(values)}
            for name, values in sorted(by_category.items())
        },
    }


def write_reports(out_dir: Path, dataset: Dataset, rows: list[dict], summary: dict[str, Any]) -> list[Path]:
    """``{name}_results.{csv,xlsx}`` and ``{name}_summary.{csv,json}`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / dataset.name
    summary_rows = [{"category": "overall", "count": summary["count"], "score": summary["score"]}]
    summary_rows += [{"category": name, **values} for name, values in summary["categories"].items()]
    written = [
        _write_csv(Path(f"{stem}_results.csv"), rows),
        _write_csv(Path(f"{stem}_summary.csv"), summary_rows),
    ]
    json_path = Path(f"{stem}_summary.json")
    json_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    written.append(json_path)
    xlsx = _write_xlsx(Path(f"{stem}_results.xlsx"), rows)
    if xlsx is not None:
        written.append(xlsx)
    return written


def _write_csv(path: Path, rows: list[dict]) -> Path:
    columns = list(rows[0]) if rows else []
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_xlsx(path: Path, rows: list[dict]) -> Path | None:
    try:
        from openpyxl import Workbook
    except ImportError:
        warnings.warn(
            f"openpyxl is not installed: wrote csv only, no {path.name} (pip install openpyxl)", stacklevel=2
        )
        return None
    book = Workbook()
    sheet = book.active
    columns = list(rows[0]) if rows else []
    sheet.append(columns)
    for row in rows:
        sheet.append([_excel_value(row[c]) for c in columns])
    book.save(path)
    return path


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # characters xlsx cannot hold


def _excel_value(value: Any) -> Any:
    if isinstance(value, str):
        value = _CONTROL.sub("", value)
        if value.startswith("="):
            return "'" + value  # never a formula
    return value


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a predictions file: ``.jsonl``, ``.csv``/``.tsv`` or ``.xlsx`` (also VLMEvalKit's)."""
    path = Path(path)
    if not path.is_file():
        raise MmzooError(f"{path}: no such predictions file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise MmzooError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        return rows
    if suffix in (".csv", ".tsv"):
        import sys

        csv.field_size_limit(sys.maxsize)
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".xlsx":
        try:
            from openpyxl import load_workbook
        except ImportError as exc:
            raise MmzooError(
                f"{path}: reading xlsx needs openpyxl (pip install openpyxl), or pass the csv"
            ) from exc
        sheet = load_workbook(path, read_only=True).active
        values = list(sheet.iter_rows(values_only=True))
        if not values:
            return []
        header = [str(h) for h in values[0]]
        return [dict(zip(header, ("" if v is None else v for v in row), strict=False)) for row in values[1:]]
    raise MmzooError(f"{path}: unknown predictions format '{suffix}'; use .jsonl, .csv, .tsv or .xlsx")
