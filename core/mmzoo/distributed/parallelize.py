"""Model parallelism applied to a model before FSDP shards it: tensor and context parallel
(pipeline stages: :mod:`mmzoo.distributed.pipeline`)."""

from __future__ import annotations

from mmzoo.config import ParallelConfig
from mmzoo.distributed.mesh import TrainMesh
from mmzoo.errors import MmzooError
from mmzoo.model import VLModel


def parallelize(model: VLModel, mesh: TrainMesh, parallel: ParallelConfig) -> None:
    """Split ``model`` over the mesh's ``tp`` and ``cp`` ranks, in place."""
    for name in ("tp", "cp"):
        if getattr(mesh.shape, name) > 1:
            raise MmzooError(f"parallel.{name} > 1 is not supported yet")
