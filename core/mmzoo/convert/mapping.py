"""Declarative weight mappings between Hugging Face names and mm (Megatron-core) names.

A plugin writes its mapping as a table of :class:`Rule` entries with ``{i}`` layer templates;
each rule's op knows both directions, so the reverse mapping is derived, never written twice.
``mm=None`` drops an HF tensor (optional rules may be absent from a checkpoint).

Rules also say how a tensor is split for tensor parallelism (``tp``: :data:`COLUMN`,
:data:`ROW`, :data:`GLU` or :data:`REPLICATE`, as Megatron-core holds it on each rank) and on
which pipeline stage a non-layer tensor lives (``place``); layer tensors follow their layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar, Protocol

import torch

from mmzoo.errors import MmzooError


class Op(Protocol):
    """A reversible transform between HF tensors and one mm tensor.

    ``split`` gives the HF tensors, which is also what the canonical layout stores; an op
    fusing several HF tensors names them in ``part_names`` (the leaf module names they are
    stored under in that layout, e.g. ``q_proj``).
    """

    @property
    def part_names(self) -> tuple[str, ...]: ...

    def merge(self, tensors: list[torch.Tensor]) -> torch.Tensor: ...

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]: ...

    def tp_problem(self, tp: int) -> str | None:
        """Why a ``tp``-way split is impossible for this op, or ``None``."""
        ...


class Identity:
    """One HF tensor is one mm tensor."""

    part_names: tuple[str, ...] = ()

    def merge(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return tensors[0]

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor]

    def tp_problem(self, tp: int) -> str | None:
        return None


@dataclass(frozen=True)
class Concat:
    """``count`` HF tensors stacked along ``dim`` (e.g. ``[gate; up]`` into ``linear_fc1``)."""

    dim: int = 0
    count: int = 2
    names: tuple[str, ...] = ()

    @property
    def part_names(self) -> tuple[str, ...]:
        return self.names or tuple(f"part{j}" for j in range(self.count))

    def merge(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors, dim=self.dim)

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [t.contiguous() for t in tensor.chunk(self.count, dim=self.dim)]

    def tp_problem(self, tp: int) -> str | None:
        return None


@dataclass(frozen=True)
class QKV:
    """Q, K, V (separate tensors, or one HF tensor ``[Q; K; V]``) into Megatron's layout.

    Megatron groups rows per KV head: ``[q_0 .. q_{r-1}, k, v]`` for each group, so a tensor-
    parallel split along rows gives each rank whole groups. Works for weights and biases.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    fused_source: bool = False

    def _sizes(self) -> list[int]:
        return [
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        ]

    def merge(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        q, k, v = tensors[0].split(self._sizes(), dim=0) if self.fused_source else tensors
        rest = q.shape[1:]
        groups, per_group, d = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        fused = torch.cat(
            [
                q.reshape(groups, per_group * d, *rest),
                k.reshape(groups, d, *rest),
                v.reshape(groups, d, *rest),
            ],
            dim=1,
        )  # (groups, (per_group + 2) * d, ...)
        return fused.reshape(-1, *rest)

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        rest = tensor.shape[1:]
        groups, per_group, d = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        grouped = tensor.reshape(groups, (per_group + 2) * d, *rest)
        q, k, v = grouped.split([per_group * d, d, d], dim=1)
        parts = [q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]
        if self.fused_source:
            return [torch.cat(parts, dim=0)]
        return [p.contiguous() for p in parts]

    # The parts' names when Q, K and V are separate HF tensors (a fused source is one part).
    part_names: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj")

    def tp_problem(self, tp: int) -> str | None:
        if self.num_kv_heads % tp:
            return f"num_kv_heads {self.num_kv_heads} is not divisible by tp {tp}"
        return None


IDENTITY = Identity()
GATE_UP = Concat(dim=0, count=2, names=("gate_proj", "up_proj"))

# Tensor-parallel kinds: what each of ``tp`` ranks holds at run time in Megatron-core.
COLUMN = "column"  # column-parallel linear / vocab-parallel embedding: rows split in tp blocks
ROW = "row"  # row-parallel linear weight: columns (dim 1) split in tp blocks
GLU = "glu"  # fused [gate; up]: rank r holds [gate_r; up_r]
REPLICATE = "replicate"  # norms, patch embedding, row-parallel biases: every rank holds all
TP_KINDS = (COLUMN, ROW, GLU, REPLICATE)


@dataclass(frozen=True)
class Rule:
    """``mm`` name <- ``hf`` names through ``op``; ``{i}`` expands over ``layers`` (a count key).

    Attributes:
        mm: the mm name (template), or ``None`` to drop the HF tensors.
        hf: the HF names (templates) the op merges.
        op: the transform (identity, :class:`Concat`, :class:`QKV`).
        layers: the layer group the ``{i}`` template expands over (``"vision"``, ``"text"``).
        optional: the HF tensors may be absent.
        tp: tensor-parallel kind, one of :data:`TP_KINDS`.
        place: pipeline stage of a non-layer tensor: ``"first"``, ``"last"``, or
            ``"<group>:first"`` / ``"<group>:last"`` (the stage holding that group's first or
            last layer).
        layer: the layer index of an expanded rule.
        template: the mm template an expanded rule came from (for per-stage renumbering).
    """

    mm: str | None
    hf: tuple[str, ...]
    op: Op = IDENTITY
    layers: str | None = None
    optional: bool = False
    tp: str = REPLICATE
    place: str = "first"
    layer: int | None = None
    template: str | None = None


@dataclass(frozen=True)
class TiedCopy:
    """A tensor a pipeline stage holds as a copy of another (tied output layer on the last stage).

    Written only when ``place`` is another stage than ``source``'s; never read back.
    """

    name: str
    source: str
    tp: str = COLUMN
    place: str = "last"


@dataclass
class WeightMapping:
    """A mapping expanded for one config: concrete names, no templates.

    Attributes:
        rules: expanded rules.
        hf_aliases: prefix rewrites from other HF key layouts into the one the rules use,
            e.g. ``{"model.language_model.": "model."}``.
        tied_copies: copies pipeline stages hold of tied tensors.
        legacy_mm_prefixes: mm name prefixes of checkpoints written by mmzoo's format 1 ->
            today's, e.g. ``{"vision_encoder.": "image_encoder.encoder."}``.
    """

    rules: list[Rule]
    hf_aliases: Mapping[str, str] = field(default_factory=dict)
    tied_copies: tuple[TiedCopy, ...] = ()
    legacy_mm_prefixes: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def expand(
        cls,
        table: list[Rule],
        layer_counts: Mapping[str, int],
        hf_aliases: Mapping[str, str] | None = None,
        tied_copies: tuple[TiedCopy, ...] = (),
        legacy_mm_prefixes: Mapping[str, str] | None = None,
    ) -> WeightMapping:
        """Expand ``{i}`` templates with ``layer_counts[rule.layers]`` layers each."""
        rules: list[Rule] = []
        for rule in table:
            if rule.layers is None:
                rules.append(rule)
                continue
            for i in range(layer_counts[rule.layers]):
                rules.append(
                    replace(
                        rule,
                        mm=None if rule.mm is None else rule.mm.format(i=i),
                        hf=tuple(name.format(i=i) for name in rule.hf),
                        layer=i,
                        template=rule.mm,
                    )
                )
        return cls(rules, dict(hf_aliases or {}), tuple(tied_copies), dict(legacy_mm_prefixes or {}))

    def canonical_hf_name(self, name: str) -> str:
        """Rewrite an HF key from any supported layout into the layout of the rules."""
        for prefix, target in self.hf_aliases.items():
            if name.startswith(prefix):
                return target + name[len(prefix) :]
        return name

    def legacy_mm_name(self, name: str) -> str:
        """The name format-1 checkpoints stored today's mm ``name`` under."""
        for old, new in self.legacy_mm_prefixes.items():
            if name.startswith(new):
                return old + name[len(new) :]
        return name

    def layer_prefixes(self) -> dict[str, str]:
        """Each layer group's stack: its mm name prefix before the layer index, e.g.
        ``{"text": "text_decoder.decoder.layers."}``.

        Raises:
            MmzooError: a group's templates name two stacks (give each its own group).
        """
        prefixes: dict[str, str] = {}
        for rule in self.rules:
            if rule.layers is None or rule.template is None:
                continue
            prefix = rule.template.split("{i}")[0]
            if prefixes.setdefault(rule.layers, prefix) != prefix:
                raise MmzooError(
                    f"weight mapping: layer group '{rule.layers}' spans two stacks, "
                    f"{prefixes[rule.layers]}{{i}} and {prefix}{{i}}; give each stack its own group"
                )
        return prefixes

    def layer_counts(self) -> dict[str, int]:
        """Layer group -> its number of layers (what the ``{i}`` templates expanded over)."""
        counts: dict[str, int] = {}
        for rule in self.rules:
            if rule.layers is not None and rule.layer is not None:
                counts[rule.layers] = max(counts.get(rule.layers, 0), rule.layer + 1)
        return counts

    def layers_held(self, names: Iterable[str]) -> dict[str, int]:
        """Layer group -> how many of its layers ``names`` hold, each known by the index right
        after its stack's prefix (an mm shard numbers its stage's layers from 0)."""
        prefixes = self.layer_prefixes()
        held: dict[str, set[str]] = {group: set() for group in prefixes}
        for name in names:
            for group, prefix in prefixes.items():
                if name.startswith(prefix):
                    index, dot, _ = name[len(prefix) :].partition(".")
                    if dot and index.isdigit():
                        held[group].add(index)
        return {group: len(indices) for group, indices in held.items()}

    def mm_names(self) -> list[str]:
        return [r.mm for r in self.rules if r.mm is not None]

    def check_hf_names(self, available: set[str]) -> tuple[list[str], list[str]]:
        """(missing, unexpected) canonical HF names for a checkpoint holding ``available``."""
        known: set[str] = set()
        missing: list[str] = []
        for rule in self.rules:
            known.update(rule.hf)
            if not rule.optional:
                missing.extend(name for name in rule.hf if name not in available)
        return missing, sorted(available - known)

    def to_mm(
        self, get_hf: Callable[[str], torch.Tensor], available: set[str]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(mm_name, tensor)``, reading HF tensors one rule at a time."""
        for rule in self.rules:
            if rule.mm is None:
                continue
            if rule.optional and not all(name in available for name in rule.hf):
                continue
            yield rule.mm, rule.op.merge([get_hf(name) for name in rule.hf])

    def to_hf(self, get_mm: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_name, tensor)`` from mm tensors (the derived reverse)."""
        for rule in self.rules:
            if rule.mm is None:
                continue
            tensors = rule.op.split(get_mm(rule.mm))
            yield from zip(rule.hf, tensors, strict=True)
