"""Benchmarks in VLMEvalKit's TSV format: reading, prompts and per-question scoring.

A TSV has a header with ``index``, ``question``, ``answer``, the media column ``image`` (base64,
or a list literal of base64 strings; a short number refers to the image of the row with that
index), and where present option columns ``A``, ``B``, ..., ``hint``, ``category`` and
``question_type``.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import re
import string
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmzoo.errors import MmzooError, nearest
from mmzoo.eval import scoring

Kind = Literal["mcq", "mmmu", "chartqa", "docvqa"]
LETTER_PROMPT = "Answer with the option's letter from the given choices directly."
SHORT_PROMPT = "Answer the question using a single word or phrase."


@dataclass(frozen=True)
class Dataset:
    """A supported benchmark: how its prompts are built and its answers scored."""

    name: str
    kind: Kind
    metric: str


DATASETS = {
    d.name: d
    for d in (
        Dataset("ai2d_test", "mcq", "accuracy"),
        Dataset("mmmu_dev_val", "mmmu", "accuracy"),
        Dataset("chartqa_test", "chartqa", "relaxed_accuracy"),
        Dataset("docvqa_val", "docvqa", "anls"),
    )
}


def get_dataset(name: str) -> Dataset:
    """The dataset called ``name``; an unknown name lists the known ones."""
    if name not in DATASETS:
        raise MmzooError(f"unknown dataset '{name}'{nearest(name, DATASETS)}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


@dataclass
class Question:
    """One benchmark row. ``images`` hold base64 strings (decoded when generating)."""

    index: str
    question: str
    answer: str
    options: dict[str, str] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)
    hint: str = ""
    category: str = ""
    question_type: str = ""
    where: str = ""  # "FILE row N" for error messages

    @property
    def is_choice(self) -> bool:
        return bool(self.options) and self.question_type != "open"


def _cell(value: Any) -> str:
    text = "" if value is None else str(value).strip()
    return "" if text.lower() in {"nan", "none"} else text


def question_from_row(row: Mapping[str, Any], where: str, *, need_image: bool = True) -> Question:
    """A :class:`Question` from a row dict (TSV row or predictions-file row)."""
    missing = [c for c in ("index", "question", "answer") if c not in row]
    if need_image and "image" not in row:
        missing.append("image")
    if missing:
        raise MmzooError(f"{where}: missing column(s) {', '.join(missing)}; columns: {', '.join(row)}")
    options = {c: _cell(row[c]) for c in string.ascii_uppercase if c in row and _cell(row[c])}
    return Question(
        index=_cell(row["index"]),
        question=_cell(row["question"]),
        answer=_cell(row["answer"]),
        options=options,
        images=_image_list(row.get("image")),
        hint=_cell(row.get("hint")),
        category=_cell(row.get("category")),
        question_type=_cell(row.get("question_type")).lower(),
        where=where,
    )


def _image_list(value: Any) -> list[str]:
    text = _cell(value)
    if not text:
        return []
    if text.startswith("["):
        try:
            items = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            items = None
        if isinstance(items, list):
            return [str(i) for i in items]
    return [text]


def read_tsv(path: str | Path, dataset: Dataset) -> list[Question]:
    """All questions of a VLMEvalKit TSV, in file order.

    Raises:
        MmzooError: a missing file or column, a duplicate index, a row with the wrong number of
            cells, or an image reference to an unknown index (each naming the row).
    """
    path = Path(path)
    if not path.is_file():
        raise MmzooError(f"{path}: no such file; pass the {dataset.name} TSV with --data")
    csv.field_size_limit(sys.maxsize)  # base64 images are large cells
    questions: list[Question] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        header = reader.fieldnames or []
        for column in ("index", "question", "answer", "image"):
            if column not in header:
                raise MmzooError(
                    f"{path}: missing column '{column}' needed for {dataset.name}; "
                    f"columns: {', '.join(header)}"
                )
        for number, row in enumerate(reader, start=2):  # line 1 is the header
            if None in row or any(v is None for v in row.values()):
                raise MmzooError(
                    f"{path} row {number}: {len(header)} columns expected, found a different count"
                )
            questions.append(question_from_row(row, f"{path} row {number}"))
    by_index: dict[str, Question] = {}
    for q in questions:
        if q.index in by_index:
            raise MmzooError(f"{q.where}: index {q.index} repeats {by_index[q.index].where}")
        by_index[q.index] = q
    for q in questions:  # VLMEvalKit stores a repeated image once and refers to it by index
        resolved = []
        for image in q.images:
            if len(image) < 32 and image.isdigit():
                if image not in by_index or not by_index[image].images:
                    raise MmzooError(
                        f"{q.where}, column 'image': refers to index {image}, which has no image"
                    )
                image = by_index[image].images[0]
            resolved.append(image)
        q.images = resolved
    return questions


def decode_image(data: str, where: str) -> Any:
    """A base64 cell as an RGB PIL image; errors name the row and column."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(data, validate=False)
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (binascii.Error, ValueError, OSError, UnidentifiedImageError) as exc:
        raise MmzooError(
            f"{where}, column 'image': not a decodable base64 image ({type(exc).__name__})"
        ) from exc
    return image.convert("RGB")


def build_prompt(q: Question, dataset: Dataset) -> str:
    """The user message for one question, laid out as the reference toolkits do.

    Multiple choice: ``Hint:`` (when given), ``Question:``, ``Options:`` one ``X. text`` per
    line, then the instruction to answer with the letter. Short answers (ChartQA, DocVQA, MMMU
    open questions): the question and the single-word-or-phrase instruction.
    """
    if dataset.kind in ("mcq", "mmmu") and q.is_choice:
        lines = [f"Hint: {q.hint}"] if q.hint else []
        lines.append(f"Question: {q.question}")
        lines.append("Options:")
        lines += [f"{letter}. {text}" for letter, text in q.options.items()]
        lines.append(LETTER_PROMPT)
        return "\n".join(lines)
    return f"{q.question}\n{SHORT_PROMPT}"


IMAGE_TAG = re.compile(r"<image (\d+)>")


def place_images(prompt: str, images: Sequence[str]) -> tuple[str, list[str]]:
    """Interleave images where MMMU-style ``<image k>`` tags stand in the prompt.

    Each tag becomes an ``<image>`` placeholder for the k-th image (1-based), in the order the
    tags appear; images no tag mentions go first. Prompts without tags are returned as they are
    (the chat puts their images before the text).
    """
    order = [int(k) for k in IMAGE_TAG.findall(prompt) if 1 <= int(k) <= len(images)]
    if not order:
        return prompt, list(images)
    unmentioned = [image for i, image in enumerate(images, 1) if i not in order]
    text = IMAGE_TAG.sub(lambda m: "<image>" if 1 <= int(m.group(1)) <= len(images) else m.group(0), prompt)
    return "<image>" * len(unmentioned) + text, unmentioned + [images[k - 1] for k in order]


@dataclass(frozen=True)
class Scored:
    """One scored answer: the extracted answer, its score in [0, 1], and whether extraction failed."""

    extracted: str
    score: float
    unparsed: bool = False


def score_question(q: Question, prediction: str, dataset: Dataset) -> Scored:
    """Score one prediction with the dataset's rule (see :mod:`mmzoo.eval.scoring`)."""
    if dataset.kind in ("mcq", "mmmu"):
        options, truth = q.options, q.answer
        if dataset.kind == "mmmu":
            options, truth = scoring.mmmu_choice(q.options, q.answer)
        letter = scoring.extract_choice(prediction, options)
        # VLMEvalKit scores an answer it cannot read as the letter Z
        return Scored(letter or "", float((letter or scoring.NO_CHOICE) == truth), unparsed=letter is None)
    targets = scoring.answer_list(q.answer)
    if dataset.kind == "chartqa":
        return Scored(prediction.strip(), scoring.relaxed_accuracy(prediction, targets))
    return Scored(prediction.strip(), scoring.anls(prediction, targets))


def option_columns(questions: Sequence[Question]) -> list[str]:
    """Option letters used by any question, in order."""
    used = {letter for q in questions for letter in q.options}
    return [c for c in string.ascii_uppercase if c in used]
