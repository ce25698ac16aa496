"""Tensor parallel for the LLM: Megatron's layout as DTensor parameters over the mesh's ``tp`` ranks.

Each rank holds exactly its part of an mm checkpoint's TP shard (:mod:`mmzoo.convert.parallel`):

- ``linear_qkv`` column-parallel: rows are grouped per KV group (``[q..., k, v]``), so a row split
  gives each rank whole KV groups and their query heads; attention runs on the local heads.
- ``linear_proj`` and ``linear_fc2`` row-parallel (their outputs summed over ``tp``).
- ``linear_fc1`` column-parallel with rank ``r`` holding ``[gate_r; up_r]``: the model keeps its
  rows in per-rank blocks (:mod:`mmzoo.nn.tp_layout`), so a plain row split is right.
- the embedding and the output layer (or the tied embedding) split along the vocabulary; the
  loss is computed on the vocabulary shards (:func:`mmzoo.loss.vocab_parallel_cross_entropy`).
- norms replicated; they compute on local tensors, so the kernels never see a DTensor.

With ``sequence_parallel`` the packed token stream ``(T, H)`` is split along ``T`` between the
tensor-parallel regions (norms and residuals on ``T / tp`` tokens; all-gather before the column-
parallel linears, reduce-scatter after the row-parallel ones). ``T`` is padded to a multiple of
``tp`` with tokens that form their own sequence and have no target, and the padding is dropped
after the last norm. The vision encoder is not split (see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from mmzoo.errors import MmzooError
from mmzoo.nn.decoder import TextDecoder
from mmzoo.nn.layers import SelfAttention
from mmzoo.nn.mlp import MLP
from mmzoo.nn.recompute import LayerStack
from mmzoo.nn.tp_layout import GLU_BLOCKS, blocked_glu_order


def check_tensor_parallel(decoder: nn.Module, tp: int) -> None:
    """What :func:`mmzoo.distributed.mesh.check_text_decoder` does not cover: the decoder's kind,
    the MLP width and qk-norm (over the full width, which no rank holds).

    Raises:
        MmzooError: one line naming the setting.
    """
    if not isinstance(decoder, TextDecoder):
        raise MmzooError(
            f"parallel.tp={tp}: tensor parallel splits mmzoo's TextDecoder, not {type(decoder).__name__}"
        )
    config = decoder.config
    if config.ffn_hidden_size % tp:
        raise MmzooError(
            f"parallel: the LLM's MLP width ({config.ffn_hidden_size}) is not divisible by parallel.tp={tp}"
        )
    for name, module in decoder.named_modules():
        if isinstance(module, SelfAttention) and module.q_layernorm is not None:
            raise MmzooError(
                f"parallel.tp={tp}: {name} normalises queries and keys over all heads, which no "
                "tensor-parallel rank holds; train it with parallel.tp=1"
            )


class LocalForward:
    """Hands ``module``'s DTensor parameters to its forward as their local tensors, whose gradients
    come back in ``grad_placements`` (parameter name -> placement). They are swapped into the
    parameter dict for the forward only (as torch.func does), then put back."""

    def __init__(self, module: nn.Module, grad_placements: dict[str, Placement]) -> None:
        self.grad_placements = grad_placements
        self.held: dict[str, nn.Parameter | None] = {}
        module.register_forward_pre_hook(self._to_local)
        module.register_forward_hook(self._restore)

    def _to_local(self, module: nn.Module, args: Any) -> None:
        self.held = dict(module._parameters)
        for name, param in self.held.items():
            if isinstance(param, DTensor):
                local = param.to_local(grad_placements=[self.grad_placements[name]])
                module._parameters[name] = local  # type: ignore[assignment]

    def _restore(self, module: nn.Module, args: Any, output: Any) -> None:
        module._parameters.update(self.held)


class _LocalNorm(ParallelStyle):
    """A norm whose parameters are replicated DTensors and whose forward sees local tensors.

    Under sequence parallel each rank normalises its own tokens, so its weight gradient is a
    partial sum: it is marked ``Partial`` and summed over ``tp`` when FSDP reduces it.
    """

    def __init__(self, sequence_parallel: bool) -> None:
        super().__init__()
        self.grad_placement: Placement = Partial() if sequence_parallel else Replicate()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        grads = {}
        for name, param in list(module.named_parameters(recurse=False)):
            replicated = DTensor.from_local(param.data, device_mesh, [Replicate()], run_check=False)
            module.register_parameter(name, nn.Parameter(replicated, param.requires_grad))
            grads[name] = self.grad_placement
        LocalForward(module, grads)
        return module


def _tp_rank(mesh: DeviceMesh) -> tuple[int, int, dist.ProcessGroup]:
    return mesh.get_local_rank(), mesh.size(), mesh.get_group()


def _own_part(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """This rank's ``1/tp`` of the rows of ``x`` (a multiple of ``tp`` rows)."""
    rank, size, _ = _tp_rank(mesh)
    rows = x.shape[0] // size
    return x.narrow(0, rank * rows, rows).contiguous()


class _SplitTokens(torch.autograd.Function):
    """Forward: this rank's ``1/tp`` of the tokens; backward: the gradients of all tokens gathered."""

    @staticmethod
    def forward(ctx, x, mesh):  # type: ignore[override]
        ctx.mesh = mesh
        return _own_part(x, mesh)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _gather(grad, ctx.mesh), None


class _GatherTokens(torch.autograd.Function):
    """Forward: all tokens gathered; backward: this rank's part of the gradient (the loss already
    summed the vocabulary shards' parts, see :func:`mmzoo.loss.vocab_parallel_cross_entropy`)."""

    @staticmethod
    def forward(ctx, x, mesh):  # type: ignore[override]
        ctx.mesh = mesh
        return _gather(x, mesh)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _own_part(grad, ctx.mesh), None


def _gather(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    _, size, group = _tp_rank(mesh)
    out = x.new_empty((x.shape[0] * size, *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


class _SequenceParallel:
    """Hooks on the decoder's layer stack: pad and split the tokens before it, gather after it."""

    def __init__(self, mesh: DeviceMesh) -> None:
        self.mesh, self.tokens = mesh, 0

    def split(self, module: nn.Module, args: tuple) -> tuple:
        x, cos, sin, cu_seqlens, *rest = args
        self.tokens, size = x.shape[0], self.mesh.size()
        pad = -self.tokens % size
        if pad:  # padding tokens: a sequence of their own, no target, dropped in gather
            x, cos, sin = (None if t is None else nn.functional.pad(t, (0, 0, 0, pad)) for t in (x, cos, sin))
            cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor([self.tokens + pad])])
        return (_SplitTokens.apply(x, self.mesh), cos, sin, cu_seqlens, *rest)

    def gather(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return _GatherTokens.apply(output, self.mesh)[: self.tokens]


def _block_fc1(mlp: MLP, tp: int) -> None:
    """Hold ``linear_fc1``'s rows as ``[gate_0; up_0; gate_1; up_1; ...]`` (see :mod:`mmzoo.nn.tp_layout`)."""
    fc1 = mlp.linear_fc1
    order = blocked_glu_order(fc1.out_features, tp).to(fc1.weight.device)
    with torch.no_grad():
        for param in fc1.parameters():
            param.copy_(param.index_select(0, order))
    setattr(fc1, GLU_BLOCKS, tp)


def _layer_plan(layer: nn.Module, tp: int, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    tokens = Shard(0) if sequence_parallel else Replicate()
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, MLP) or not mlp.gated:
        raise MmzooError(f"parallel.tp={tp}: the LLM layers need a gated MLP, got {type(mlp).__name__}")
    _block_fc1(mlp, tp)
    return {
        "input_layernorm": _LocalNorm(sequence_parallel),
        "self_attention.linear_qkv": ColwiseParallel(input_layouts=tokens),
        "self_attention.linear_proj": RowwiseParallel(output_layouts=tokens),
        "pre_mlp_layernorm": _LocalNorm(sequence_parallel),
        "mlp.linear_fc1": ColwiseParallel(input_layouts=tokens),
        "mlp.linear_fc2": RowwiseParallel(output_layouts=tokens),
    }


def apply_tensor_parallel(
    decoder: nn.Module, mesh: DeviceMesh, *, sequence_parallel: bool, stacks: Sequence[nn.Module] = ()
) -> None:
    """Split ``decoder`` (a :class:`~mmzoo.nn.TextDecoder`) over the 1-D ``tp`` mesh, in place,
    before FSDP shards it. Its weights may be real (a random init) or on the meta device.
    ``stacks``: other layer stacks that run the decoder's layers (pipeline stages' views), which
    split and gather the tokens under sequence parallel too."""
    tp = mesh.size()
    check_tensor_parallel(decoder, tp)
    assert isinstance(decoder, TextDecoder)
    stack = decoder.decoder
    assert isinstance(stack, LayerStack)
    for _, layer in stack.indexed():
        parallelize_module(layer, mesh, _layer_plan(layer, tp, sequence_parallel))
    vocab: dict[str, ParallelStyle] = {
        # Vocabulary rows split; ids outside a rank's rows give zeros there, summed over tp.
        "embedding.word_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "decoder.final_layernorm": _LocalNorm(sequence_parallel),
    }
    if decoder.output_layer is not None:  # read as a vocabulary-sharded weight by the loss
        vocab["output_layer"] = ColwiseParallel()
    parallelize_module(decoder, mesh, vocab)
    if sequence_parallel:
        hooks = _SequenceParallel(mesh)
        for runner in (stack, *stacks):
            runner.register_forward_pre_hook(hooks.split)
            runner.register_forward_hook(hooks.gather)
