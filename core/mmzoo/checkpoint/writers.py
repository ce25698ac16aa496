"""Writing mm shards and HF safetensors files out of a :class:`~mmzoo.checkpoint.sources.TensorSource`.

Every safetensors file's header is computed from the source's headers first; tensors are then
produced one at a time, split, and appended: memory holds one full tensor and its slices.
MindSpeed-MM's ``model_optim_rng.pt`` shards cannot be streamed: each is built in memory.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmzoo.checkpoint.megatron_pt import MEGATRON_WEIGHTS, compact, write_model_state
from mmzoo.checkpoint.safetensors_stream import StreamingWriter
from mmzoo.checkpoint.sources import META, WEIGHTS, TensorSource
from mmzoo.convert.mapping import WeightMapping
from mmzoo.convert.parallel import Entry, ParallelLayout, split_tp
from mmzoo.errors import MmzooError

# Shard weight files: mmzoo's streamed safetensors, or MindSpeed-MM's model_optim_rng.pt.
SAFETENSORS, MEGATRON = "safetensors", "megatron"
WEIGHTS_FORMATS = (SAFETENSORS, MEGATRON)

Report = Callable[[str], None]


def stderr_report(line: str) -> None:
    """Print a progress line to stderr."""
    print(line, file=sys.stderr, flush=True)


@dataclass
class Totals:
    """What a conversion wrote."""

    tensors: int = 0
    bytes: int = 0
    files: int = 0
    started: float = field(default_factory=time.perf_counter)

    def summary(self, out: Path) -> str:
        seconds = time.perf_counter() - self.started
        return (
            f"wrote {self.tensors} tensors, {self.bytes / 2**30:.2f} GiB in {self.files} files "
            f"to {out} in {seconds:.1f} s"
        )


class _LastTensor:
    """The most recent full tensor and its split (consecutive entries share them)."""

    def __init__(self, source: TensorSource) -> None:
        self.source = source
        self.name: str | None = None
        self.tensor: torch.Tensor | None = None
        self.parts: list[torch.Tensor] | None = None

    def get(self, entry: Entry) -> torch.Tensor:
        if entry.source != self.name:
            self.name, self.tensor, self.parts = entry.source, self.source.get(entry.source), None
        assert self.tensor is not None
        if entry.part is None:
            return self.tensor
        if self.parts is None:
            self.parts = entry.op.split(self.tensor)
        return self.parts[entry.part]


def _entry_spec(entry: Entry, source: TensorSource, layout: ParallelLayout):
    dtype, shape = source.spec(entry.source)
    stored = entry.select(torch.empty(shape, dtype=dtype, device="meta"))
    return [(entry.name, s.dtype, tuple(s.shape)) for s in split_tp(stored, entry.kind, layout.tp)]


def write_mm_shards(
    iteration: Path,
    source: TensorSource,
    mapping: WeightMapping,
    layout: ParallelLayout,
    meta: dict[str, Any],
    totals: Totals,
    report: Report = stderr_report,
    weights_format: str = SAFETENSORS,
) -> None:
    """Write every ``mp_rank_*`` shard of ``layout`` under ``iteration`` (which must exist).

    ``weights_format`` ``"safetensors"``: a stage's tp shards are streamed together, so each full
    tensor is read once. ``"megatron"``: MindSpeed-MM's ``model_optim_rng.pt``, built one shard
    at a time in memory (``torch.save`` cannot stream), each full tensor read once per tp rank.
    """
    from mmzoo.checkpoint.mm import write_json

    if weights_format not in WEIGHTS_FORMATS:
        raise MmzooError(
            f"unknown weights format '{weights_format}'; use one of {', '.join(WEIGHTS_FORMATS)}"
        )
    n_files = layout.tp * layout.pp
    for stage in range(layout.pp):
        started = time.perf_counter()
        entries = layout.stage_entries(mapping, stage)
        shards = [iteration / layout.shard_name(t, stage) for t in range(layout.tp)]
        for shard in shards:
            shard.mkdir()
        if weights_format == SAFETENSORS:
            sizes = _stream_stage(shards, entries, source, layout)
        else:
            sizes = [_write_megatron_shard(s, t, entries, source, layout) for t, s in enumerate(shards)]
        for t, (shard, size) in enumerate(zip(shards, sizes, strict=True)):
            write_json(shard / META, _shard_meta(meta, layout, t, stage))
            totals.tensors += len(entries)
            totals.bytes += size
            totals.files += 1
            report(
                f"[{totals.files}/{n_files}] {shard.name}: {len(entries)} tensors, "
                f"{size / 2**20:.1f} MiB, {time.perf_counter() - started:.1f} s"
            )


def _stream_stage(
    shards: list[Path], entries: list[Entry], source: TensorSource, layout: ParallelLayout
) -> list[int]:
    """Stream one stage's tp shards as safetensors files; returns their sizes in bytes."""
    specs = [_entry_spec(e, source, layout) for e in entries]
    writers = [StreamingWriter(shard / WEIGHTS, [s[t] for s in specs]) for t, shard in enumerate(shards)]
    last = _LastTensor(source)
    try:
        for entry in entries:
            for writer, piece in zip(writers, split_tp(last.get(entry), entry.kind, layout.tp), strict=True):
                writer.write(entry.name, piece)
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    for writer in writers:
        writer.close()
    return [writer.total_bytes for writer in writers]


def _write_megatron_shard(
    shard: Path, tp_rank: int, entries: list[Entry], source: TensorSource, layout: ParallelLayout
) -> int:
    """Write tp rank ``tp_rank``'s ``model_optim_rng.pt``; returns the bytes of tensor data."""
    last = _LastTensor(source)
    state = {e.name: compact(split_tp(last.get(e), e.kind, layout.tp)[tp_rank]) for e in entries}
    return write_model_state(shard / MEGATRON_WEIGHTS, state)


def _shard_meta(meta: dict[str, Any], layout: ParallelLayout, tp_rank: int, pp_rank: int) -> dict[str, Any]:
    return {
        **meta,
        "tp": layout.tp,
        "pp": layout.pp,
        "tp_rank": tp_rank,
        "pp_rank": pp_rank,
        "vit_pp_layers": list(layout.vit_pp_layers),
        "llm_pp_layers": list(layout.llm_pp_layers),
        "vit_layers": list(layout.ranges("vision")[pp_rank]),
        "llm_layers": list(layout.ranges("text")[pp_rank]),
        "layout": layout.layout,
    }


def write_hf_files(
    out: Path,
    source: TensorSource,
    mapping: WeightMapping,
    files: dict[str, list[str]],
    rename: dict[str, str],
    totals: Totals,
    report: Report = stderr_report,
) -> dict[str, str]:
    """Write HF safetensors files: ``files`` maps a file name to the canonical HF names it holds.

    Args:
        rename: canonical HF name -> the name written (the original checkpoint's key layout).

    Returns:
        The weight map (written name -> file).
    """
    rules = {h: r for r in mapping.rules if r.mm is not None for h in r.hf}
    weight_map: dict[str, str] = {}
    for i, (file, names) in enumerate(files.items(), start=1):
        started = time.perf_counter()
        meta_parts: dict[str, torch.Tensor] = {}
        for name in names:
            rule = rules[name]
            if name not in meta_parts:
                dtype, shape = source.spec(rule.mm)  # type: ignore[arg-type]
                full = torch.empty(shape, dtype=dtype, device="meta")
                meta_parts.update(zip(rule.hf, rule.op.split(full), strict=True))
        specs = [(rename.get(n, n), meta_parts[n].dtype, tuple(meta_parts[n].shape)) for n in names]
        with StreamingWriter(out / file, specs) as writer:
            cached: dict[str, torch.Tensor] = {}
            for name in names:
                if name not in cached:
                    rule = rules[name]
                    cached = dict(zip(rule.hf, rule.op.split(source.get(rule.mm)), strict=True))  # type: ignore[arg-type]
                writer.write(rename.get(name, name), cached[name])
        weight_map.update(dict.fromkeys((rename.get(n, n) for n in names), file))
        totals.tensors += len(names)
        totals.bytes += writer.total_bytes
        totals.files += 1
        report(
            f"[{i}/{len(files)}] {file}: {len(names)} tensors, {writer.total_bytes / 2**20:.1f} MiB, "
            f"{time.perf_counter() - started:.1f} s"
        )
    return weight_map
