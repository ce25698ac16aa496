"""Model parallelism applied to a model before FSDP shards it: tensor and context parallel
(pipeline stages: :mod:`mmzoo.distributed.pipeline`)."""

from __future__ import annotations

from mmzoo.config import ParallelConfig
from mmzoo.distributed.context_parallel import apply_context_parallel
from mmzoo.distributed.mesh import TrainMesh
from mmzoo.distributed.tensor_parallel import apply_tensor_parallel
from mmzoo.model import VLModel


def parallelize(model: VLModel, mesh: TrainMesh, parallel: ParallelConfig) -> None:
    """Split ``model`` over the mesh's ``tp`` and ``cp`` ranks, in place."""
    if mesh.shape.tp > 1:
        apply_tensor_parallel(model.text_decoder, mesh["tp"], sequence_parallel=parallel.sequence_parallel)
    if mesh.shape.cp > 1:
        apply_context_parallel(model, mesh["cp"].get_group())
