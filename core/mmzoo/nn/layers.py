"""Transformer building blocks with Megatron-core parameter names and fused layouts.

Names follow Megatron's local layer spec (``input_layernorm``, ``self_attention.linear_qkv``,
``self_attention.linear_proj``, ``pre_mlp_layernorm``, ``mlp.linear_fc1``, ``mlp.linear_fc2``) so
an mm checkpoint is Megatron's own layout. All layers work on packed tokens ``(T, hidden)``
with ``cu_seqlens``; padding is removed before the first layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import mmzoo_kernels

if TYPE_CHECKING:
    from mmzoo.nn.kv_cache import LayerCache


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mmzoo_kernels.rms_norm(x, self.weight, self.eps)


class SelfAttention(nn.Module):
    """Multi-head attention with grouped KV heads and a fused, group-interleaved QKV projection.

    ``linear_qkv`` rows are laid out per KV group: ``[q_0 .. q_{r-1}, k, v]`` for each of the
    ``num_kv_heads`` groups (``r = num_heads / num_kv_heads`` query heads per group), each block
    ``head_dim`` rows. With ``num_kv_heads == num_heads`` this is the per-head ``[q, k, v]``
    layout of a ViT.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool,
        proj_bias: bool,
        causal: bool,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.causal = causal
        self.linear_qkv = nn.Linear(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias=qkv_bias)
        self.linear_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=proj_bias)
        self.recompute_core = False  # selective recompute: keep no attention internals for backward

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor,
        cache: LayerCache | None = None,
    ):
        """``(T, hidden)`` -> ``(T, hidden)``. With a ``cache`` (generation), prefill stores the
        keys/values; once decoding, ``x`` holds one token per cached row."""
        tokens = x.shape[0]
        per_group = self.num_heads // self.num_kv_heads
        qkv = self.linear_qkv(x).view(tokens, self.num_kv_heads, per_group + 2, self.head_dim)
        q = qkv[:, :, :per_group].reshape(tokens, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = qkv[:, :, per_group]  # (T, Hkv, D)
        v = qkv[:, :, per_group + 1]
        q = mmzoo_kernels.rotary(q, cos, sin)
        k = mmzoo_kernels.rotary(k, cos, sin)
        if cache is not None and cache.decoding:
            out = cache.attend(q, k, v, self.head_dim**-0.5)
        elif self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(mmzoo_kernels.attention, q, k, v, cu_seqlens, self.causal, use_reentrant=False)
        else:
            out = mmzoo_kernels.attention(q, k, v, cu_seqlens, self.causal)  # (T, Hq, D)
            if cache is not None:
                cache.store(k, v, cu_seqlens)
        return self.linear_proj(out.reshape(tokens, self.num_heads * self.head_dim))


class GatedMLP(nn.Module):
    """SwiGLU MLP; ``linear_fc1`` holds ``[gate; up]`` stacked along the output dimension."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, *, bias: bool) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(hidden_size, 2 * ffn_hidden_size, bias=bias)
        self.linear_fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(mmzoo_kernels.swiglu(self.linear_fc1(x)))


class TransformerLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, *, self_attention: nn.Module, mlp: nn.Module, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.self_attention = self_attention
        self.pre_mlp_layernorm = RMSNorm(hidden_size, eps)
        self.mlp = mlp

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor,
        cache: LayerCache | None = None,
    ):
        attn_in = self.input_layernorm(x)
        attn = (
            self.self_attention(attn_in, cos, sin, cu_seqlens)
            if cache is None
            else self.self_attention(attn_in, cos, sin, cu_seqlens, cache)
        )
        x = x + attn
        return x + self.mlp(self.pre_mlp_layernorm(x))
