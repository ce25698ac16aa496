"""Declarative weight mappings between Hugging Face names and mm (Megatron-core) names.

A plugin writes its mapping as a table of :class:`Rule` entries with ``{i}`` layer templates;
each rule's op knows both directions, so the reverse mapping is derived, never written twice.
``mm=None`` drops an HF tensor (optional rules may be absent from a checkpoint).

Rules also say how a tensor is split for tensor parallelism (``tp``: :data:`COLUMN`,
:data:`ROW`, :data:`GLU`, :data:`REPLICATE` or by :class:`Heads`, as Megatron-core holds it on
each rank) and on
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
# column-parallel linear / vocab-parallel embedding: rows split in tp blocks, the first
# rows % tp ranks one row more (MindSpeed-MM's split of a vocabulary tp does not divide)
COLUMN = "column"
ROW = "row"  # row-parallel linear weight: columns (dim 1) split in tp equal blocks
GLU = "glu"  # fused [gate; up]: rank r holds [gate_r; up_r]
REPLICATE = "replicate"  # norms, patch embedding, row-parallel biases: every rank holds all
TP_KINDS = (COLUMN, ROW, GLU, REPLICATE)


@dataclass(frozen=True)
class Heads:
    """The tensor-parallel kind of attention tensors split by whole heads, as MindSpeed-MM splits
    a ViT's: the first ``num_heads % tp`` ranks hold one head more (25 heads at tp 2: 13 and 12).

    Attributes:
        num_heads: heads in each block.
        blocks: blocks of ``num_heads`` heads stacked along ``dim``; rank r holds its heads of
            every block, in block order (a ViT's ``[Q; K; V]``: 3, rank r ``[q_r; k_r; v_r]``).
        dim: 0 splits output rows (qkv weight and bias), 1 input columns (the output projection).
    """

    num_heads: int
    blocks: int = 1
    dim: int = 0

    def __str__(self) -> str:
        return f"heads({self.num_heads} x {self.blocks}, dim {self.dim})"

    def heads(self, tp: int) -> list[int]:
        """Heads of each rank."""
        return [self.num_heads // tp + (rank < self.num_heads % tp) for rank in range(tp)]

    def split(self, tensor: torch.Tensor, tp: int) -> list[torch.Tensor]:
        """Rank 0..tp-1's slices of ``tensor``."""
        head = tensor.shape[self.dim] // (self.blocks * self.num_heads)  # rows (or columns) a head
        sizes = [n * head for n in self.heads(tp)]
        blocks = [block.split(sizes, dim=self.dim) for block in tensor.chunk(self.blocks, dim=self.dim)]
        return [torch.cat([pieces[rank] for pieces in blocks], dim=self.dim) for rank in range(tp)]

    def merge(self, slices: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's slice (the inverse of :meth:`split`)."""
        per_rank = [piece.chunk(self.blocks, dim=self.dim) for piece in slices]
        return torch.cat([pieces[b] for b in range(self.blocks) for pieces in per_rank], dim=self.dim)

    def problem(self, shape: tuple[int, ...], tp: int) -> str | None:
        """Why a tensor of ``shape`` cannot be split ``tp`` ways, or ``None``."""
        if len(shape) <= self.dim:
            return f"shape {shape} has no dim {self.dim} to split by heads"
        if shape[self.dim] % (self.blocks * self.num_heads):
            return f"dim {self.dim} ({shape[self.dim]}) is not {self.blocks} x {self.num_heads} heads"
        if self.num_heads < tp:
            return f"{self.num_heads} heads cannot give each of tp {tp} ranks one"
        return None


# A tensor-parallel kind: one of :data:`TP_KINDS` or a :class:`Heads` split.
TpKind = str | Heads


@dataclass(frozen=True)
class Rule:
    """``mm`` name <- ``hf`` names through ``op``; ``{i}`` expands over ``layers`` (a count key).

    Attributes:
        mm: the mm name (template), or ``None`` to drop the HF tensors.
        hf: the HF names (templates) the op merges.
        op: the transform (identity, :class:`Concat`, :class:`QKV`).
        layers: the layer group the ``{i}`` template expands over (``"vision"``, ``"text"``).
        optional: the HF tensors may be absent.
        tp: tensor-parallel kind, one of :data:`TP_KINDS` or a :class:`Heads`.
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
    tp: TpKind = REPLICATE
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
    tp: TpKind = COLUMN
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
