"""InternViT, the pixel shuffle and InternVL's projector, built from ``mmzoo.nn`` blocks.

Module names give MindSpeed-MM's mm names: the tower is mounted at ``image_encoder.encoder``
(``embeddings.*``, ``encoder.layers.N.*``), the projector at ``image_encoder.projector``
(``norm``, ``linear_fc1``, ``linear_fc2``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mmzoo.nn import MLP, LayerNorm, LayerStack, NormKind, SelfAttention, TransformerLayer
from mmzoo_internvl3.config import InternVL3Config, VisionConfig

# InternViT's layer-scale init (transformers' layer_scale_init_value); checkpoints overwrite it.
LAYER_SCALE_INIT = 0.1
# The projector's LayerNorm is torch's default in both reference implementations.
PROJECTOR_NORM_EPS = 1e-5


class Embeddings(nn.Module):
    """Patch embedding (14x14 conv with bias), a CLS token first, learned positions for one tile size."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        width, patch = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, width))
        self.patch_embedding = nn.Conv2d(config.in_channels, width, kernel_size=patch, stride=patch)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.grid**2 + 1, width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The class token and positions normal(0, 0.02), as the Linear and Conv weights (random
        init; checkpoints overwrite them). The patch convolution is initialised by its type."""
        nn.init.normal_(self.class_embedding, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` tiles -> ``(N, 1 + (S/14)^2, C)``."""
        size = self.position_embedding.shape[1] - 1
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # (N, grid*grid, C), row-major
        if patches.shape[1] != size:
            raise ValueError(
                f"pixel_values tiles of {tuple(pixel_values.shape[2:])} px give {patches.shape[1]} patches, "
                f"but the position embedding has {size}: tiles must be the ViT's image size"
            )
        cls = self.class_embedding.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding


def vit_layer(config: VisionConfig) -> TransformerLayer:
    """One InternViT block: 300M style (LayerNorm, q/k/v biases) or 6B style (RMSNorm, qk-norm)."""
    width, heads = config.hidden_size, config.num_heads
    norm: NormKind = "layer" if config.norm == "layer_norm" else "rms"
    return TransformerLayer(
        self_attention=SelfAttention(
            width,
            heads,
            heads,
            config.head_dim,
            qkv_bias=config.qkv_bias,
            proj_bias=True,
            causal=False,
            qkv_layout="stacked",  # HF's fused [Q; K; V], MindSpeed-MM's InternViT linear_qkv
            qk_norm="rms" if config.qk_norm else None,
            qk_norm_eps=config.eps,
        ),
        mlp=MLP(width, config.ffn_hidden_size, bias=True, gated=False, activation="gelu"),
        hidden_size=width,
        eps=config.eps,
        norm=norm,
        layer_scale=LAYER_SCALE_INIT,
    )


def pixel_shuffle(features: torch.Tensor, grid: int, merge: int) -> torch.Tensor:
    """Merge each ``merge x merge`` block of patches into one token, channels in the block's
    row-major order (InternVL's ``pixel_shuffle`` v2).

    Args:
        features: ``(N, grid * grid, C)`` patch features, row-major.

    Returns:
        ``(N * (grid / merge)^2, merge^2 * C)``, tiles in order, tokens row-major.
    """
    n, _, width = features.shape
    side = grid // merge
    blocks = features.reshape(n, side, merge, side, merge, width)  # (N, row, r, col, s, C)
    return blocks.permute(0, 1, 3, 2, 4, 5).reshape(n * side * side, merge * merge * width)


class InternViT(nn.Module):
    """Tiles -> pixel-shuffled features of the last layer, CLS dropped.

    ``forward(media)`` takes the media batch (``pixel_values`` ``(N, 3, 448, 448)``) and returns
    ``(N * 256, 4C)``: each tile attends within itself (one packed sequence per tile).
    """

    def __init__(self, config: InternVL3Config) -> None:
        super().__init__()
        self.grid, self.merge = config.vision.grid, config.merge
        self.embeddings = Embeddings(config.vision)
        self.encoder = LayerStack([vit_layer(config.vision) for _ in range(config.vision.num_layers)])

    def forward(self, media: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = self.embeddings(media["pixel_values"])  # (N, 1 + P, C)
        tiles, tokens, width = x.shape
        cu_seqlens = torch.arange(tiles + 1, device=x.device, dtype=torch.int32) * tokens
        x = self.encoder(x.reshape(tiles * tokens, width), None, None, cu_seqlens)
        return pixel_shuffle(x.view(tiles, tokens, width)[:, 1:], self.grid, self.merge)


class Projector(MLP):
    """LayerNorm(4C) -> Linear -> GELU -> Linear to the LLM width (InternVL's ``mlp1``)."""

    def __init__(self, config: InternVL3Config) -> None:
        merged, hidden = config.vision.hidden_size * config.merge**2, config.text.hidden_size
        super().__init__(merged, hidden, bias=True, gated=False, activation="gelu", out_size=hidden)
        self.norm = LayerNorm(merged, PROJECTOR_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(tokens, 4C)`` -> ``(tokens, hidden)``."""
        return super().forward(self.norm(x))


def build_vision_encoder(config: InternVL3Config) -> InternViT:
    return InternViT(config)


def build_projector(config: InternVL3Config) -> Projector:
    return Projector(config)
