"""The device mesh of a run: pipeline x data-parallel (FSDP) x context-parallel x tensor-parallel.

Ranks are laid out as ``(pp, dp_shard, cp, tp)`` with ``tp`` innermost, so the ranks of a
tensor-parallel group are neighbours (one node, the fastest links) and pipeline stages are
outermost (the least traffic). FSDP shards over ``dp_shard x cp`` flattened: context-parallel
ranks hold the same parameters and their gradients are summed like data-parallel ones.

The ranks of one data-parallel replica (same ``dp_shard`` coordinate) read the same
micro-batches; only its first rank (:attr:`TrainMesh.data_leader`) counts their tokens and
targets in the step's global counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mmzoo.errors import MmzooError

if TYPE_CHECKING:
    from mmzoo.config import ParallelConfig
    from mmzoo.nn.decoder import DecoderConfig

MESH_DIMS = ("pp", "dp_shard", "cp", "tp")
FSDP_DIM = "dp_shard_cp"


@dataclass(frozen=True)
class MeshShape:
    """Ranks along each mesh dimension; their product is the run's number of ranks."""

    pp: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1

    @property
    def size(self) -> int:
        return self.pp * self.dp_shard * self.cp * self.tp

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in MESH_DIMS)

    def describe(self) -> str:
        return " x ".join(f"{name}={getattr(self, name)}" for name in MESH_DIMS)


def mesh_shape(parallel: ParallelConfig, ranks: int) -> MeshShape:
    """The mesh ``parallel`` asks for on ``ranks`` ranks; ``dp_shard: 0`` takes the ranks left over.

    Raises:
        MmzooError: a size below 1, or sizes whose product is not the number of ranks.
    """
    for name in ("tp", "cp", "pp"):
        if getattr(parallel, name) < 1:
            raise MmzooError(f"parallel.{name}={getattr(parallel, name)}: give a size of at least 1")
    if parallel.dp_shard < 0:
        raise MmzooError(
            f"parallel.dp_shard={parallel.dp_shard}: give a size of at least 1, or 0 for the rest"
        )
    model_parallel = parallel.tp * parallel.cp * parallel.pp
    dp_shard = parallel.dp_shard or ranks // model_parallel
    shape = MeshShape(pp=parallel.pp, dp_shard=max(dp_shard, 1), cp=parallel.cp, tp=parallel.tp)
    if shape.size != ranks:
        hint = (
            f"start {shape.size} ranks (torchrun --nproc-per-node {shape.size})"
            if ranks == 1
            else f"make dp_shard x cp x tp x pp equal {ranks}"
        )
        raise MmzooError(
            f"parallel: {shape.describe()} needs {shape.size} ranks, the run has {ranks}; {hint}"
        )
    return shape


def check_text_decoder(shape: MeshShape, config: DecoderConfig) -> None:
    """The LLM's sizes against the mesh: heads, KV heads and vocabulary split over ``tp``, heads over
    ``tp * cp`` (Ulysses), layers over ``pp``.

    Raises:
        MmzooError: the first size that does not divide, in one line.
    """
    tp, cp = shape.tp, shape.cp
    problems = [
        (config.num_heads % tp, f"{config.num_heads} attention heads are not divisible by parallel.tp={tp}"),
        (config.num_kv_heads % tp, f"{config.num_kv_heads} KV heads are not divisible by parallel.tp={tp}"),
        (
            config.vocab_size % tp,
            f"the vocabulary ({config.vocab_size}) is not divisible by parallel.tp={tp}",
        ),
        (
            config.num_heads % (tp * cp),
            f"{config.num_heads} attention heads are not divisible by parallel.tp x parallel.cp={tp * cp} "
            "(context parallel splits each tensor-parallel rank's heads cp ways)",
        ),
        (
            shape.pp > config.num_layers,
            f"parallel.pp={shape.pp} stages but the LLM has only {config.num_layers} layers",
        ),
    ]
    for failed, message in problems:
        if failed:
            raise MmzooError(f"parallel: {message}")


@dataclass
class TrainMesh:
    """The run's :class:`~torch.distributed.device_mesh.DeviceMesh` and this rank's place in it.

    One process has ``mesh`` None and every size 1; ``fsdp`` is the flattened ``dp_shard x cp``
    mesh FSDP shards over.
    """

    shape: MeshShape
    mesh: DeviceMesh | None = None
    fsdp: DeviceMesh | None = None

    @classmethod
    def build(cls, shape: MeshShape, device: torch.device) -> TrainMesh:
        """The mesh over the ranks of the process group (initialised)."""
        mesh = init_device_mesh(device.type, shape.sizes, mesh_dim_names=MESH_DIMS)
        return cls(shape, mesh, mesh[("dp_shard", "cp")]._flatten(FSDP_DIM))

    def __getitem__(self, name: str) -> DeviceMesh:
        """The 1-D mesh of one dimension (``"tp"``, ``"cp"``, ``"pp"``, ``"dp_shard"``) or of
        FSDP's flattened ``"dp_shard_cp"``."""
        assert self.mesh is not None and self.fsdp is not None, "one process has no mesh"
        return self.fsdp if name == FSDP_DIM else self.mesh[name]

    def coordinate(self, name: str) -> int:
        """This rank's index along a mesh dimension (0 in one process)."""
        return 0 if self.mesh is None else self.mesh[name].get_local_rank()

    @property
    def dp_rank(self) -> int:
        return self.coordinate("dp_shard")

    @property
    def dp_size(self) -> int:
        return self.shape.dp_shard

    @cached_property
    def data_leader(self) -> bool:
        """The first rank of this data-parallel replica: the one whose tokens and targets count."""
        return all(self.coordinate(name) == 0 for name in ("pp", "cp", "tp"))

    @property
    def last_stage(self) -> bool:
        return self.coordinate("pp") == self.shape.pp - 1

    @property
    def loss_share(self) -> float:
        """This rank's weight in the step's summed loss: the last stage's context-parallel parts add
        up, its tensor-parallel ranks each hold the whole."""
        return 1.0 / self.shape.tp if self.last_stage else 0.0
