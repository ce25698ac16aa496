"""Model parallelism applied to a model before FSDP shards it: tensor and context parallel
(pipeline stages: :mod:`mmzoo.distributed.pipeline`)."""

from __future__ import annotations

from mmzoo.config import ParallelConfig
from mmzoo.distributed.context_parallel import apply_context_parallel
from mmzoo.distributed.mesh import TrainMesh
from mmzoo.errors import MmzooError
from mmzoo.model import VLModel


def parallelize(model: VLModel, mesh: TrainMesh, parallel: ParallelConfig) -> None:
    """Split ``model`` over the mesh's ``tp`` and ``cp`` ranks, in place."""
    for name in ("tp",):
        if getattr(mesh.shape, name) > 1:
            raise MmzooError(f"parallel.{name} > 1 is not supported yet")
    if mesh.shape.cp > 1:
        apply_context_parallel(model, mesh["cp"].get_group())
