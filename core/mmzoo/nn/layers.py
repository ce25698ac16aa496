"""Attention and the pre-norm transformer layer, with Megatron-core parameter names.

Names follow Megatron's local layer spec (``input_layernorm``, ``self_attention.linear_qkv``,
``self_attention.q_layernorm``/``k_layernorm``, ``self_attention.linear_proj``,
``pre_mlp_layernorm``, ``mlp.linear_fc1``, ``mlp.linear_fc2``) so an mm checkpoint is Megatron's
own layout; layer scale is ``ls1``/``ls2`` as in MindSpeed-MM's InternViT. All layers work on
packed tokens ``(T, hidden)`` with ``cu_seqlens``; padding is removed before the first layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import mmzoo_kernels
from mmzoo.nn.norm import NormKind, build_norm

if TYPE_CHECKING:
    from mmzoo.distributed.context_parallel import ContextParallel
    from mmzoo.nn.kv_cache import LayerCache

QKVLayout = Literal["grouped", "stacked"]


class SelfAttention(nn.Module):
    """Multi-head attention with grouped KV heads and one fused QKV projection.

    ``linear_qkv`` rows are laid out as ``qkv_layout`` says:

    - ``"grouped"`` (Megatron's): per KV group ``[q_0 .. q_{r-1}, k, v]`` for each of the
      ``num_kv_heads`` groups (``r = num_heads / num_kv_heads``), each block ``head_dim`` rows;
      with ``num_kv_heads == num_heads`` the per-head ``[q, k, v]`` of a ViT.
    - ``"stacked"``: ``[Q; K; V]``, all query heads, then all key heads, then all value heads
      (transformers' fused ``qkv``, kept as is by MindSpeed-MM's InternViT).

    Args:
        hidden_size, num_heads, num_kv_heads, head_dim: sizes.
        qkv_bias, proj_bias: biases of ``linear_qkv`` and ``linear_proj``.
        causal: mask future tokens (decoders) or not (vision towers).
        qkv_layout: see above.
        qk_norm: ``"rms"`` or ``"layer"`` to normalise queries and keys over their full width
            (``num_heads * head_dim``, before the split into heads) as ``q_layernorm`` and
            ``k_layernorm``; ``None``: no qk-norm.
        qk_norm_eps: its epsilon.
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
        qkv_layout: QKVLayout = "grouped",
        qk_norm: NormKind | None = None,
        qk_norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if qkv_layout not in ("grouped", "stacked"):
            raise ValueError(f"qkv_layout must be 'grouped' or 'stacked', got {qkv_layout!r}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.causal = causal
        self.qkv_layout = qkv_layout
        self.linear_qkv = nn.Linear(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias=qkv_bias)
        self.q_layernorm = None if qk_norm is None else build_norm(qk_norm, num_heads * head_dim, qk_norm_eps)
        self.k_layernorm = (
            None if qk_norm is None else build_norm(qk_norm, num_kv_heads * head_dim, qk_norm_eps)
        )
        self.linear_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=proj_bias)
        self.recompute_core = False  # selective recompute: keep no attention internals for backward
        # Set by mmzoo.distributed.context_parallel: the core then attends over the group's tokens.
        self.context_parallel: ContextParallel | None = None

    def _split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(T, (Hq + 2 Hkv) D)`` -> q ``(T, Hq, D)``, k and v ``(T, Hkv, D)`` (views); the head
        counts are this rank's (a tensor-parallel rank holds whole KV groups)."""
        tokens, d = qkv.shape[0], self.head_dim
        if self.qkv_layout == "stacked":
            q, k, v = qkv.split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
            return q.view(tokens, -1, d), k.view(tokens, -1, d), v.view(tokens, -1, d)
        per_group = self.num_heads // self.num_kv_heads
        # The KV groups this rank holds: all, or 1/tp of them under tensor parallel.
        groups = qkv.shape[-1] // ((per_group + 2) * d)
        grouped = qkv.view(tokens, groups, per_group + 2, d)
        q = grouped[:, :, :per_group].reshape(tokens, groups * per_group, d)  # (T, Hq, D)
        return q, grouped[:, :, per_group], grouped[:, :, per_group + 1]  # k, v: (T, Hkv, D)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        cu_seqlens: torch.Tensor,
        cache: LayerCache | None = None,
    ):
        """``(T, hidden)`` -> ``(T, hidden)``; rotary angles ``cos``/``sin`` ``(T, head_dim)``, or
        ``None`` for none. With a ``cache`` (generation), prefill stores the keys/values; once
        decoding, ``x`` holds one token per cached row."""
        q, k, v = self._split(self.linear_qkv(x))
        tokens = q.shape[0]  # all of them under sequence parallel, where x holds 1/tp
        if self.q_layernorm is not None and self.k_layernorm is not None:
            q = self.q_layernorm(q.reshape(tokens, -1)).view(q.shape)  # over the full width
            k = self.k_layernorm(k.reshape(tokens, -1)).view(k.shape)
        if cos is not None and sin is not None:
            q = mmzoo_kernels.rotary(q, cos, sin)
            k = mmzoo_kernels.rotary(k, cos, sin)
        core = mmzoo_kernels.attention if self.context_parallel is None else self.context_parallel.attention
        if cache is not None and cache.decoding:
            out = cache.attend(q, k, v, self.head_dim**-0.5)
        elif self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(core, q, k, v, cu_seqlens, self.causal, use_reentrant=False)
        else:
            out = core(q, k, v, cu_seqlens, self.causal)  # (T, Hq, D)
            if cache is not None:
                cache.store(k, v, cu_seqlens)
        return self.linear_proj(out.reshape(tokens, q.shape[1] * self.head_dim))  # (T, local heads * D)


class TransformerLayer(nn.Module):
    """Pre-norm block: ``x + ls1 * attn(norm(x))`` then ``x + ls2 * mlp(norm(x))``.

    Args:
        self_attention: the attention (:class:`SelfAttention`).
        mlp: the feed-forward block (:class:`mmzoo.nn.MLP`).
        hidden_size: width of the residual stream.
        eps: epsilon of both norms.
        norm: ``"rms"`` or ``"layer"`` for ``input_layernorm`` and ``pre_mlp_layernorm``.
        layer_scale: initial value of the per-channel scales ``ls1``/``ls2`` on each branch
            (InternViT); ``None``: no layer scale.
    """

    def __init__(
        self,
        *,
        self_attention: nn.Module,
        mlp: nn.Module,
        hidden_size: int,
        eps: float,
        norm: NormKind = "rms",
        layer_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.input_layernorm = build_norm(norm, hidden_size, eps)
        self.self_attention = self_attention
        self.pre_mlp_layernorm = build_norm(norm, hidden_size, eps)
        self.mlp = mlp
        self.layer_scale = layer_scale
        self.ls1 = None if layer_scale is None else nn.Parameter(torch.full((hidden_size,), layer_scale))
        self.ls2 = None if layer_scale is None else nn.Parameter(torch.full((hidden_size,), layer_scale))

    def reset_parameters(self) -> None:
        """Layer scales back to their initial value (the layer's own parameters only)."""
        if self.ls1 is not None and self.ls2 is not None and self.layer_scale is not None:
            nn.init.constant_(self.ls1, self.layer_scale)
            nn.init.constant_(self.ls2, self.layer_scale)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        cu_seqlens: torch.Tensor,
        cache: LayerCache | None = None,
    ):
        attn_in = self.input_layernorm(x)
        attn = (
            self.self_attention(attn_in, cos, sin, cu_seqlens)
            if cache is None
            else self.self_attention(attn_in, cos, sin, cu_seqlens, cache)
        )
        x = x + (attn if self.ls1 is None else attn * self.ls1)
        out = self.mlp(self.pre_mlp_layernorm(x))
        return x + (out if self.ls2 is None else out * self.ls2)
