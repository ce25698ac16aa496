"""``mmzoo train``: fine-tune a model; with no arguments, the embedded CPU demo."""

from __future__ import annotations

import argparse

from mmzoo.config import DEFAULT_MODEL, dump, load_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mmzoo train`` on the top-level subparsers."""
    p = sub.add_parser(
        "train",
        help="fine-tune a model (no arguments: a tiny model on the bundled demo data, on CPU)",
        description=(
            "Fine-tune a model. Without --config it runs the embedded default: the tiny variant on the "
            "bundled demo data. Any config key can be overridden as --section.key VALUE, e.g. "
            "--train.lr 2e-5 --data.data a.jsonl,b.jsonl --model.freeze '[vision, projector]'."
        ),
        allow_abbrev=False,
    )
    p.add_argument("--model", help=f"model family (model.name; default {DEFAULT_MODEL})")
    p.add_argument("--config", help="YAML config file (see examples/configs/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run output_dir holds (checkpoints, metrics) and start over",
    )
    p.add_argument("--save-hf", metavar="DIR", help="also export the final model as a HF checkpoint")
    p.add_argument(
        "--save-peft", metavar="DIR", help="with model.lora: also export the adapters as a PEFT adapter"
    )
    p.set_defaults(func=run, accepts_overrides=True)


def run(args: argparse.Namespace) -> int:
    from mmzoo.train.loop import train

    extra: dict = {}
    if args.model:
        extra["model"] = {"name": args.model}
    exports = {"save_hf": args.save_hf, "save_peft": args.save_peft}
    if any(exports.values()):
        extra["train"] = {key: value for key, value in exports.items() if value}
    config = load_config(args.config, args.overrides, extra)
    if args.print_config:
        print(dump(config), end="")
        return 0
    train(config, resume=args.resume, overwrite=args.overwrite)
    return 0
