"""Tensor- and pipeline-parallel layouts of mm checkpoints: which shard holds which tensor slice.

A shard (``mp_rank_TT`` or ``mp_rank_TT_PPP``) holds exactly what one Megatron-core rank holds
at run time: its pipeline stage's layers, renumbered from 0, and its tensor-parallel slice of
each tensor (see the kinds in :mod:`mmzoo.convert.mapping`). Everything here is generic: the
family's mapping says which tensor is split how and placed where.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from mmzoo.convert.mapping import (
    COLUMN,
    GLU,
    IDENTITY,
    QKV,
    REPLICATE,
    ROW,
    TP_KINDS,
    Heads,
    Op,
    Rule,
    TpKind,
    WeightMapping,
)
from mmzoo.errors import MmzooError

FUSED, CANONICAL = "fused", "canonical"
LAYOUTS = (FUSED, CANONICAL)
# The layer groups of a vision-language model, in pipeline order: the vision encoder is
# complete before the first LLM layer.
GROUPS = ("vision", "text")


def depths(mapping: WeightMapping) -> dict[str, int]:
    """Layers of each group (:data:`GROUPS`) in an expanded mapping.

    Raises:
        MmzooError: the mapping has a layer group the mm layouts do not place on stages.
    """
    counts = mapping.layer_counts()
    unknown = sorted(set(counts) - set(GROUPS))
    if unknown:
        raise MmzooError(
            f"weight mapping: layer group(s) {', '.join(unknown)}; mm checkpoints place only "
            f"{' and '.join(GROUPS)} layers on pipeline stages, so name each stack's group one of those"
        )
    return {group: counts.get(group, 0) for group in GROUPS}


def _unknown(kind: TpKind) -> MmzooError:
    return MmzooError(f"unknown tensor-parallel kind '{kind}'; use one of {', '.join(TP_KINDS)} or a Heads")


def split_tp(tensor: torch.Tensor, kind: TpKind, tp: int) -> list[torch.Tensor]:
    """The ``tp`` slices rank 0..tp-1 hold of ``tensor`` (views where possible)."""
    if tp == 1 or kind == REPLICATE:
        return [tensor] * tp
    if isinstance(kind, Heads):
        return kind.split(tensor, tp)
    if kind == COLUMN:  # uneven when tp does not divide the rows: the first rows % tp get one more
        return list(tensor.tensor_split(tp, dim=0))
    if kind == ROW:
        return list(tensor.chunk(tp, dim=1))
    if kind == GLU:
        gate, up = tensor.chunk(2, dim=0)
        return [torch.cat(pair) for pair in zip(gate.chunk(tp), up.chunk(tp), strict=True)]
    raise _unknown(kind)


def merge_tp(slices: list[torch.Tensor], kind: TpKind) -> torch.Tensor:
    """The full tensor from the slices of every rank (the inverse of :func:`split_tp`)."""
    if len(slices) == 1 or kind == REPLICATE:
        return slices[0]
    if isinstance(kind, Heads):
        return kind.merge(slices)
    if kind == COLUMN:
        return torch.cat(slices, dim=0)
    if kind == ROW:
        return torch.cat(slices, dim=1)
    if kind == GLU:
        halves = [s.chunk(2, dim=0) for s in slices]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    raise _unknown(kind)


def tp_problem(name: str, shape: tuple[int, ...], kind: TpKind, tp: int) -> str | None:
    """Why ``name`` cannot be split ``tp`` ways as ``kind``, or ``None``."""
    if tp == 1 or kind == REPLICATE:
        return None
    if isinstance(kind, Heads):
        problem = kind.problem(shape, tp)
        return None if problem is None else f"{name}: {problem}"
    dim = 1 if kind == ROW else 0
    if len(shape) <= dim:
        return f"{name} has shape {shape}, which a {kind}-parallel split needs {dim + 1} dims for"
    size = shape[dim] // 2 if kind == GLU else shape[dim]
    if kind == COLUMN and size < tp:
        return f"{name}: dim 0 ({size}) is smaller than tp {tp}"
    if kind != COLUMN and size % tp:
        return f"{name}: dim {dim} ({size}{' per half' if kind == GLU else ''}) is not divisible by tp {tp}"
    return None


def part_kind(kind: TpKind) -> TpKind:
    """How each HF part of a fused tensor of ``kind`` is split when stored apart (canonical layout):
    ``[gate; up]`` parts by rows, a stacked ``[Q; K; V]``'s parts by their own heads."""
    if kind == GLU:
        return COLUMN
    if isinstance(kind, Heads):
        return replace(kind, blocks=1)
    return kind


@dataclass(frozen=True)
class Entry:
    """One tensor in a shard: stored ``name``, the full mm tensor it comes from, which ``part``
    of ``op.split(tensor)`` it is (``None``: the tensor itself), and the tensor-parallel ``kind``
    of the stored slice. ``copy``: a tied copy, written but never read back."""

    name: str
    source: str
    part: int | None
    kind: TpKind
    copy: bool = False
    op: Op = IDENTITY

    def select(self, tensor: torch.Tensor) -> torch.Tensor:
        """What this entry stores of the full mm ``tensor`` (before the tensor-parallel split)."""
        return tensor if self.part is None else self.op.split(tensor)[self.part]


def _legacy_op(op: Op) -> Op:
    # Format 1 stored every fused QKV as separate q, k, v parts, the ViT's fused HF qkv too.
    return replace(op, fused_source=False) if isinstance(op, QKV) else op


@dataclass(frozen=True)
class ParallelLayout:
    """Tensor-parallel size and per-stage layer counts of each group.

    Args:
        tp: tensor-parallel size.
        vit_pp_layers: vision layers per pipeline stage, e.g. ``(32, 0)``.
        llm_pp_layers: LLM layers per pipeline stage, e.g. ``(12, 16)``.
        layout: ``"fused"`` (Megatron's fused tensors) or ``"canonical"`` (the HF tensors,
            q/k/v and gate/up apart, under MindSpeed-MM's ``enable_canonical_hf_struct`` names).
        legacy: the names of mmzoo's format 1 (read only): the family's legacy prefixes, and
            canonical parts ``<module>.{q,k,v,gate,up}.<param>``, the ViT's qkv split too.
    """

    tp: int
    vit_pp_layers: tuple[int, ...]
    llm_pp_layers: tuple[int, ...]
    layout: str = FUSED
    legacy: bool = False

    @property
    def pp(self) -> int:
        return len(self.llm_pp_layers)

    def counts(self, group: str) -> tuple[int, ...]:
        return self.vit_pp_layers if group == "vision" else self.llm_pp_layers

    def ranges(self, group: str) -> list[tuple[int, int]]:
        """``[start, end)`` of ``group``'s global layer indices on each stage."""
        out, start = [], 0
        for n in self.counts(group):
            out.append((start, start + n))
            start += n
        return out

    def check(self, depths: dict[str, int]) -> None:
        """Raise a one-line MmzooError for an impossible layout of a model with ``depths`` layers."""
        if self.tp < 1:
            raise MmzooError(f"tp must be >= 1, got {self.tp}")
        if self.layout not in LAYOUTS:
            raise MmzooError(f"unknown layout '{self.layout}'; use one of {', '.join(LAYOUTS)}")
        if len(self.vit_pp_layers) != len(self.llm_pp_layers) or not self.llm_pp_layers:
            raise MmzooError(
                f"vit pp layers {list(self.vit_pp_layers)} and llm pp layers {list(self.llm_pp_layers)} "
                "must list one count per pipeline stage, the same number of stages"
            )
        for group, flag in (("vision", "vit"), ("text", "llm")):
            counts = self.counts(group)
            if any(n < 0 for n in counts):
                raise MmzooError(f"{flag} pp layers {list(counts)} has a negative count")
            if sum(counts) != depths[group]:
                raise MmzooError(
                    f"{flag} pp layers {list(counts)} sum to {sum(counts)}, but the model has "
                    f"{depths[group]} {group} layers"
                )
        vision_done = 0
        for stage, (nv, nt) in enumerate(zip(self.vit_pp_layers, self.llm_pp_layers, strict=True)):
            vision_done += nv
            if nt and vision_done < depths["vision"]:
                raise MmzooError(
                    f"stage {stage} holds LLM layers before the vision encoder is complete "
                    f"({vision_done} of {depths['vision']} vision layers by then); put every vision "
                    "layer on the stages before or on the first stage with LLM layers"
                )

    def stage_of_layer(self, group: str, layer: int) -> int:
        for stage, (start, end) in enumerate(self.ranges(group)):
            if start <= layer < end:
                return stage
        raise MmzooError(f"{group} layer {layer} is on no pipeline stage")

    def stage_of(self, place: str) -> int:
        """The stage a non-layer tensor with ``place`` lives on."""
        if place == "first":
            return 0
        if place == "last":
            return self.pp - 1
        group, _, end = place.partition(":")
        if group not in GROUPS or end not in ("first", "last"):
            raise MmzooError(f"unknown placement '{place}'; use first, last or <vision|text>:<first|last>")
        stages = [s for s, n in enumerate(self.counts(group)) if n]
        if not stages:
            return 0
        return stages[0] if end == "first" else stages[-1]

    def rule_stage(self, rule: Rule) -> int:
        if rule.layer is not None and rule.layers is not None:
            return self.stage_of_layer(rule.layers, rule.layer)
        return self.stage_of(rule.place)

    def local_name(self, rule: Rule, stage: int) -> str:
        """The rule's mm name on ``stage``: layers renumbered from 0 on each stage."""
        assert rule.mm is not None
        if rule.layer is None or rule.template is None or rule.layers is None:
            return rule.mm
        return rule.template.format(i=rule.layer - self.ranges(rule.layers)[stage][0])

    def shard_name(self, tp_rank: int, pp_rank: int) -> str:
        """``mp_rank_TT`` without pipeline parallelism, else ``mp_rank_TT_PPP``."""
        return f"mp_rank_{tp_rank:02d}" if self.pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"

    def shards(self) -> Iterator[tuple[int, int]]:
        """``(pp_rank, tp_rank)`` of every shard, stage by stage."""
        for pp_rank in range(self.pp):
            for tp_rank in range(self.tp):
                yield pp_rank, tp_rank

    def stage_entries(self, mapping: WeightMapping, stage: int) -> list[Entry]:
        """What each tp shard of ``stage`` holds, in order (tied copies included)."""
        entries: list[Entry] = []
        for rule in mapping.rules:
            if rule.mm is None or self.rule_stage(rule) != stage:
                continue
            name = self.local_name(rule, stage)
            if self.legacy:
                name = mapping.legacy_mm_name(name)
            if self.layout == CANONICAL and rule.op.part_names:
                entries.extend(self._canonical(rule, name))
            else:
                entries.append(Entry(name, rule.mm, None, rule.tp))
        by_mm = {r.mm: r for r in mapping.rules if r.mm is not None}
        for tied in mapping.tied_copies:
            if self.stage_of(tied.place) == stage != self.rule_stage(by_mm[tied.source]):
                entries.append(Entry(tied.name, tied.source, None, tied.tp, copy=True))
        return entries

    def _canonical(self, rule: Rule, name: str) -> list[Entry]:
        """The canonical entries of a fused tensor: its HF tensors (``op.split``), one HF tensor
        under the mm name, several under the op's part names in place of the mm leaf module
        (``self_attention.linear_qkv.weight`` -> ``self_attention.q_proj.weight``, ...)."""
        assert rule.mm is not None
        kind = part_kind(rule.tp)
        module, _, param = name.rpartition(".")
        if self.legacy:  # format 1: "<module>.<q|k|v|gate|up>.<param>"
            op = _legacy_op(rule.op)
            names = [f"{module}.{p.removesuffix('_proj')}.{param}" for p in op.part_names]
        else:
            op = rule.op
            parent = module.rpartition(".")[0]
            names = [name] if len(rule.hf) == 1 else [f"{parent}.{p}.{param}" for p in op.part_names]
        return [Entry(n, rule.mm, j, kind, op=op) for j, n in enumerate(names)]
