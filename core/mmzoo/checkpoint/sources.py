"""Full (unsplit, fused) mm tensors read one at a time from an HF or an mm checkpoint.

Both sources give the same interface: ``names``, ``spec(name)`` (dtype and shape from file
headers, no data read) and ``get(name)``. Open files are dropped after every tensor so the
pages their memory maps touched do not pile up: peak memory stays near the largest tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from mmzoo.checkpoint.hf import HFCheckpoint
from mmzoo.checkpoint.megatron_pt import MEGATRON_WEIGHTS, read_model_state
from mmzoo.checkpoint.safetensors_stream import DTYPE_NAMES
from mmzoo.convert.mapping import COLUMN, GLU, REPLICATE, ROW, Rule, WeightMapping
from mmzoo.convert.parallel import Entry, ParallelLayout, merge_tp
from mmzoo.errors import MmzooError
from mmzoo.files import SafetensorsFile

META = "mm_meta.json"
# Of mm_meta.json and the names beside it: 1 = mmzoo's own names (read only), 2 = MindSpeed-MM's.
FORMAT_VERSION = 2
WEIGHTS = "model.safetensors"
# HF side files an mm checkpoint keeps (config, tokenizer, processor, the original weight map),
# so mm -> HF needs no template.
HF_ASSETS = "hf_assets"
_SHARD = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?")
TensorSpec = tuple[torch.dtype, tuple[int, ...]]


class TensorSource(Protocol):
    """Full mm tensors by name."""

    names: list[str]

    def spec(self, name: str) -> TensorSpec: ...

    def get(self, name: str) -> torch.Tensor: ...


def first_dtype(source: TensorSource) -> torch.dtype:
    """The dtype of the source's first tensor (float32 when it has none): a checkpoint's own dtype."""
    return source.spec(source.names[0])[0] if source.names else torch.float32


def _meta_tensor(spec: TensorSpec) -> torch.Tensor:
    return torch.empty(spec[1], dtype=spec[0], device="meta")


def listing(names: list[str]) -> str:
    """The first names of a list, and how many there are when more."""
    return ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")


class HFSource:
    """mm tensors made from an HF checkpoint through the family's mapping.

    Args:
        checkpoint: the HF checkpoint.
        mapping: the family's mapping for its config.
    """

    def __init__(self, checkpoint: HFCheckpoint, mapping: WeightMapping) -> None:
        self.checkpoint = checkpoint
        self.mapping = mapping
        self.original = {mapping.canonical_hf_name(k): k for k in checkpoint.keys()}
        available = set(self.original)
        self.rules = {
            r.mm: r
            for r in mapping.rules
            if r.mm is not None and (not r.optional or all(n in available for n in r.hf))
        }
        self.names = list(self.rules)

    def check_names(self) -> None:
        """Missing or unexpected HF names, listed in a one-line MmzooError."""
        missing, unexpected = self.mapping.check_hf_names(set(self.original))
        where = self.checkpoint.path
        if missing:
            raise MmzooError(f"{where}: {len(missing)} weights missing: {listing(sorted(missing))}")
        if unexpected:
            raise MmzooError(f"{where}: {len(unexpected)} unexpected weights: {listing(unexpected)}")

    def hf_specs(self, rule: Rule) -> list[TensorSpec]:
        out = []
        for name in rule.hf:
            dtype, shape = self.checkpoint.info(self.original[name])
            out.append((DTYPE_NAMES[dtype], shape))
        return out

    def check_shapes(self, expected: dict[str, torch.Tensor]) -> None:
        """Every HF tensor against the shapes the config implies (``expected``: meta mm tensors)."""
        for mm, rule in self.rules.items():
            wanted = rule.op.split(expected[mm])
            for name, spec, want in zip(rule.hf, self.hf_specs(rule), wanted, strict=True):
                if spec[1] != tuple(want.shape):
                    raise MmzooError(
                        f"{self.checkpoint.path}: shape mismatch for {self.original[name]}: checkpoint "
                        f"gives {spec[1]}, config.json implies {tuple(want.shape)}"
                    )
                if spec[0] != self.hf_specs(rule)[0][0]:
                    raise MmzooError(f"{self.checkpoint.path}: {rule.hf} mix dtypes; they cannot be fused")
        self.checkpoint.close()

    def spec(self, name: str) -> TensorSpec:
        rule = self.rules[name]
        merged = rule.op.merge([_meta_tensor(s) for s in self.hf_specs(rule)])
        return merged.dtype, tuple(merged.shape)

    def get(self, name: str) -> torch.Tensor:
        rule = self.rules[name]
        try:
            return rule.op.merge([self.checkpoint.get(self.original[n]) for n in rule.hf])
        finally:
            self.checkpoint.close()


def weights_file(shard: Path) -> Path:
    """A shard's weights: ``model.safetensors`` (mmzoo's default) or MindSpeed-MM's
    ``model_optim_rng.pt``; neither, or both, is a one-line MmzooError."""
    found = [shard / name for name in (WEIGHTS, MEGATRON_WEIGHTS) if (shard / name).is_file()]
    if len(found) == 2:
        raise MmzooError(f"{shard}: holds both {WEIGHTS} and {MEGATRON_WEIGHTS}; remove the one not meant")
    if not found:
        raise MmzooError(f"{shard}: no {WEIGHTS} or {MEGATRON_WEIGHTS}; the checkpoint is incomplete")
    return found[0]


class ShardWeights:
    """One shard's weights file, read one tensor at a time (safetensors or torch ``.pt``)."""

    def __init__(self, shard: Path) -> None:
        self.file = weights_file(shard)
        self._safetensors = SafetensorsFile(self.file) if self.file.name == WEIGHTS else None
        self._state = read_model_state(self.file) if self._safetensors is None else {}

    def keys(self) -> set[str]:
        return set(self._safetensors.keys() if self._safetensors is not None else self._state)

    def spec(self, name: str) -> TensorSpec:
        if self._safetensors is not None:
            info = self._safetensors.get_slice(name)
            return DTYPE_NAMES[info.get_dtype()], tuple(info.get_shape())
        return self._state[name].dtype, tuple(self._state[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self._safetensors.get_tensor(name) if self._safetensors is not None else self._state[name]


def shard_dirs(iteration: Path) -> list[Path]:
    """The ``mp_rank_*`` directories of an iteration directory, sorted."""
    return sorted(p for p in iteration.iterdir() if p.is_dir() and _SHARD.fullmatch(p.name))


def shard_ranks(shard: Path) -> tuple[int, int]:
    """``(tp_rank, pp_rank)`` from a ``mp_rank_TT`` / ``mp_rank_TT_PPP`` directory name."""
    match = _SHARD.fullmatch(shard.name)
    assert match is not None
    return int(match.group(1)), int(match.group(2) or 0)


def layout_of(meta: dict[str, Any]) -> ParallelLayout:
    """The :class:`ParallelLayout` an ``mm_meta.json`` describes (format 1 names are legacy)."""
    return ParallelLayout(
        int(meta["tp"]),
        tuple(meta["vit_pp_layers"]),
        tuple(meta["llm_pp_layers"]),
        meta["layout"],
        legacy=int(meta["format_version"]) < 2,
    )


REOPEN_BYTES = 512 << 20
# The dimension each tensor-parallel kind splits (None: every rank holds all of it).
TP_SLICE_DIMS: dict[str, int | None] = {COLUMN: 0, GLU: 0, ROW: 1, REPLICATE: None}


@dataclass(frozen=True)
class TpSlice:
    """A tensor stored per tensor-parallel rank: the dimension it is split along in equal blocks
    (``None``: whole on every rank), whether it is a gated MLP's ``[gate; up]`` (rank r stores
    ``[gate_r; up_r]``: a block of the per-rank row order, not of ``[gate; up]``), and
    ``read(rank)``, that rank's slice from its shard alone."""

    dim: int | None
    glu: bool
    read: Callable[[int], torch.Tensor]


@dataclass
class _Located:
    stage: int
    entry: Entry


class MMSource:
    """Full mm tensors merged from the shards of one mm iteration directory (any tp, pp, layout,
    safetensors or MindSpeed-MM's ``.pt``).

    Args:
        iteration: an ``iter_*``/``release`` directory.
        meta: its first shard's ``mm_meta.json`` (or the meta inferred for it).
        mapping: the family's mapping for the config in ``meta``.
    """

    def __init__(self, iteration: Path, meta: dict[str, Any], mapping: WeightMapping) -> None:
        self.iteration = iteration
        self.layout = layout_of(meta)
        self.mapping = mapping
        self.rules = {r.mm: r for r in mapping.rules if r.mm is not None}
        self.names = list(self.rules)
        self._located: dict[str, list[_Located]] = {}
        # Open files are reused (headers parsed once) but dropped after every 512 MiB read: their
        # memory maps would otherwise keep every page read resident.
        self._handles: dict[Path, ShardWeights] = {}
        self._read_since_reopen = 0
        for stage in range(self.layout.pp):
            for entry in self.layout.stage_entries(mapping, stage):
                if not entry.copy:
                    self._located.setdefault(entry.source, []).append(_Located(stage, entry))

    def shard(self, tp_rank: int, pp_rank: int) -> Path:
        return self.iteration / self.layout.shard_name(tp_rank, pp_rank)

    def _open(self, shard: Path) -> ShardWeights:
        if self._read_since_reopen > REOPEN_BYTES:
            self._handles.clear()
            self._read_since_reopen = 0
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = ShardWeights(shard)
        return handle

    def check(self) -> None:
        """Every shard present, holding exactly the names and shapes its stage should."""
        for pp_rank, tp_rank in self.layout.shards():
            shard = self.shard(tp_rank, pp_rank)
            if not shard.is_dir():
                raise MmzooError(
                    f"{shard}: missing; a tp={self.layout.tp} pp={self.layout.pp} checkpoint needs it"
                )
            weights = self._open(shard)
            want = {e.name for e in self.layout.stage_entries(self.mapping, pp_rank)}
            have = weights.keys()
            missing, unexpected = sorted(want - have), sorted(have - want)
            if missing:
                raise MmzooError(f"{weights.file}: {len(missing)} weights missing: {listing(missing)}")
            if unexpected:
                raise MmzooError(
                    f"{weights.file}: {len(unexpected)} unexpected weights: {listing(unexpected)}"
                )
        for name in self.names:  # the slices of every tensor fit together
            self.spec(name)

    def _merged(self, name: str, slice_of: Any) -> torch.Tensor:
        """The full mm tensor ``name`` from ``slice_of(shard, stored name)`` of every shard."""
        parts = []
        for loc in self._located[name]:
            slices = [slice_of(self.shard(t, loc.stage), loc.entry.name) for t in range(self.layout.tp)]
            parts.append(merge_tp(slices, loc.entry.kind))
        first = self._located[name][0].entry
        return parts[0] if first.part is None else first.op.merge(parts)

    def spec(self, name: str) -> TensorSpec:
        try:
            full = self._merged(name, lambda shard, stored: _meta_tensor(self._open(shard).spec(stored)))
        except RuntimeError as exc:
            raise MmzooError(f"{self.iteration}: the slices of {name} do not fit together ({exc})") from exc
        return full.dtype, tuple(full.shape)

    def _read(self, shard: Path, stored: str) -> torch.Tensor:
        tensor = self._open(shard).get(stored)
        self._read_since_reopen += tensor.numel() * tensor.element_size()
        return tensor

    def get(self, name: str) -> torch.Tensor:
        return self._merged(name, self._read)

    def tp_slice(self, name: str, tp: int) -> TpSlice | None:
        """How tensor-parallel rank r of a ``tp``-way split reads its slice of ``name`` from its own
        shard alone; ``None`` when the checkpoint holds it otherwise (another tp, a tensor stored
        in parts, a split by heads)."""
        located = self._located[name]
        entry = located[0].entry
        if tp != self.layout.tp or entry.part is not None or not isinstance(entry.kind, str):
            return None
        dim = TP_SLICE_DIMS.get(entry.kind, -1)
        if dim == -1:
            return None
        stage = located[0].stage
        return TpSlice(dim, entry.kind == GLU, lambda rank: self._read(self.shard(rank, stage), entry.name))
