"""``mmzoo eval``: answer a benchmark TSV greedily and score it; ``mmzoo eval score``: score a file."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from mmzoo.commands.infer import add_model_args
from mmzoo.errors import MmzooError


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mmzoo eval`` (and ``mmzoo eval score``) on the top-level subparsers."""
    from mmzoo.eval.datasets import DATASETS

    names = ", ".join(DATASETS)
    p = sub.add_parser(
        "eval",
        help="evaluate a model on a benchmark TSV (VLMEvalKit format); `eval score` scores a file",
        description=f"Datasets: {names}. Run under torchrun for data parallelism; rerun to resume.",
    )
    add_model_args(p)
    p._option_string_actions["--model-dir"].required = False
    p.add_argument("--dataset", help=f"benchmark: {names}")
    p.add_argument("--data", help="the benchmark's TSV file")
    p.add_argument("--out", help="output directory (predictions cache, results, summary)")
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="most generated tokens per answer (default 64)"
    )
    p.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="greedy with this penalty (1.0: off)"
    )
    p.set_defaults(func=run)
    score_sub = p.add_subparsers(dest="eval_command", metavar="COMMAND")
    s = score_sub.add_parser("score", help="score an existing predictions file (no model needed)")
    s.add_argument("--dataset", required=True, help=f"benchmark: {names}")
    s.add_argument(
        "--predictions",
        required=True,
        help="results file (.csv/.xlsx/.jsonl) with the answers, or predictions.jsonl together with --data",
    )
    s.add_argument(
        "--data", help="the benchmark TSV, when the predictions file holds only index + prediction"
    )
    s.add_argument("--out", help="write the results and summary here too")
    s.set_defaults(func=score)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"mmzoo: warning: {message}", file=sys.stderr)


def _print_summary(summary: dict) -> None:
    print(
        f"{summary['dataset']} {summary['metric']}: {summary['score']:.2f} over {summary['count']} questions"
        + (f" ({summary['unparsed']} unparsed answers counted wrong)" if summary["unparsed"] else "")
    )
    for name, values in summary["categories"].items():
        print(f"  {name}: {values['score']:.2f} ({values['count']})")


def run(args: argparse.Namespace) -> int:
    import torch

    from mmzoo.commands.infer import load_chat
    from mmzoo.eval.datasets import build_prompt, decode_image, get_dataset, place_images, read_tsv
    from mmzoo.eval.run import dist_env, evaluate, file_digest
    from mmzoo.infer import Request, SamplingConfig

    for option in ("model_dir", "dataset", "data", "out"):
        if getattr(args, option) is None:
            raise MmzooError(f"mmzoo eval needs --{option.replace('_', '-')} (or use `mmzoo eval score`)")
    dataset = get_dataset(args.dataset)
    questions = read_tsv(args.data, dataset)
    rank, world = dist_env()
    if world > 1 and args.device is None and torch.cuda.is_available():
        import os

        args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    chat = load_chat(args)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty)

    def generate(batch: Sequence) -> list[str]:
        requests = []
        for q in batch:
            prompt, images = place_images(build_prompt(q, dataset), q.images)
            requests.append(Request(prompt, [decode_image(image, q.where) for image in images]))
        return chat.answer(requests, sampling)

    log = (lambda line: print(line, file=sys.stderr)) if rank == 0 else (lambda line: None)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        run = {
            "model_dir": str(Path(args.model_dir).resolve()),
            "adapter": args.adapter and str(Path(args.adapter).resolve()),
            "data_sha256": file_digest(args.data),
            **{
                k: getattr(args, k)
                for k in (
                    "max_new_tokens",
                    "repetition_penalty",
                    "dtype",
                    "tokenizer",
                    "min_pixels",
                    "max_pixels",
                )
            },
        }
        summary = evaluate(
            questions, dataset, generate, args.out, batch_size=args.batch_size, run=run, log=log
        )
    if summary is not None:
        _print_summary(summary)
        print(f"results in {args.out}")
    return 0


def score(args: argparse.Namespace) -> int:
    from mmzoo.eval.datasets import get_dataset, read_tsv, score_question
    from mmzoo.eval.report import read_predictions, result_rows, summarize, write_reports
    from mmzoo.eval.run import merge, score_rows

    dataset = get_dataset(args.dataset)
    rows = read_predictions(args.predictions)
    if args.data:
        questions = read_tsv(args.data, dataset)
        given = {}
        for number, row in enumerate(rows, start=1):
            if "index" not in row or "prediction" not in row:
                raise MmzooError(f"{args.predictions} row {number}: needs columns 'index' and 'prediction'")
            given[str(row["index"]).strip()] = "" if row["prediction"] is None else str(row["prediction"])
        predictions = merge(questions, [given])
    else:
        if rows and "answer" not in rows[0]:
            raise MmzooError(f"{args.predictions}: no 'answer' column; pass the benchmark TSV with --data")
        questions, predictions = score_rows(rows, dataset, str(args.predictions))
    scored = [score_question(q, p, dataset) for q, p in zip(questions, predictions, strict=True)]
    summary = summarize(dataset, questions, scored)
    if args.out:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            write_reports(Path(args.out), dataset, result_rows(questions, predictions, scored), summary)
    _print_summary(summary)
    if args.out:
        print(f"results in {args.out}")
    return 0
