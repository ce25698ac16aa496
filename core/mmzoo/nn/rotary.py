"""Rotary angles for text decoders: plain 1-D positions or multimodal (M-RoPE) sections."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def text_position_ids(
    config: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    media: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The ``ModelSpec.position_ids`` of a family with plain 1-D rotary: one row ``(1, B, S)`` in
    which each row's real tokens count from 0 (media tokens too) and padding gets 0."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    return ((mask.cumsum(-1) - 1).clamp(min=0) * mask)[None]


class RotaryEmbedding(nn.Module):
    """Turns position ids into ``cos``/``sin`` of shape ``(T, head_dim)`` (half-split layout).

    Position ids have shape ``(rows, T)``: one row for plain rotary, three rows (t, h, w) for
    M-RoPE, where frequency band ``i`` of section ``j`` of ``mrope_section`` takes its angle from
    row ``j % 3``.
    """

    def __init__(self, head_dim: int, theta: float, mrope_section: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if mrope_section is not None and sum(mrope_section) != head_dim // 2:
            raise ValueError(f"sum(mrope_section)={sum(mrope_section)} must equal head_dim/2={head_dim // 2}")
        self.mrope_section = tuple(mrope_section) if mrope_section else None
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Computed per call (no buffer) so a model built on the meta device needs no re-init.
        steps = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=position_ids.device)
        inv_freq = 1.0 / (self.theta ** (steps / self.head_dim))
        freqs = position_ids[..., None].float() * inv_freq  # (rows, T, D/2)
        if self.mrope_section is not None:
            if position_ids.shape[0] != 3:
                raise ValueError(f"M-RoPE needs 3 position rows (t, h, w), got {position_ids.shape[0]}")
            bands = freqs.split(self.mrope_section, dim=-1)
            freqs = torch.cat([band[i % 3] for i, band in enumerate(bands)], dim=-1)  # (T, D/2)
        else:
            freqs = freqs[0]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)
