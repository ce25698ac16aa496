"""The row order a tensor-parallel model holds a gated MLP's ``linear_fc1`` in.

Checkpoints keep ``linear_fc1`` as ``[gate; up]``. Split into ``tp`` row blocks, that would give
rank 0 all of the gate; a tensor-parallel rank ``r`` needs ``[gate_r; up_r]`` (Megatron's
layout). The model therefore holds the rows as ``[gate_0; up_0; gate_1; up_1; ...]`` so that an
even row split gives each rank its pair; whatever reads or writes whole tensors converts with
:func:`held_row_orders` (loading weights, DCP checkpoints).
"""

from __future__ import annotations

import torch
from torch import nn

GLU_BLOCKS = "tp_glu_blocks"  # attribute of an MLP's linear_fc1 held in per-rank blocks


def blocked_glu_order(rows: int, blocks: int) -> torch.Tensor:
    """Indices ``order`` with ``held = canonical[order]`` for ``[gate; up]`` of ``rows`` rows split
    into ``blocks`` per-rank ``[gate_r; up_r]`` blocks."""
    return torch.arange(rows).view(2, blocks, -1).transpose(0, 1).reshape(-1)


def held_row_orders(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> row order (``held = canonical[order]``) of every tensor the model holds
    in another row order than checkpoints; empty when none (no tensor parallel)."""
    orders = {}
    for name, module in model.named_modules():
        blocks = getattr(module, GLU_BLOCKS, 1)
        if blocks > 1:
            for param_name, param in module.named_parameters(recurse=False):
                orders[f"{name}.{param_name}"] = blocked_glu_order(param.shape[0], blocks)
    return orders
