"""Sharding a model over the data-parallel ranks with FSDP2 (``fully_shard``).

Each transformer layer of every tower (the entries of each ``nn.ModuleList`` named ``layers``,
e.g. ViT blocks and LLM layers) becomes one FSDP unit, then the root takes the rest (embeddings,
patch embedding, projector, norms, output layer). Gradients are reduced as sums: each rank's loss
is already scaled by the step's global counts (:mod:`mmzoo.loss`), so the sum over ranks is the
step's loss, exactly as one process computes it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from mmzoo.distributed.env import World


def data_parallel_mesh(world: World, device: torch.device) -> DeviceMesh:
    """A 1-D mesh ``("dp_shard",)`` over every rank."""
    return init_device_mesh(device.type, (world.size,), mesh_dim_names=("dp_shard",))


def mixed_precision(precision: str, device: torch.device) -> MixedPrecisionPolicy | None:
    """bf16 (or fp16) parameters for compute with fp32 gradient reduction on accelerators; on the
    CPU the parameters stay fp32 (autocast still computes in the chosen precision)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None or device.type == "cpu":
        return None
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def layer_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become one FSDP unit each: every entry of an ``nn.ModuleList`` named
    ``layers`` (or of an ``nn.ModuleDict``: a pipeline stage's layers under their global indices)."""
    return [
        layer
        for name, module in model.named_modules()
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)) and name.rpartition(".")[2] == "layers"
        for layer in (module.values() if isinstance(module, nn.ModuleDict) else module)
    ]


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    offload: bool = False,
    reshard_after_forward: bool = True,
) -> None:
    """Apply ``fully_shard`` per layer, then to the root, in place; gradients are summed over ranks.

    Args:
        model: the model, on the meta device or on the device the mesh is on.
        mesh: the data-parallel mesh.
        mp_policy: mixed precision (:func:`mixed_precision`), ``None`` for fp32 throughout.
        offload: keep parameters, gradients and optimizer state in CPU memory between uses.
        reshard_after_forward: free each layer's gathered parameters after its forward.
    """
    policy = mp_policy or MixedPrecisionPolicy()
    # Pinned memory needs an accelerator; on the CPU the offload path runs without it (tests).
    offload_policy = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu") if offload else OffloadPolicy()
    for layer in layer_units(model):
        fully_shard(
            layer,
            mesh=mesh,
            mp_policy=policy,
            offload_policy=offload_policy,
            reshard_after_forward=reshard_after_forward,
        )
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload_policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Sum, never average: gloo has no PREMUL_SUM, so the sum is forced for every backend.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
