"""``mmzoo data convert-llava`` and ``mmzoo data inspect``."""

from __future__ import annotations

import argparse
import sys
from itertools import groupby

import mmzoo
from mmzoo.commands.infer import add_media_arg, key_values
from mmzoo.config import DataConfig
from mmzoo.data.records import SkipReport, stream_records
from mmzoo.errors import MmzooError
from mmzoo.loss import IGNORE_INDEX


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mmzoo data ...`` on the top-level subparsers."""
    data = sub.add_parser("data", help="prepare and inspect training data")
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    p = data_sub.add_parser(
        "convert-llava", help="convert a LLaVA JSON file to mmzoo's chat-form JSONL or parquet"
    )
    p.add_argument("--src", required=True, help="LLaVA JSON/JSONL file (e.g. llava_instruct_150k.json)")
    p.add_argument("--image-dir", required=True, help="directory the records' image paths are relative to")
    p.add_argument(
        "--out",
        required=True,
        help="chat-form JSONL to write (media paths become absolute), or a .parquet file (media embedded)",
    )
    p.set_defaults(func=convert_llava)

    p = data_sub.add_parser(
        "inspect", help="show one prepared sample: rendered text, trained spans, media grids"
    )
    p.add_argument("--model", required=True, help="model family, e.g. qwen2_5_vl (see `mmzoo list-models`)")
    p.add_argument(
        "--data", required=True, help="JSON/JSONL or parquet file(s), save_to_disk dir(s), comma-separated"
    )
    p.add_argument(
        "--index",
        type=int,
        default=0,
        help="which usable record to show, counted as training does (default 0)",
    )
    p.add_argument(
        "--variant", help="variant whose config sets token ids and media sizes (default: the family's first)"
    )
    p.add_argument(
        "--tokenizer",
        help="checkpoint directory with the tokenizer, or Hub id org/name[@revision] (default: the "
        "family's own)",
    )
    p.add_argument("--dataset-dir", help="base of relative media paths (default: the data file's directory)")
    p.add_argument("--seq-length", type=int, default=4096, help="truncation length (default 4096)")
    p.add_argument("--train-on-prompt", action="store_true", help="train on prompt tokens too")
    p.add_argument("--mask-history", action="store_true", help="train only the last assistant turn")
    p.add_argument("--min-pixels", type=int, help="least resized image area")
    p.add_argument("--max-pixels", type=int, help="largest resized image area")
    add_media_arg(p)
    p.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto", help="colour trained spans"
    )
    p.set_defaults(func=inspect)


def convert_llava(args: argparse.Namespace) -> int:
    from mmzoo.data.llava import convert_llava as convert

    report = SkipReport()
    counts = convert(args.src, args.image_dir, args.out, report=report)
    for line in report.summary_lines():
        print(line, file=sys.stderr)
    print(
        f"wrote {counts['written']} records to {args.out} ({counts['text_only']} text-only), "
        f"skipped {counts['skipped']} of {counts['read']}"
    )
    return 0


def _tokenizer(spec: mmzoo.ModelSpec, path: str | None):
    from mmzoo.checkpoint.hub import resolve_model_dir
    from mmzoo.data.tokenizer import load_tokenizer

    if path:
        return load_tokenizer(resolve_model_dir(path))
    if spec.default_tokenizer is None:
        raise MmzooError(f"model '{spec.name}' has no built-in tokenizer; pass --tokenizer CHECKPOINT_DIR")
    return spec.default_tokenizer()


def render(tokenizer, ids: list[int], labels: list[int], color: bool) -> str:
    """Decoded text with trained spans marked (green, or between « »); media pad runs collapsed."""
    out = []
    start, end = ("\033[32m", "\033[0m") if color else ("«", "»")
    position = 0
    for trained, group in groupby(zip(ids, labels, strict=True), key=lambda pair: pair[1] != IGNORE_INDEX):
        tokens = [token for token, _ in group]
        position += len(tokens)
        pieces = []
        for token, run in groupby(tokens):
            count = len(list(run))
            text = tokenizer.decode([token] * (1 if count > 3 else count))
            pieces.append(f"{text}x{count}" if count > 3 else text)
        text = "".join(pieces)
        out.append(f"{start}{text}{end}" if trained else text)
    return "".join(out)


def inspect(args: argparse.Namespace) -> int:
    from mmzoo.data.pipeline import Preprocessor

    spec = mmzoo.get_model(args.model)
    config = spec.variant(args.variant or next(iter(spec.variants)))
    tokenizer = _tokenizer(spec, args.tokenizer)
    media = {
        k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v is not None
    }
    media.update(key_values(args.media))
    data = DataConfig(
        data=args.data,
        dataset_dir=args.dataset_dir,
        seq_length=args.seq_length,
        train_on_prompt=args.train_on_prompt,
        mask_history=args.mask_history,
        media=media,
    )
    if args.index < 0:
        raise MmzooError(f"--index {args.index} is negative; samples count from 0")
    report = SkipReport()
    records = stream_records(args.data, args.dataset_dir, report=report)  # one at a time
    preprocessor = Preprocessor(spec, config, tokenizer, data)
    # Every record is prepared, as training does: samples are numbered and counted as training sees
    # them, a record that cannot be prepared is skipped (with its reason), never shown or counted.
    shown, usable = None, 0
    for candidate in records:
        prepared = preprocessor.prepare(candidate, report)
        if prepared is not None:
            if usable == args.index:
                shown = candidate, prepared
            usable += 1
    for line in report.summary_lines():
        print(line, file=sys.stderr)
    if shown is None:
        skipped = f" ({report.total} skipped, reasons above)" if report.total else ""
        raise MmzooError(
            f"--index {args.index} is out of range: {args.data} has {usable} usable records{skipped}"
        )
    record, prepared = shown
    ids, labels = prepared.input_ids.tolist(), prepared.labels.tolist()
    trained = sum(label != IGNORE_INDEX for label in labels)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(f"sample {args.index} of {usable} ({record.source})")
    print(f"tokens: {len(ids)}, trained: {trained}, positions: {tuple(prepared.position_ids.shape)}")
    seen = {"image": 0, "video": 0}
    for item in prepared.media:
        frames = item.frames
        size = "frames (N, H, W) = ({}, {}, {})".format(*frames.shape[:3])
        extras = "".join(f", {k} {v:g}" for k, v in item.info.items())
        tokens = preprocessor.processor.num_tokens(item)
        print(f"{item.kind} {seen[item.kind]}: {size}{extras} -> {tokens} tokens")
        seen[item.kind] += 1
    print("-" * 60)
    print(render(tokenizer, ids, labels, color))
    return 0
