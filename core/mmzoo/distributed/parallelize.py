"""Model parallelism applied to a model before FSDP shards it: tensor and context parallel."""

from __future__ import annotations

from mmzoo.config import ParallelConfig
from mmzoo.distributed.mesh import TrainMesh
from mmzoo.distributed.tensor_parallel import apply_tensor_parallel
from mmzoo.errors import MmzooError
from mmzoo.model import VLModel


def parallelize(model: VLModel, mesh: TrainMesh, parallel: ParallelConfig) -> None:
    """Split ``model`` over the mesh's ``tp`` and ``cp`` ranks, in place."""
    for name in ("cp", "pp"):
        if getattr(mesh.shape, name) > 1:
            raise MmzooError(f"parallel.{name} > 1 is not supported yet")
    if mesh.shape.tp > 1:
        apply_tensor_parallel(model.text_decoder, mesh["tp"], sequence_parallel=parallel.sequence_parallel)
