"""The ``mmzoo`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from mmzoo.errors import USER_ERRORS
from mmzoo.version import __version__


def _list_models(args: argparse.Namespace) -> int:
    from mmzoo.registry import all_models

    models = all_models(args.pattern)
    rows: list[dict[str, Any]] = [
        {
            "name": r.spec.name,
            "variants": list(r.spec.variants),
            "plugin": r.plugin.name,
            "distribution": r.plugin.distribution,
            "version": r.plugin.version,
            "hf_architectures": list(r.spec.hf_architectures),
            "parts": r.spec.parts(),
            "description": r.spec.description,
        }
        for r in models
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no models installed" if not args.pattern else f"no installed model matches '{args.pattern}'")
        return 0
    for row in rows:
        print(f"{row['name']}  ({row['distribution']} {row['version']})")
        if row["description"]:
            print(f"  {row['description']}")
        print(f"  variants: {', '.join(row['variants'])}")
        print(f"  reads:    {', '.join(row['hf_architectures']) or '-'}")
        for part, impl in row["parts"].items():
            print(f"  {part + ':':<17}{impl or '-'}")
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from mmzoo.plugins import get_manager

    manager = get_manager()
    manager.load()
    infos = sorted(manager.plugins.values(), key=lambda p: p.name) + manager.failures
    rows: list[dict[str, Any]] = [
        {
            "name": p.name,
            "distribution": p.distribution,
            "version": p.version,
            "module": p.module,
            "builtin": p.builtin,
            "hooks": p.hooks,
            "error": p.error,
        }
        for p in infos
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        kind = "built-in" if row["builtin"] else "plugin"
        status = f"FAILED: {row['error']}" if row["error"] else ", ".join(row["hooks"]) or "no hooks"
        print(f"{row['name']:<14}{row['distribution']} {row['version']} ({kind}, {row['module']})")
        print(f"  {status}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="mmzoo",
        description="Fine-tune, convert, run and evaluate vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"mmzoo {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("list-models", help="list installed model families, their variants and parts")
    p.add_argument("pattern", nargs="?", help="only names matching this glob or substring")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_list_models)

    p = sub.add_parser("plugins", help="list plugins, their distributions and the hooks they implement")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_plugins)

    from mmzoo.commands import convert, data, train

    train.add_parser(sub)
    data.add_parser(sub)
    convert.add_parser(sub)
    from mmzoo.commands import infer

    infer.add_parser(sub)
    from mmzoo.commands import eval as eval_command

    eval_command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mmzoo`` console script."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted after the command too, where users tend to add it
    args, extra = parser.parse_known_args([a for a in argv if a != "--debug"])
    args.debug = debug
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"mmzoo: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("mmzoo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
