"""Tensor parallel with ``model.text_backend: megatron``: megatron-core's own parallel layers.

megatron-core's column- and row-parallel layers hold each rank's shard (``linear_qkv`` rows of
whole KV groups, ``linear_fc1`` as ``[gate_r; up_r]``, the columns of ``linear_proj`` and
``linear_fc2``, the vocabulary rows of the embedding and output layer) and communicate over
Megatron's tensor-parallel group, the ranks of the mesh's ``tp`` dimension. Here those shards are
registered as DTensors over that mesh in the native decoder's placements
(:mod:`mmzoo.distributed.tensor_parallel`), so FSDP2, the loss on vocabulary shards, weight
loading and DCP checkpoints treat both backends alike (a checkpoint of one resumes in the other),
while Megatron's layers compute on the local tensors. There is no sequence parallel: megatron-core's
local layers (torch's norms) refuse it without TransformerEngine, so replicated parameters (the
norms) get the same gradient on every tensor-parallel rank.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from mmzoo.build import use_text_backend
from mmzoo.distributed.tensor_parallel import LocalForward, check_tensor_parallel
from mmzoo.model import VLModel
from mmzoo.nn import TextDecoder
from mmzoo.nn.tp_layout import GLU_BLOCKS, blocked_glu_order


def use_text_backend_split(model: VLModel, backend: str, tp_mesh: DeviceMesh | None) -> VLModel:
    """:func:`mmzoo.build.use_text_backend`, with Megatron's decoder split over ``tp_mesh`` (the
    mesh's ``tp`` dimension; None: not split) holding this rank's shards of the native weights (a
    decoder on the meta device stays there for a checkpoint to fill)."""
    if backend != "megatron" or tp_mesh is None:
        return use_text_backend(model, backend)
    from mmzoo.nn.megatron_decoder import MegatronTextDecoder

    native = model.text_decoder
    check_tensor_parallel(native, tp_mesh.size())
    megatron = MegatronTextDecoder.empty_like(native, tp_mesh.size())
    hold_as_dtensors(megatron, tp_mesh)
    if not native.output_weight.is_meta:
        copy_own_shards(megatron, native.state_dict())
    model.text_decoder = cast(TextDecoder, megatron)  # the same interface (embed, forward, logits)
    return model


def _placement(module: nn.Module, name: str) -> Placement:
    """Where Megatron puts ``module``'s parameter ``name`` across the tensor-parallel ranks."""
    from megatron.core import tensor_parallel

    if isinstance(module, (tensor_parallel.ColumnParallelLinear, tensor_parallel.VocabParallelEmbedding)):
        return Shard(0)
    if isinstance(module, tensor_parallel.RowParallelLinear) and name == "weight":
        return Shard(1)
    return Replicate()


def hold_as_dtensors(decoder: nn.Module, mesh: DeviceMesh) -> None:
    """Register the parameters of ``decoder`` (a :class:`~mmzoo.nn.megatron_decoder.
    MegatronTextDecoder` split over the 1-D ``tp`` mesh) as DTensors, in place; each module's
    forward still sees its local tensors."""
    for module_name, module in decoder.named_modules():
        placements = {}
        for name, param in list(module.named_parameters(recurse=False)):
            placements[name] = placement = _placement(module, name)
            held = DTensor.from_local(param.data, mesh, [placement], run_check=False)
            module.register_parameter(name, nn.Parameter(held, param.requires_grad))
        if placements:
            LocalForward(module, placements)
        if module_name.endswith("mlp.linear_fc1"):
            setattr(module, GLU_BLOCKS, mesh.size())  # its global rows: [gate_0; up_0; gate_1; ...]


@torch.no_grad()
def copy_own_shards(decoder: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Fill ``decoder``'s DTensor parameters with this rank's shards of the whole tensors ``state``
    (checkpoint order, ``linear_fc1`` as ``[gate; up]``)."""
    for name, param in decoder.named_parameters():
        assert isinstance(param, DTensor), name  # held by hold_as_dtensors
        full = state[name]
        blocks = getattr(decoder.get_submodule(name.rpartition(".")[0]), GLU_BLOCKS, 1)
        if blocks > 1:
            full = full.index_select(0, blocked_glu_order(full.shape[0], blocks).to(full.device))
        (placement,) = param.placements
        local = param.to_local()
        if isinstance(placement, Shard):
            full = full.chunk(param.device_mesh.size(), placement.dim)[param.device_mesh.get_local_rank()]
        local.copy_(full)
