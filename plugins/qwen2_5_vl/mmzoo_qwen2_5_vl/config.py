"""Qwen2.5-VL sizes. Each variant mirrors the ``config.json`` of the published checkpoint it names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mmzoo.convert.qwen2_llm import decoder_config_from_hf, decoder_config_to_hf, qwen2_5_decoder
from mmzoo.nn import DecoderConfig


@dataclass(frozen=True)
class VisionConfig:
    """The ViT and its PatchMerger (``vision_config`` in HF config.json)."""

    depth: int = 32
    hidden_size: int = 1280
    ffn_hidden_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    window_size: int = 112
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    tokens_per_second: int = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ValueError(
                f"vision window_size {self.window_size} must be a multiple of "
                f"patch_size * spatial_merge_size = {self.patch_size * self.spatial_merge_size}"
            )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"vision fullatt_block_indexes {bad} are outside 0..{self.depth - 1}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: channels x temporal patch x patch x patch (1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True)
class Qwen2_5_VLConfig:
    """A whole Qwen2.5-VL model: vision tower, text decoder and the placeholder token ids."""

    vision: VisionConfig
    text: DecoderConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self) -> None:
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(
                f"vision out_hidden_size {self.vision.out_hidden_size} must equal text hidden_size "
                f"{self.text.hidden_size}"
            )


MROPE_SECTION = (16, 24, 24)


def _text(layers, hidden, ffn, heads, kv_heads, vocab, tied) -> DecoderConfig:
    return qwen2_5_decoder(
        layers, hidden, ffn, heads, kv_heads, vocab=vocab, tied=tied, mrope_section=MROPE_SECTION
    )


VARIANTS: dict[str, Qwen2_5_VLConfig] = {
    # Qwen/Qwen2.5-VL-3B-Instruct
    "3b": Qwen2_5_VLConfig(VisionConfig(out_hidden_size=2048), _text(36, 2048, 11008, 16, 2, 151936, True)),
    # Qwen/Qwen2.5-VL-7B-Instruct
    "7b": Qwen2_5_VLConfig(VisionConfig(out_hidden_size=3584), _text(28, 3584, 18944, 28, 4, 152064, False)),
    # Qwen/Qwen2.5-VL-32B-Instruct
    "32b": Qwen2_5_VLConfig(
        VisionConfig(ffn_hidden_size=3456, out_hidden_size=5120), _text(64, 5120, 27648, 40, 8, 152064, False)
    ),
    # Qwen/Qwen2.5-VL-72B-Instruct
    "72b": Qwen2_5_VLConfig(
        VisionConfig(ffn_hidden_size=3456, out_hidden_size=8192), _text(80, 8192, 29568, 64, 8, 152064, False)
    ),
    # Laptop-sized, real vocabulary and token ids: the embedded default and the tests.
    "tiny": Qwen2_5_VLConfig(
        VisionConfig(
            depth=4,
            hidden_size=64,
            ffn_hidden_size=128,
            num_heads=4,
            out_hidden_size=64,
            fullatt_block_indexes=(1, 3),
        ),
        DecoderConfig(
            vocab_size=151936,
            hidden_size=64,
            ffn_hidden_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
            qkv_bias=True,
            tie_word_embeddings=True,
            mrope_section=(2, 3, 3),
        ),
    ),
}


def _get(d: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if key in d and d[key] is not None:
            return d[key]
    return default


def config_from_hf(hf: dict[str, Any]) -> Qwen2_5_VLConfig:
    """Read an HF ``config.json`` dict (nested ``text_config`` or the older flat form)."""
    text = dict(hf.get("text_config") or {})
    for key, value in hf.items():  # older checkpoints keep text fields at the top level
        text.setdefault(key, value)
    vision = hf.get("vision_config") or {}
    act = vision.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"vision hidden_act '{act}' is not supported (Qwen2.5-VL uses silu)")
    tied = bool(hf.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
    decoder = decoder_config_from_hf(text, tie_word_embeddings=tied)
    if decoder.mrope_section is None:
        decoder = dataclasses.replace(decoder, mrope_section=MROPE_SECTION)
    vision_rope = vision.get("rope_parameters") or {}
    return Qwen2_5_VLConfig(
        vision=VisionConfig(
            depth=_get(vision, "depth", "num_hidden_layers", default=32),
            hidden_size=_get(vision, "hidden_size", "embed_dim", default=1280),
            ffn_hidden_size=_get(vision, "intermediate_size", default=3420),
            num_heads=_get(vision, "num_heads", "num_attention_heads", default=16),
            out_hidden_size=_get(vision, "out_hidden_size", default=text["hidden_size"]),
            fullatt_block_indexes=tuple(_get(vision, "fullatt_block_indexes", default=(7, 15, 23, 31))),
            window_size=_get(vision, "window_size", default=112),
            patch_size=_get(vision, "patch_size", default=14),
            temporal_patch_size=_get(vision, "temporal_patch_size", default=2),
            spatial_merge_size=_get(vision, "spatial_merge_size", default=2),
            in_channels=_get(vision, "in_channels", "in_chans", default=3),
            tokens_per_second=_get(vision, "tokens_per_second", default=2),
            rope_theta=_get(vision_rope, "rope_theta", default=10000.0),
        ),
        text=decoder,
        image_token_id=_get(hf, "image_token_id", default=151655),
        video_token_id=_get(hf, "video_token_id", default=151656),
        vision_start_token_id=_get(hf, "vision_start_token_id", default=151652),
        vision_end_token_id=_get(hf, "vision_end_token_id", default=151653),
    )


def config_to_hf(config: Qwen2_5_VLConfig) -> dict[str, Any]:
    """The HF ``config.json`` dict (transformers 5.x nested form) for ``config``.

    ``config_from_hf(config_to_hf(c)) == c``. The ``dtype`` key is left to the writer
    (:func:`mmzoo.checkpoint.hf_export.save_hf`), which knows the dtype of the weights.

    Raises:
        ValueError: a value transformers' Qwen2.5-VL cannot express (it fixes the vision
            RMSNorm eps at 1e-6 and always has q/k/v biases in the text decoder).
    """
    vision_config = _vision_to_hf(config.vision)
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id,
        "tie_word_embeddings": config.text.tie_word_embeddings,
        "text_config": _text_to_hf(config.text),
        "vision_config": vision_config,
    }


def _text_to_hf(text: DecoderConfig) -> dict[str, Any]:
    if text.mrope_section is None:
        raise ValueError("text mrope_section is None; Qwen2.5-VL needs multimodal rotary sections")
    # As the published checkpoints; default rope ignores it.
    return decoder_config_to_hf(text, model_type="qwen2_5_vl_text", max_position_embeddings=128000)


def _vision_to_hf(vision: VisionConfig) -> dict[str, Any]:
    if vision.rms_norm_eps != 1e-6:
        raise ValueError(
            f"vision rms_norm_eps {vision.rms_norm_eps} cannot be exported: transformers fixes it at 1e-6"
        )
    return {
        "model_type": "qwen2_5_vl_vision",
        "depth": vision.depth,
        "hidden_size": vision.hidden_size,
        "intermediate_size": vision.ffn_hidden_size,
        "num_heads": vision.num_heads,
        "out_hidden_size": vision.out_hidden_size,
        "fullatt_block_indexes": list(vision.fullatt_block_indexes),
        "window_size": vision.window_size,
        "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "spatial_merge_size": vision.spatial_merge_size,
        "in_channels": vision.in_channels,
        "tokens_per_second": vision.tokens_per_second,
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "axial", "rope_theta": vision.rope_theta},
    }
