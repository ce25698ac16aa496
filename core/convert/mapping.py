"""Declarative weight mappings between Hugging Face names and mm (Megatron-core) names.

A plugin writes its mapping as a table of :class:`Rule` entries with ``{i}`` layer templates;
each rule's op knows both directions, so the reverse mapping is derived, never written twice.
``mm=None`` drops an HF tensor (optional rules may be absent from a checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch


class Op(Protocol):
    """A reversible transform between HF tensors and one mm tensor."""

    def merge(self, tensors: list[torch.Tensor]) -> torch.Tensor: ...

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]: ...


class Identity:
    """One HF tensor is one mm tensor."""

    def merge(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return tensors[0]

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor]


@dataclass(frozen=True)
class Concat:
    """``parts`` HF tensors stacked along ``dim`` (e.g. ``[gate; up]`` into ``linear_fc1``)."""

    dim: int = 0
    parts: int = 2

    def merge(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors, dim=self.dim)

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [t.contiguous() for t in tensor.chunk(self.parts, dim=self.dim)]


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


IDENTITY = Identity()
GATE_UP = Concat(dim=0, parts=2)


@dataclass(frozen=True)
class Rule:
    """``mm`` name <- ``hf`` names through ``op``; ``{i}`` expands over ``layers`` (a count key)."""

    mm: str | None
    hf: tuple[str, ...]
    op: Op = IDENTITY
    layers: str | None = None
    optional: bool = False


@dataclass
class WeightMapping:
    """A mapping expanded for one config: concrete names, no templates.

    Attributes:
        rules: expanded rules.
        hf_aliases: prefix rewrites from other HF key layouts into the one the rules use,
            e.g. ``{"model.language_model.": "model."}``.
    """

    rules: list[Rule]
    hf_aliases: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def expand(
        cls, table: list[Rule], layer_counts: Mapping[str, int], hf_aliases: Mapping[str, str] | None = None
    ) -> WeightMapping:
        """Expand ``{i}`` templates with ``layer_counts[rule.layers]`` layers each."""
        rules: list[Rule] = []
        for rule in table:
            if rule.layers is None:
                rules.append(rule)
                continue
            for i in range(layer_counts[rule.layers]):
                rules.append(
                    Rule(
                        None if rule.mm is None else rule.mm.format(i=i),
                        tuple(name.format(i=i) for name in rule.hf),
                        rule.op,
                        None,
                        rule.optional,
                    )
                )
        return cls(rules, dict(hf_aliases or {}))

    def canonical_hf_name(self, name: str) -> str:
        """Rewrite an HF key from any supported layout into the layout of the rules."""
        for prefix, target in self.hf_aliases.items():
            if name.startswith(prefix):
                return target + name[len(prefix) :]
        return name

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
