"""``mmzoo convert hf-to-mm | mm-to-hf | resplit``."""

from __future__ import annotations

import argparse
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mmzoo.errors import MmzooError

SOURCE_HELP = (
    "mm checkpoint root, iteration or shard directory; or the DCP checkpoint of a run on many "
    "ranks (its output or an iter_* directory)"
)


def parse_layers(text: str | None) -> list[int] | None:
    """``"12,16"`` or ``"[12,16]"`` -> ``[12, 16]``; ``None`` stays ``None``."""
    if text is None:
        return None
    cleaned = text.strip().strip("[]")
    try:
        return [int(x) for x in cleaned.split(",") if x.strip()]
    except ValueError:
        raise MmzooError(f"cannot read layer counts '{text}'; write them like 12,16") from None


def _parallel_args(
    p: argparse.ArgumentParser, layout_default: str | None, format_default: str | None
) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--llm-pp-layers", help="LLM layers per pipeline stage, e.g. 12,16 (default: one stage)")
    p.add_argument(
        "--vit-pp-layers", help="vision layers per pipeline stage, e.g. 32,0 (default: all on stage 0)"
    )
    p.add_argument(
        "--layout",
        choices=("fused", "canonical"),
        default=layout_default,
        help="fused: Megatron's fused qkv and [gate; up]; canonical: q/k/v and gate/up kept apart, "
        "as MindSpeed-MM's enable_canonical_hf_struct "
        f"(default: {layout_default or 'the source layout'})",
    )
    p.add_argument(
        "--format",
        dest="weights_format",
        choices=("safetensors", "megatron"),
        default=format_default,
        help="shard weights: model.safetensors, or megatron: MindSpeed-MM's model_optim_rng.pt "
        f"(default: {format_default or 'the source format'})",
    )
    p.add_argument("--force", action="store_true", help="replace the output directory if it exists")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mmzoo convert ...`` on the top-level subparsers."""
    convert = sub.add_parser("convert", help="convert checkpoints between HF and mm formats, or resplit them")
    convert_sub = convert.add_subparsers(dest="convert_command", metavar="COMMAND", required=True)

    p = convert_sub.add_parser("hf-to-mm", help="HF checkpoint -> mm checkpoint (tp/pp shards)")
    p.add_argument(
        "--hf-dir",
        required=True,
        help="HF checkpoint directory (config.json + safetensors) or Hub id org/name[@revision]",
    )
    p.add_argument("--mm-dir", required=True, help="mm checkpoint root to create")
    p.add_argument("--model", help="expected model family, e.g. qwen2_5_vl (default: from config.json)")
    _parallel_args(p, "fused", "safetensors")
    p.set_defaults(func=hf_to_mm)

    p = convert_sub.add_parser("mm-to-hf", help="mm (any tp/pp) or DCP checkpoint -> HF checkpoint")
    p.add_argument("--mm-dir", required=True, help=SOURCE_HELP)
    p.add_argument("--hf-dir", required=True, help="HF checkpoint directory to create")
    p.add_argument(
        "--hf-template",
        help="HF checkpoint directory or Hub id org/name[@revision] whose config, tokenizer, "
        "processor files and sharding to reuse (its config.json also describes an mm checkpoint "
        "without mm_meta.json, e.g. MindSpeed-MM's)",
    )
    p.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    p.set_defaults(func=mm_to_hf)

    p = convert_sub.add_parser("resplit", help="mm or DCP checkpoint -> mm checkpoint, another tp/pp split")
    p.add_argument("--src", required=True, help=SOURCE_HELP)
    p.add_argument("--dst", required=True, help="mm checkpoint root to create")
    _parallel_args(p, None, None)
    p.add_argument(
        "--hf-template",
        help="HF checkpoint directory or Hub id org/name[@revision] whose config.json describes a "
        "source without mm_meta.json",
    )
    p.set_defaults(func=resplit)


@contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so the temporary output is removed on the way out."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _split(args: argparse.Namespace) -> dict:
    """The target split options shared by hf-to-mm and resplit."""
    return {
        "tp": args.tp,
        "vit_pp_layers": parse_layers(args.vit_pp_layers),
        "llm_pp_layers": parse_layers(args.llm_pp_layers),
        "layout": args.layout,
        "weights_format": args.weights_format,
        "force": args.force,
    }


def hf_to_mm(args: argparse.Namespace) -> int:
    from mmzoo.checkpoint.conversion import hf_to_mm as convert

    with _terminate_cleanly():
        convert(args.hf_dir, args.mm_dir, model=args.model, **_split(args))
    return 0


def mm_to_hf(args: argparse.Namespace) -> int:
    from mmzoo.checkpoint.conversion import mm_to_hf as convert

    with _terminate_cleanly():
        convert(args.mm_dir, args.hf_dir, template=args.hf_template, force=args.force)
    return 0


def resplit(args: argparse.Namespace) -> int:
    from mmzoo.checkpoint.conversion import resplit as convert

    with _terminate_cleanly():
        convert(args.src, args.dst, template=args.hf_template, **_split(args))
    return 0
