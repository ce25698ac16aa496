"""A decoder-only language model with Megatron GPTModel names (GQA, SwiGLU, RMSNorm, rotary)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmzoo.nn.kv_cache import KVCache
from mmzoo.nn.layers import SelfAttention, TransformerLayer
from mmzoo.nn.mlp import MLP
from mmzoo.nn.norm import RMSNorm
from mmzoo.nn.recompute import LayerStack
from mmzoo.nn.rotary import RotaryEmbedding


@dataclass(frozen=True)
class DecoderConfig:
    """Sizes of a GQA decoder. ``mrope_section`` set means multimodal rotary (3 position rows)."""

    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True
    tie_word_embeddings: bool = False
    mrope_section: tuple[int, ...] | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class _Embedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)


class TextDecoder(nn.Module):
    """``embedding`` -> ``decoder.layers`` -> ``decoder.final_layernorm`` -> ``output_layer``.

    Works on packed tokens: ``forward(embeds (T, H), position_ids (rows, T), cu_seqlens)``
    returns hidden states ``(T, H)``; :meth:`logits` applies the output layer (the tied
    embedding when ``tie_word_embeddings``).
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = _Embedding(config.vocab_size, config.hidden_size)
        layers = [
            TransformerLayer(
                self_attention=SelfAttention(
                    config.hidden_size,
                    config.num_heads,
                    config.num_kv_heads,
                    config.head_dim,
                    qkv_bias=config.qkv_bias,
                    proj_bias=False,
                    causal=True,
                ),
                mlp=MLP(
                    config.hidden_size, config.ffn_hidden_size, bias=False, gated=True, activation="silu"
                ),
                hidden_size=config.hidden_size,
                eps=config.rms_norm_eps,
            )
            for _ in range(config.num_layers)
        ]
        self.decoder = LayerStack(layers, final_layernorm=RMSNorm(config.hidden_size, config.rms_norm_eps))
        self.output_layer = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.mrope_section)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding.word_embeddings(input_ids)

    def forward(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Hidden states ``(T, H)``; with a ``cache``, prefill fills it and decode reads it
        (one token per row, ``cu_seqlens`` = ``0..B``)."""
        cos, sin = self.rotary(position_ids, embeds.dtype)
        if cache is None:
            return self.decoder(embeds, cos, sin, cu_seqlens)
        # Generation runs without gradients, so nothing is recomputed (which would store twice).
        x = self.decoder.run(embeds, lambda i, layer, x: layer(x, cos, sin, cu_seqlens, cache.layer(i)))
        cache.advance(cu_seqlens)
        return x

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` rows of up to ``capacity`` tokens."""
        config = self.config
        weight = self.embedding.word_embeddings.weight
        return KVCache(
            config.num_layers,
            batch,
            capacity,
            config.num_kv_heads,
            config.head_dim,
            dtype=weight.dtype,
            device=weight.device,
        )

    @property
    def output_weight(self) -> torch.Tensor:
        """``(V, H)``: the output layer, or the embedding when tied."""
        return (
            self.embedding.word_embeddings.weight if self.output_layer is None else self.output_layer.weight
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.output_weight.t()
