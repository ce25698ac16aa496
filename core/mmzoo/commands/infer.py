"""``mmzoo infer``: answer one prompt (streamed) or a JSONL file of prompts in batches."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mmzoo.errors import MmzooError


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options shared by ``infer`` and ``eval``: checkpoint, tokenizer, dtype, device, media sizes."""
    p.add_argument(
        "--model-dir",
        required=True,
        help="Hugging Face checkpoint directory, mm checkpoint, or Hub id org/name[@revision]",
    )
    p.add_argument(
        "--adapter",
        metavar="DIR",
        help="a PEFT LoRA adapter directory trained on --model-dir's Hugging Face model (needs mmzoo[lora])",
    )
    p.add_argument(
        "--tokenizer",
        help="directory or Hub id with the tokenizer (default: the checkpoint's, else the family's)",
    )
    p.add_argument(
        "--dtype", default="auto", help="float32, bfloat16, float16 or auto (default: the checkpoint's)"
    )
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    # Media options left out come from the checkpoint's training (media.json), else the family's defaults.
    p.add_argument("--min-pixels", type=int, help="least resized image area (default: as trained)")
    p.add_argument("--max-pixels", type=int, help="largest resized image/frame area (default: as trained)")
    p.add_argument("--fps", type=float, help="video frames sampled per second (default: as trained)")
    p.add_argument("--video-maxlen", type=int, help="most frames sampled from a video (default: as trained)")
    add_media_arg(p)
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mmzoo infer`` on the top-level subparsers."""
    p = sub.add_parser(
        "infer", help="generate answers for a prompt with images/videos, or a JSONL of prompts"
    )
    add_model_args(p)
    p.add_argument("--prompt", help="the user message")
    p.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    p.add_argument("--video", action="append", default=[], help="a video file (repeatable)")
    p.add_argument("--system", help="system prompt (default: the template's)")
    p.add_argument(
        "--input",
        help='JSONL of requests: {"prompt": ..., "images": [...], "videos": [...], "system": ...}; '
        "media paths relative to the file",
    )
    p.add_argument("--output", help='JSONL to write with --input: each request plus its "response"')
    p.add_argument("--max-new-tokens", type=int, default=512, help="most generated tokens (default 512)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    p.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="penalty on repeated tokens (1.0: off)"
    )
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--no-stream", action="store_true", help="print the answer once complete")
    p.set_defaults(func=run)


def load_chat(args: argparse.Namespace) -> Any:
    """The model, tokenizer and media options the arguments name, as a :class:`mmzoo.infer.Chat`.

    Hub ids in ``--model-dir`` and ``--tokenizer`` are replaced in ``args`` by their snapshot
    directories in the Hub cache.
    """
    import torch

    import mmzoo
    from mmzoo.checkpoint.hub import resolve_model_dir
    from mmzoo.data.tokenizer import load_tokenizer
    from mmzoo.infer import Chat

    args.model_dir = str(resolve_model_dir(args.model_dir))
    if args.tokenizer:
        args.tokenizer = str(resolve_model_dir(args.tokenizer))

    model = mmzoo.load_model(args.model_dir, dtype=args.dtype)
    if args.adapter:
        from mmzoo.lora.peft_format import import_adapter

        import_adapter(model, args.adapter)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    tokenizer = None
    for candidate in (args.tokenizer, args.model_dir, _hf_assets(Path(args.model_dir))):
        if candidate and (args.tokenizer or _has_tokenizer(Path(candidate))):
            tokenizer = load_tokenizer(candidate)
            break
    if tokenizer is None:
        print(
            f"mmzoo: no tokenizer files in {args.model_dir}; using the {model.name} default", file=sys.stderr
        )
    return Chat(model, tokenizer, **media_options(args))


def media_options(args: argparse.Namespace) -> dict[str, Any]:
    """Media processor options: the ones the checkpoint was trained with, then the arguments."""
    from mmzoo.train.checkpoint import trained_media

    given = {
        key: value
        for key in ("min_pixels", "max_pixels", "fps", "video_maxlen")
        if (value := getattr(args, key, None)) is not None
    }
    given.update(key_values(getattr(args, "media", [])))
    if "max_pixels" in given:  # one knob for both: frames are images too
        given.setdefault("video_max_pixels", given["max_pixels"])
        given.setdefault("video_min_pixels", min(given["max_pixels"], given.get("min_pixels", 128 * 28 * 28)))
    trained = {k: v for k, v in trained_media(args.model_dir).items() if k not in given}
    if trained:
        settings = ", ".join(f"{k}={v}" for k, v in trained.items())
        print(f"mmzoo: media as in training: {settings}", file=sys.stderr)
    return {**trained, **given}


def add_media_arg(p: argparse.ArgumentParser) -> None:
    """``--media KEY=VALUE`` (repeatable): any option of the family's media processor."""
    p.add_argument(
        "--media",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any option of the family's media processor, e.g. max_tiles=6 for InternVL3 (repeatable)",
    )


def key_values(items: list[str]) -> dict[str, Any]:
    """``--media KEY=VALUE`` options, each value read as YAML (``6`` an int, ``false`` a bool)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise MmzooError(f"--media {item}: write it as KEY=VALUE, e.g. --media max_tiles=6")
        out[key] = yaml.safe_load(value)
    return out


def _hf_assets(path: Path) -> Path | None:
    """The ``hf_assets/`` folder (HF config and tokenizer files) of an mm checkpoint, if any."""
    from mmzoo.checkpoint.conversion import HF_ASSETS
    from mmzoo.checkpoint.mm import is_mm_checkpoint, resolve_iteration

    return resolve_iteration(path) / HF_ASSETS if is_mm_checkpoint(path) else None


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer.model"))


def _sampling(args: argparse.Namespace) -> Any:
    from mmzoo.infer import SamplingConfig

    return SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def read_requests(path: Path) -> list[dict[str, Any]]:
    """JSONL requests, each checked: a string ``prompt`` and lists of media paths."""
    if not path.is_file():
        raise MmzooError(f"{path}: no such file")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MmzooError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise MmzooError(f'{path}:{number}: a request needs a string "prompt"')
        for key in ("images", "videos"):
            value = row.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise MmzooError(f'{path}:{number}: "{key}" must be a list of file paths')
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    from mmzoo.infer import Request

    sampling = _sampling(args)
    if args.input:
        if not args.output:
            raise MmzooError("--input needs --output (the JSONL to write)")
        if args.prompt:
            raise MmzooError("give either --prompt or --input, not both")
        path = Path(args.input)
        rows = read_requests(path)
        chat = load_chat(args)
        base = path.parent
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as f:
            for start in range(0, len(rows), args.batch_size):
                chunk = rows[start : start + args.batch_size]
                requests = [
                    Request(
                        r["prompt"],
                        [base / p for p in r.get("images", [])],
                        [base / p for p in r.get("videos", [])],
                        r.get("system"),
                    )
                    for r in chunk
                ]
                for row, answer in zip(chunk, chat.answer(requests, sampling), strict=True):
                    f.write(json.dumps({**row, "response": answer}, ensure_ascii=False) + "\n")
                f.flush()
                print(f"{min(start + args.batch_size, len(rows))}/{len(rows)} answered", file=sys.stderr)
        print(f"wrote {len(rows)} responses to {out}")
        return 0
    if args.prompt is None:
        raise MmzooError(
            "give --prompt TEXT (with --image/--video) or --input FILE.jsonl --output FILE.jsonl"
        )
    chat = load_chat(args)
    request = Request(args.prompt, args.image, args.video, args.system)
    if args.no_stream:
        print(chat.answer([request], sampling)[0])
        return 0

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    chat.answer([request], sampling, on_text=emit)
    sys.stdout.write("\n")
    return 0
