"""Model parallelism applied to a model before FSDP shards it: tensor and context parallel
(pipeline stages: :mod:`mmzoo.distributed.pipeline`)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mmzoo.config import ParallelConfig
from mmzoo.distributed.context_parallel import apply_context_parallel
from mmzoo.distributed.mesh import TrainMesh
from mmzoo.distributed.tensor_parallel import apply_tensor_parallel
from mmzoo.model import VLModel


def parallelize(
    model: VLModel, mesh: TrainMesh, parallel: ParallelConfig, stacks: Sequence[nn.Module] = ()
) -> None:
    """Split ``model`` over the mesh's ``tp`` and ``cp`` ranks, in place; ``stacks``: the pipeline
    stages' views of the LLM's layer stack (see :func:`apply_tensor_parallel`)."""
    # Megatron's decoder (model.text_backend: megatron) is split when it is built.
    if mesh.shape.tp > 1 and not getattr(model.text_decoder, "split_when_built", False):
        sequence_parallel = parallel.sequence_parallel
        apply_tensor_parallel(
            model.text_decoder, mesh["tp"], sequence_parallel=sequence_parallel, stacks=stacks
        )
    if mesh.shape.cp > 1:
        split = mesh.shape.tp if parallel.sequence_parallel else 1  # each cp slice split again over tp
        apply_context_parallel(model, mesh["cp"].get_group(), split)
