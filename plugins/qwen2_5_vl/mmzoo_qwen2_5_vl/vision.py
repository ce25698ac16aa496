"""The Qwen2.5-VL vision tower: patch embedding, 2-D rotary, window attention, PatchMerger."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mmzoo.nn import MLP, LayerStack, RMSNorm, SelfAttention, TransformerLayer
from mmzoo_qwen2_5_vl.config import VisionConfig


def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(h, w) ids of every patch, in the order patches arrive: 2x2 merge blocks row-major.

    Returns:
        ``(N, 2)`` long.
    """
    out = []
    for t, h, w in grid_thw.tolist():
        hpos = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        wpos = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        # patches are ordered (h_block, w_block, h_in, w_in)
        hw = torch.stack([hpos.permute(0, 2, 1, 3).flatten(), wpos.permute(0, 2, 1, 3).flatten()], dim=-1)
        out.append(hw.repeat(t, 1))
    return torch.cat(out)


def window_index(grid_thw: torch.Tensor, merge: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder merge units window by window and give each window's boundaries.

    Args:
        grid_thw: ``(M, 3)`` patch grids.
        merge: spatial merge size (2).
        window: window edge in merge units (112 px / 14 px / 2 = 4).

    Returns:
        ``index`` ``(units,)``: merge-unit order, window-contiguous; ``cu_seqlens`` of the windows
        in patches (partial windows at the right/bottom edges are smaller).
    """
    index, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        units = torch.arange(t * gh * gw).view(t, gh, gw) + offset
        for frame in units:
            for top in range(0, gh, window):
                for left in range(0, gw, window):
                    cell = frame[top : top + window, left : left + window].flatten()
                    index.append(cell)
                    lengths.append(cell.numel() * merge * merge)
        offset += t * gh * gw
    cu = F.pad(torch.tensor(lengths).cumsum(0, dtype=torch.int32), (1, 0))
    return torch.cat(index), cu


def frame_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` for full attention: every frame of every image/video is one sequence."""
    per_frame = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(per_frame.cumsum(0, dtype=torch.int32), (1, 0))


class VisionRotary(nn.Module):
    """2-D rotary: a quarter of the head dim rotates with h, a quarter with w, duplicated."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.head_dim // 2
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, half, 2, dtype=torch.float, device=positions.device) / half)
        )
        freqs = positions[..., None].float() * inv_freq  # (N, 2, D/4)
        freqs = freqs.flatten(1)  # (N, D/2): [h bands, w bands]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (2, 14, 14) over flattened patches, computed as one matmul."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(
            config.in_channels, config.hidden_size, kernel_size=kernel, stride=kernel, bias=False
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.flatten(1)  # (C, 3 * 2 * 14 * 14): same order as a flattened patch
        if pixel_values.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"pixel_values rows must have {weight.shape[1]} values, got {pixel_values.shape[-1]}"
            )
        return pixel_values @ weight.t()


class VisionEncoder(nn.Module):
    """Patches ``(N, 1176)`` + grids ``(M, 3)`` -> patch features ``(N, hidden)`` in input order.

    Blocks in ``fullatt_block_indexes`` attend over whole frames; the rest within 112-px windows.
    Tokens are reordered window-contiguous (at merge-unit granularity) for the blocks and
    restored afterwards, so the projector sees the input order.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.rotary = VisionRotary(config.head_dim, config.rope_theta)
        self.blocks = LayerStack(
            [
                TransformerLayer(
                    self_attention=SelfAttention(
                        config.hidden_size,
                        config.num_heads,
                        config.num_heads,
                        config.head_dim,
                        qkv_bias=True,
                        proj_bias=True,
                        causal=False,
                    ),
                    mlp=MLP(
                        config.hidden_size, config.ffn_hidden_size, bias=True, gated=True, activation="silu"
                    ),
                    hidden_size=config.hidden_size,
                    eps=config.rms_norm_eps,
                )
                for _ in range(config.depth)
            ]
        )

    def forward(self, media: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Features ``(patches, C)`` of the media batch's images, then its videos (one call)."""
        parts = [
            (media[pixels], media[grid])
            for pixels, grid in (
                ("pixel_values", "image_grid_thw"),
                ("pixel_values_videos", "video_grid_thw"),
            )
            if pixels in media
        ]
        if not parts:
            raise ValueError("the media batch holds neither pixel_values nor pixel_values_videos")
        if len(parts) == 1:
            return self.encode(*parts[0])
        return self.encode(torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts]))

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Features ``(patches, C)`` of patch rows ``pixel_values`` laid out by ``grid_thw`` ``(M, 3)``."""
        config = self.config
        grid_thw = grid_thw.cpu()
        expected = int(grid_thw.prod(-1).sum())
        if pixel_values.shape[0] != expected:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} patches but grid_thw describes {expected}"
            )
        x = self.patch_embed(pixel_values)
        tokens, width = x.shape
        unit = config.spatial_merge_size**2
        order, cu_window = window_index(
            grid_thw,
            config.spatial_merge_size,
            config.window_size // config.patch_size // config.spatial_merge_size,
        )
        cu_full = frame_seqlens(grid_thw)
        device = x.device
        order, cu_window, cu_full = order.to(device), cu_window.to(device), cu_full.to(device)

        def to_windows(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.view(tokens // unit, unit, -1)[order].view(tokens, -1)

        cos, sin = self.rotary(patch_positions(grid_thw, config.spatial_merge_size).to(device), x.dtype)
        x, cos, sin = to_windows(x), to_windows(cos), to_windows(sin)
        full = set(config.fullatt_block_indexes)
        x = self.blocks.run(x, lambda i, layer, x: layer(x, cos, sin, cu_full if i in full else cu_window))
        restore = torch.argsort(order)
        return x.view(tokens // unit, unit, width)[restore].view(tokens, width)


class PatchMerger(nn.Module):
    """RMSNorm, 2x2 neighbouring patches concatenated, then the MLP (``encoder``, as MindSpeed-MM
    names it) to LLM width."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        merged = config.hidden_size * config.spatial_merge_size**2
        self.merged = merged
        self.layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Linear -> GELU -> Linear (``linear_fc1``, ``linear_fc2``)
        self.encoder = MLP(
            merged, merged, bias=True, gated=False, activation="gelu", out_size=config.out_hidden_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.layernorm(x).view(-1, self.merged))  # (N / 4, 4 * C)
