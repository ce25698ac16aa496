"""InternVL3 sizes. Each variant mirrors the ``config.json`` of the OpenGVLab checkpoint it names.

InternVL3-9B is left out: its LLM is InternLM3, not Qwen2.5. Reading and writing HF
``config.json`` files (both key layouts) is in :mod:`mmzoo_internvl3.hf_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mmzoo.convert.qwen2_llm import qwen2_5_decoder
from mmzoo.nn import DecoderConfig

HfLayout = Literal["hf", "opengvlab"]


@dataclass(frozen=True)
class VisionConfig:
    """InternViT (``vision_config``): the 300M style (LayerNorm, q/k/v biases) or the 6B style
    (RMSNorm, qk-norm over the full width, no q/k/v biases). Both have layer scale, a CLS token
    and learned position embeddings for one fixed tile size."""

    num_layers: int = 24
    hidden_size: int = 1024
    ffn_hidden_size: int = 4096
    num_heads: int = 16
    norm: Literal["layer_norm", "rms_norm"] = "layer_norm"
    qkv_bias: bool = True
    qk_norm: bool = False
    eps: float = 1e-6
    image_size: int = 448
    patch_size: int = 14
    in_channels: int = 3

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.norm not in ("layer_norm", "rms_norm"):
            raise ValueError(f"vision norm '{self.norm}' is not supported; use 'layer_norm' or 'rms_norm'")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        """Patches per side of a tile (448 / 14 = 32)."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class InternVL3Config:
    """A whole InternVL3 model: InternViT, the projector, the Qwen2.5 decoder and the token ids.

    Attributes:
        downsample_ratio: pixel-shuffle ratio; 0.5 merges 2x2 patches (1024 -> 256 per tile).
        select_layer: the ViT layer whose output is used; -1 (the last), as in every InternVL3.
        image_token_id: ``<IMG_CONTEXT>``, the placeholder each vision feature replaces.
        image_start_token_id, image_end_token_id: ``<img>`` and ``</img>`` around an image.
        min_dynamic_patch, max_dynamic_patch, use_thumbnail: the tiling of an image.
        max_position_embeddings, dynamic_rope_factor: the LLM's dynamic-NTK rope scaling as
            config.json gives it. It only changes positions past ``max_position_embeddings``;
            mmzoo applies plain rope (identical below that), so these only round-trip.
        hf_layout: the key layout of the HF checkpoint this config came from or is written as:
            ``"hf"`` (transformers' ``InternVLForConditionalGeneration``) or ``"opengvlab"``
            (the original ``InternVLChatModel`` with remote code).
    """

    vision: VisionConfig
    text: DecoderConfig
    downsample_ratio: float = 0.5
    select_layer: int = -1
    image_token_id: int = 151667
    image_start_token_id: int = 151665
    image_end_token_id: int = 151666
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    max_position_embeddings: int = field(default=32768, compare=False)
    dynamic_rope_factor: float | None = field(default=2.0, compare=False)
    hf_layout: HfLayout = field(default="hf", compare=False)

    def __post_init__(self) -> None:
        merge = round(1 / self.downsample_ratio)
        if merge * self.downsample_ratio != 1 or self.vision.grid % merge:
            raise ValueError(
                f"downsample_ratio {self.downsample_ratio} must be 1/k with k dividing the "
                f"{self.vision.grid}-patch tile side"
            )
        if self.select_layer != -1:
            raise ValueError(
                f"select_layer {self.select_layer} is not supported: mmzoo's InternVL3 takes the last "
                "ViT layer's output (select_layer -1), as every InternVL3 checkpoint does"
            )
        if not 1 <= self.min_dynamic_patch <= self.max_dynamic_patch:
            raise ValueError(
                f"min_dynamic_patch {self.min_dynamic_patch} and max_dynamic_patch "
                f"{self.max_dynamic_patch} must satisfy 1 <= min <= max"
            )
        if self.hf_layout not in ("hf", "opengvlab"):
            raise ValueError(f"hf_layout '{self.hf_layout}' is not 'hf' or 'opengvlab'")

    @property
    def merge(self) -> int:
        """Patches merged per side by the pixel shuffle (2)."""
        return round(1 / self.downsample_ratio)

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens one tile becomes: (448/14)^2 * 0.5^2 = 256."""
        return (self.vision.grid // self.merge) ** 2


VOCAB = 151674  # Qwen2.5's 151665 tokens + <img>, </img>, <IMG_CONTEXT>, <quad>, </quad>, <ref>, ...

VIT_300M = VisionConfig()  # InternViT-300M-448px-V2_5
VIT_6B = VisionConfig(  # InternViT-6B-448px-V2_5
    num_layers=45,
    hidden_size=3200,
    ffn_hidden_size=12800,
    num_heads=25,
    norm="rms_norm",
    qkv_bias=False,
    qk_norm=True,
)


def _qwen2_5(layers: int, hidden: int, ffn: int, heads: int, kv_heads: int) -> DecoderConfig:
    # InternVL3 keeps a separate lm_head even where Qwen2.5 ties it (0.5B, 1.5B): InternVL3-1B's
    # config.json has "tie_word_embeddings": false and the 1B/2B parameter counts include lm_head.
    return qwen2_5_decoder(layers, hidden, ffn, heads, kv_heads, vocab=VOCAB, tied=False)


VARIANTS: dict[str, InternVL3Config] = {
    # OpenGVLab/InternVL3-1B: Qwen2.5-0.5B
    "1b": InternVL3Config(VIT_300M, _qwen2_5(24, 896, 4864, 14, 2)),
    # OpenGVLab/InternVL3-2B: Qwen2.5-1.5B
    "2b": InternVL3Config(VIT_300M, _qwen2_5(28, 1536, 8960, 12, 2)),
    # OpenGVLab/InternVL3-8B: Qwen2.5-7B
    "8b": InternVL3Config(VIT_300M, _qwen2_5(28, 3584, 18944, 28, 4)),
    # OpenGVLab/InternVL3-14B: Qwen2.5-14B
    "14b": InternVL3Config(VIT_300M, _qwen2_5(48, 5120, 13824, 40, 8)),
    # OpenGVLab/InternVL3-38B: InternViT-6B + Qwen2.5-32B
    "38b": InternVL3Config(VIT_6B, _qwen2_5(64, 5120, 27648, 40, 8)),
    # OpenGVLab/InternVL3-78B: InternViT-6B + Qwen2.5-72B
    "78b": InternVL3Config(VIT_6B, _qwen2_5(80, 8192, 29568, 64, 8)),
    # Laptop-sized: the real vocabulary and token ids, tied embeddings, 112-px tiles (16 tokens a
    # tile) so the embedded demo trains on a CPU in a minute or two.
    "tiny": InternVL3Config(
        VisionConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_heads=4, image_size=112),
        DecoderConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_hidden_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
            qkv_bias=True,
            tie_word_embeddings=True,
        ),
    ),
}
