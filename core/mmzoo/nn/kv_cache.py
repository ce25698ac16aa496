"""A key/value cache for generation: one buffer per layer, one row per sequence.

Prefill runs the ordinary packed forward (``cu_seqlens``, same attention kernel as training) and
stores each sequence's rotated keys and values in its row. Decoding then feeds one token per
row: its key/value is written at the row's length and it attends over the row's valid prefix
through SDPA with a length mask, so rows of different prompt lengths need no padding tokens.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values of ``batch`` sequences for every layer of a decoder.

    Args:
        num_layers: decoder layers.
        batch: sequences (rows).
        capacity: most tokens a row holds (prompt + new tokens).
        num_kv_heads: key/value heads per layer.
        head_dim: size of one head.
        dtype: buffer dtype (the model's).
        device: buffer device.
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch, num_kv_heads, capacity, head_dim)  # (B, Hkv, L, D)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.capacity = capacity
        self.decoding = False  # False until the prompts are stored

    def layer(self, index: int) -> LayerCache:
        """The view one attention layer reads and writes."""
        return LayerCache(self, index)

    def advance(self, cu_seqlens: torch.Tensor) -> None:
        """Called once per forward after every layer: prefill sets the lengths, decode adds one."""
        if self.decoding:
            self.lengths += 1
        else:
            self.lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(self.lengths)
            self.decoding = True
        if int(self.lengths.max()) > self.capacity:
            raise ValueError(
                f"KV cache overflow: {int(self.lengths.max())} tokens > capacity {self.capacity}"
            )


class LayerCache:
    """One layer's slice of a :class:`KVCache`."""

    def __init__(self, cache: KVCache, index: int) -> None:
        self.cache = cache
        self.index = index

    @property
    def decoding(self) -> bool:
        return self.cache.decoding

    def store(self, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
        """Prefill: copy packed ``(T, Hkv, D)`` keys/values into the rows ``cu_seqlens`` marks."""
        keys, values = self.cache.keys[self.index], self.cache.values[self.index]
        for row, (start, end) in enumerate(pairwise(cu_seqlens.tolist())):
            keys[row, :, : end - start] = k[start:end].transpose(0, 1)
            values[row, :, : end - start] = v[start:end].transpose(0, 1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Decode: append one token per row (``(B, H, D)`` each) and attend over each row's prefix."""
        keys, values = self.cache.keys[self.index], self.cache.values[self.index]
        lengths = self.cache.lengths
        rows = torch.arange(q.shape[0], device=q.device)
        keys[rows, :, lengths] = k
        values[rows, :, lengths] = v
        span = int(lengths.max()) + 1
        mask = torch.arange(span, device=q.device)[None] <= lengths[:, None]  # (B, span)
        out = F.scaled_dot_product_attention(
            q[:, :, None],  # (B, Hq, 1, D)
            keys[:, :, :span],
            values[:, :, :span],
            attn_mask=mask[:, None, None, :],
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return out[:, :, 0]  # (B, Hq, D)
