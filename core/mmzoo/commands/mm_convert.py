"""The ``mm-convert`` console script: MindSpeed-MM's ``mm-convert <Converter> <op> --cfg.*`` form.

Scripts written for that form keep working; each call runs the same code as ``mmzoo convert``.
The converter class name picks the family (each declares its names in ``ModelSpec.mm_converters``).
As MindSpeed-MM does, hf_to_mm writes ``model_optim_rng.pt`` shards (mmzoo reads them as they
are); ``--cfg.common_model_config.enable_canonical_hf_struct true`` gives the canonical layout::

    mm-convert Qwen2_5_VLConverter hf_to_mm --cfg.mm_dir OUT --cfg.hf_config.hf_dir HF \\
        --cfg.parallel_config.llm_pp_layers [[12,16]] --cfg.parallel_config.vit_pp_layers [[32,0]] \\
        --cfg.parallel_config.tp_size 1
    mm-convert Qwen2_5_VLConverter mm_to_hf --cfg.save_hf_dir OUT --cfg.mm_dir MM --cfg.hf_config.hf_dir HF
    mm-convert Qwen2_5_VLConverter resplit --cfg.source_path MM --cfg.target_path OUT \\
        --cfg.target_parallel_config.llm_pp_layers [12,16] \\
        --cfg.target_parallel_config.vit_pp_layers [32,0] --cfg.target_parallel_config.tp_size 2
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

from mmzoo.errors import USER_ERRORS, MmzooError

OPS = ("hf_to_mm", "mm_to_hf", "resplit")
USAGE = "usage: mm-convert CONVERTER {hf_to_mm,mm_to_hf,resplit} --cfg.KEY VALUE ..."
# Keys other tools' scripts pass that mean nothing here (the model config is read from the
# checkpoints themselves).
IGNORED = ("trust_remote_code", "save_lora_to_hf", "common_model_config", "pp_vpp_layers", "vpp_size")
CANONICAL_KEY = "common_model_config.enable_canonical_hf_struct"


def parse_cfg(args: Sequence[str]) -> dict[str, str]:
    """``--cfg.a.b VALUE`` / ``--cfg.a.b=VALUE`` pairs -> ``{"a.b": "VALUE"}``."""
    cfg: dict[str, str] = {}
    items = list(args)
    while items:
        item = items.pop(0)
        if not item.startswith("--cfg."):
            raise MmzooError(f"unexpected argument '{item}'; {USAGE}")
        key, eq, value = item[len("--cfg.") :].partition("=")
        if not eq:
            if not items:
                raise MmzooError(f"--cfg.{key} needs a value")
            value = items.pop(0)
        cfg[key] = value
    return cfg


def layer_list(text: str | None, key: str) -> list[int] | None:
    """``[12,16]`` or ``[[12,16]]`` (one virtual-pipeline chunk) -> ``[12, 16]``."""
    if text is None:
        return None
    try:
        value: Any = json.loads(text)
    except json.JSONDecodeError:
        raise MmzooError(f"--cfg.{key}: cannot read '{text}'; write it like [12,16] or [[12,16]]") from None
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        if len(value) != 1:
            raise MmzooError(f"--cfg.{key}: {len(value)} virtual-pipeline chunks; only one is supported")
        value = value[0]
    if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
        raise MmzooError(f"--cfg.{key}: expected a list of layer counts, got '{text}'")
    return value


def _take(cfg: dict[str, str], *keys: str) -> str | None:
    found = None
    for key in keys:
        if key in cfg:
            found = cfg.pop(key)
    return found


def _required(cfg: dict[str, str], *keys: str) -> str:
    value = _take(cfg, *keys)
    if value is None:
        raise MmzooError(f"missing --cfg.{keys[0]}")
    return value


def _flag(cfg: dict[str, str], key: str) -> bool | None:
    value = _take(cfg, key)
    if value is None:
        return None
    if value.lower() not in ("true", "false"):
        raise MmzooError(f"--cfg.{key}: expected true or false, got '{value}'")
    return value.lower() == "true"


def _layout(cfg: dict[str, str]) -> str | None:
    """``--cfg.layout``, or the layout ``enable_canonical_hf_struct`` means; both must agree."""
    layout = _take(cfg, "layout")
    canonical = _flag(cfg, CANONICAL_KEY)
    implied = None if canonical is None else "canonical" if canonical else "fused"
    if layout and implied and layout != implied:
        raise MmzooError(f"--cfg.layout {layout} contradicts --cfg.{CANONICAL_KEY} {str(canonical).lower()}")
    return layout or implied


def _check_source_layout(mm_dir: str, template: str | None, layout: str) -> None:
    from mmzoo.checkpoint.dcp import dcp_iteration
    from mmzoo.checkpoint.mm import read_mm_meta

    # A DCP training checkpoint holds the tensors as the model does: the fused layout.
    held = "fused" if dcp_iteration(mm_dir) is not None else read_mm_meta(mm_dir, template)["layout"]
    if held != layout:
        raise MmzooError(
            f"{mm_dir} holds the {held} layout, but --cfg.{CANONICAL_KEY} says {layout}; "
            "drop the option (the layout is read from the checkpoint) or correct it"
        )


def _parallel(cfg: dict[str, str], prefix: str) -> dict[str, Any]:
    return {
        "tp": int(_take(cfg, f"{prefix}.tp_size") or 1),
        "llm_pp_layers": layer_list(_take(cfg, f"{prefix}.llm_pp_layers"), f"{prefix}.llm_pp_layers"),
        "vit_pp_layers": layer_list(_take(cfg, f"{prefix}.vit_pp_layers"), f"{prefix}.vit_pp_layers"),
    }


def run(argv: Sequence[str]) -> int:
    """Run one conversion from ``mm-convert`` arguments."""
    from mmzoo.checkpoint import conversion as convert
    from mmzoo.checkpoint.hub import resolve_model_dir
    from mmzoo.registry import model_for_converter

    if len(argv) < 2 or argv[1] not in OPS:
        raise MmzooError(USAGE)
    family = model_for_converter(argv[0]).name  # an unknown one is an error listing the installed
    cfg = parse_cfg(argv[2:])
    force = (_take(cfg, "force") or "false").lower() == "true"
    layout = _layout(cfg)
    weights_format = _take(cfg, "format")
    op = argv[1]
    if op == "hf_to_mm":
        call = partial(
            convert.hf_to_mm,
            _required(cfg, "hf_config.hf_dir", "hf_dir"),
            _required(cfg, "mm_dir"),
            model=family,
            layout=layout or "fused",
            weights_format=weights_format or "megatron",
            **_parallel(cfg, "parallel_config"),
        )
    elif op == "mm_to_hf":
        _parallel(cfg, "parallel_config")  # read from the checkpoint's shards instead
        mm_dir, template = _required(cfg, "mm_dir"), _take(cfg, "hf_config.hf_dir", "hf_dir")
        template = None if template is None else str(resolve_model_dir(template))
        if weights_format is not None:
            raise MmzooError("--cfg.format applies to hf_to_mm and resplit, not mm_to_hf")
        if layout is not None:
            _check_source_layout(mm_dir, template, layout)
        call = partial(convert.mm_to_hf, mm_dir, _required(cfg, "save_hf_dir"), template=template)
    else:
        _parallel(cfg, "source_parallel_config")  # read from the checkpoint's shards instead
        call = partial(
            convert.resplit,
            _required(cfg, "source_path", "source_dir"),
            _required(cfg, "target_path", "target_dir"),
            layout=layout,
            weights_format=weights_format,
            **_parallel(cfg, "target_parallel_config"),
        )
    unknown = [f"--cfg.{key}" for key in cfg if not key.startswith(IGNORED)]
    if unknown:
        raise MmzooError(f"unknown options for {op}: {', '.join(unknown)}")
    call(force=force)
    return 0


def _converters() -> str:
    from mmzoo.registry import all_models

    names = sorted((c, r.spec.name) for r in all_models() for c in r.spec.mm_converters)
    return ", ".join(f"{converter} ({model})" for converter, model in names) or "none installed"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mm-convert`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or "-h" in args or "--help" in args:
        examples = __doc__.split("\n\n", 1)[1].rstrip().replace("``", "").replace("::", ":")
        print(f"{USAGE}\n\n{examples}")
        print(
            "Extra keys: --cfg.force true (replace an existing output), --cfg.layout fused|canonical, "
            "--cfg.format megatron|safetensors (hf_to_mm default megatron, resplit default: the source's)."
        )
        print(f"Converters: {_converters()}")
        return 0
    try:
        return run(args)
    except USER_ERRORS as exc:
        print(f"mm-convert: error: {exc}", file=sys.stderr)
        return 2
