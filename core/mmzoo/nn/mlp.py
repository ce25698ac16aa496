"""Feed-forward blocks: gated (SwiGLU, ``linear_fc1`` = ``[gate; up]``) or plain with a named activation."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import mmzoo_kernels


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": mmzoo_kernels.gelu,  # exact (the normal CDF)
    "gelu_tanh": lambda x: mmzoo_kernels.gelu(x, "tanh"),
    "quick_gelu": _quick_gelu,
    "silu": F.silu,
    "relu": F.relu,
}
# transformers' ``hidden_act`` names for the same functions.
ACTIVATION_ALIASES = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "swish": "silu"}


def activation_name(name: str) -> str:
    """The canonical name (a key of :data:`ACTIVATIONS`) of ``name`` or its transformers alias."""
    name = ACTIVATION_ALIASES.get(name, name)
    if name not in ACTIVATIONS:
        known = [*ACTIVATIONS, *ACTIVATION_ALIASES]
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(known)}")
    return name


class MLP(nn.Module):
    """``linear_fc2(act(linear_fc1(x)))``; gated: ``linear_fc1`` holds ``[gate; up]`` stacked
    along its output and the hidden is ``act(gate) * up`` (SwiGLU with ``silu``).

    Args:
        hidden_size: input width (and output width unless ``out_size``).
        ffn_hidden_size: hidden width (of each of gate and up when gated).
        bias: biases on both linears.
        gated: gated (GLU) or plain.
        activation: a key of :data:`ACTIVATIONS` or a transformers alias of one.
        out_size: output width when it differs from ``hidden_size`` (a projector).
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        *,
        bias: bool,
        gated: bool,
        activation: str,
        out_size: int | None = None,
    ) -> None:
        super().__init__()
        self.gated = gated
        self.activation = activation_name(activation)
        fc1_out = 2 * ffn_hidden_size if gated else ffn_hidden_size
        self.linear_fc1 = nn.Linear(hidden_size, fc1_out, bias=bias)
        self.linear_fc2 = nn.Linear(ffn_hidden_size, out_size or hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(x)
        if not self.gated:
            h = ACTIVATIONS[self.activation](h)
        elif self.activation == "silu":
            h = mmzoo_kernels.swiglu(h)
        else:
            gate, up = h.chunk(2, dim=-1)
            h = ACTIVATIONS[self.activation](gate) * up
        return self.linear_fc2(h)

    def extra_repr(self) -> str:
        return f"gated={self.gated}, activation={self.activation}"
