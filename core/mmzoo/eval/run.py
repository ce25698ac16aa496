"""The evaluation loop: cached, resumable, data-parallel generation, then scoring and reports.

Predictions are appended to ``OUT/predictions.jsonl`` (``predictions.rank{r}.jsonl`` per rank
under torchrun) after every batch; a rerun skips every index found in any of those files.
``OUT/eval_run.json`` records what produced them (model, dataset, data file, settings): a run
that differs finds the cache refused rather than scored as its own.
Under torchrun (``WORLD_SIZE > 1``) each rank answers ``pending[rank::world]``; rank 0
gathers the answers (gloo), merges them in the TSV's row order and writes the reports.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmzoo.errors import MmzooError
from mmzoo.eval.datasets import Dataset, Question, score_question
from mmzoo.eval.report import result_rows, summarize, write_reports
from mmzoo.files import atomic_file

GenerateFn = Callable[[Sequence[Question]], list[str]]


def read_cache(out_dir: Path, known: set[str]) -> dict[str, str]:
    """``index -> prediction`` from every ``predictions*.jsonl`` in ``out_dir`` (torn lines skipped)."""
    done: dict[str, str] = {}
    for path in sorted(out_dir.glob("predictions*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interruption: answered again
            if isinstance(row, dict) and str(row.get("index")) in known:
                done[str(row["index"])] = str(row.get("prediction", ""))
    return done


RUN_FILE = "eval_run.json"


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def claim_cache(out_dir: Path, run: dict[str, Any]) -> None:
    """Tie ``out_dir``'s cached predictions to ``run``; those of a different run are an error."""
    path = out_dir / RUN_FILE
    cached = sorted(out_dir.glob("predictions*.jsonl"))
    if cached:
        before = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        changed = [k for k in sorted(set(before) | set(run)) if before.get(k) != run.get(k)]
        if changed:
            diff = "; ".join(f"{k}: {before.get(k, '?')} -> {run.get(k)}" for k in changed)
            raise MmzooError(
                f"{out_dir} holds predictions of another run ({diff}): use another --out, or delete "
                f"{out_dir}/predictions*.jsonl to answer every question again"
            )
        return
    with atomic_file(path) as f:
        f.write(json.dumps(run, indent=1) + "\n")


def shard(pending: Sequence[Question], rank: int, world: int) -> list[Question]:
    """The questions rank ``rank`` of ``world`` answers (strided, so ranks get similar mixes)."""
    return list(pending[rank::world])


def merge(questions: Sequence[Question], parts: Sequence[dict[str, str]]) -> list[str]:
    """Predictions in the questions' order from per-rank ``index -> prediction`` parts."""
    merged: dict[str, str] = {}
    for part in parts:
        merged.update(part)
    missing = [q.index for q in questions if q.index not in merged]
    if missing:
        raise MmzooError(f"no prediction for {len(missing)} question(s), e.g. index {missing[0]}")
    return [merged[q.index] for q in questions]


def dist_env() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment; ``(0, 1)`` without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def evaluate(
    questions: Sequence[Question],
    dataset: Dataset,
    generate: GenerateFn,
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    run: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Answer every question not cached in ``out_dir``, then score and write the reports.

    Args:
        questions: the benchmark rows, in file order.
        dataset: the benchmark (prompt and scoring rules).
        generate: questions -> predictions (one string each, in order).
        out_dir: where the cache and the reports go.
        batch_size: questions per ``generate`` call.
        run: what produces the predictions (JSON values); cached ones of another run are refused.
        log: progress lines.

    Returns:
        The summary on rank 0; ``None`` on the other ranks.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = dist_env()
    owned = world > 1 and _join_group()
    try:
        parts, done = _answer_all(out, questions, dataset, generate, batch_size, run, log, rank, world)
    finally:
        if owned:  # a gloo group left alive at exit can abort the process ("terminate called ...")
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank != 0:
        return None
    predictions = merge(questions, [done, *parts])
    scored = [score_question(q, p, dataset) for q, p in zip(questions, predictions, strict=True)]
    summary = summarize(dataset, questions, scored)
    write_reports(out, dataset, result_rows(questions, predictions, scored), summary)
    return summary


def _join_group() -> bool:
    """Join the ranks' gloo group unless the caller did; whether this call created it."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    dist.init_process_group("gloo")
    return True


def _answer_all(
    out: Path,
    questions: Sequence[Question],
    dataset: Dataset,
    generate: GenerateFn,
    batch_size: int,
    run: dict[str, Any] | None,
    log: Callable[[str], None],
    rank: int,
    world: int,
) -> tuple[list[Any], dict[str, str]]:
    """This rank's answers of the questions not cached, gathered from every rank, and the cached ones."""
    done = _cached(out, questions, {"dataset": dataset.name, **(run or {})}, rank, world)
    pending = [q for q in questions if q.index not in done]
    mine = shard(pending, rank, world)
    if rank == 0:
        log(
            f"{dataset.name}: {len(questions)} questions, {len(done)} cached, {len(pending)} to answer"
            + (f" on {world} ranks" if world > 1 else "")
        )
    cache = out / ("predictions.jsonl" if world == 1 else f"predictions.rank{rank}.jsonl")
    answered = _answer(
        mine, generate, cache, batch_size, lambda n: log(f"rank {rank}: {n}/{len(mine)} answered")
    )
    parts: list[Any] = [answered]
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, answered)
        parts = gathered
    return parts, done


def _cached(
    out: Path, questions: Sequence[Question], run: dict[str, Any], rank: int, world: int
) -> dict[str, str]:
    """The cached predictions every rank starts from: rank 0 claims the cache and reads it."""
    if rank == 0:
        claim_cache(out, run)
    done = read_cache(out, {q.index for q in questions}) if rank == 0 else {}
    if world > 1:
        import torch.distributed as dist

        shared = [done]  # rank 0's view, so every rank slices the same pending list
        dist.broadcast_object_list(shared, src=0)
        done = shared[0]
    return done


def _answer(
    questions: Sequence[Question],
    generate: GenerateFn,
    cache: Path,
    batch_size: int,
    progress: Callable[[int], None],
) -> dict[str, str]:
    """``index -> prediction`` of ``questions``, in batches, each batch appended to ``cache``."""
    answered: dict[str, str] = {}
    with cache.open("a", encoding="utf-8") as f:
        for start in range(0, len(questions), batch_size):
            batch = questions[start : start + batch_size]
            predictions = generate(batch)
            if len(predictions) != len(batch):
                raise MmzooError(f"the generator gave {len(predictions)} answers for {len(batch)} questions")
            for q, prediction in zip(batch, predictions, strict=True):
                answered[q.index] = prediction
                f.write(json.dumps({"index": q.index, "prediction": prediction}, ensure_ascii=False) + "\n")
            f.flush()
            progress(start + len(batch))
    return answered


def score_rows(
    rows: Sequence[dict[str, Any]], dataset: Dataset, where: str
) -> tuple[list[Question], list[str]]:
    """Questions and predictions from a predictions file's rows (each needs ``prediction``)."""
    from mmzoo.eval.datasets import question_from_row

    questions, predictions = [], []
    for number, row in enumerate(rows, start=1):
        if "prediction" not in row:
            raise MmzooError(f"{where} row {number}: missing column 'prediction'; columns: {', '.join(row)}")
        questions.append(question_from_row(row, f"{where} row {number}", need_image=False))
        predictions.append("" if row["prediction"] is None else str(row["prediction"]))
    return questions, predictions
