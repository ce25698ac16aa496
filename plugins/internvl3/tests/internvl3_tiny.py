"""Tiny random InternVL3 models for the plugin's tests: both ViT styles, a shrunken vocabulary."""

from __future__ import annotations

import dataclasses
import re

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration

from mmzoo.nn import DecoderConfig
from mmzoo.testing import spread_weights_
from mmzoo_internvl3.config import InternVL3Config, VisionConfig
from mmzoo_internvl3.hf_config import config_to_hf

TEXT = DecoderConfig(
    vocab_size=300,
    hidden_size=64,
    ffn_hidden_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    rope_theta=1e6,
    qkv_bias=True,
    tie_word_embeddings=False,
)
# 56-px tiles: 4x4 patches of 14 px, 2x2 tokens after the pixel shuffle.
VIT_300M_STYLE = VisionConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_heads=4, image_size=56)
VIT_6B_STYLE = VisionConfig(
    num_layers=2,
    hidden_size=40,
    ffn_hidden_size=80,
    num_heads=5,  # an odd head count, as the 6B's 25
    norm="rms_norm",
    qkv_bias=False,
    qk_norm=True,
    image_size=56,
)


def tiny_config(vision: VisionConfig = VIT_300M_STYLE, **changes) -> InternVL3Config:
    """Token ids remapped below the 300-token vocabulary."""
    config = InternVL3Config(
        vision, TEXT, image_token_id=299, image_start_token_id=297, image_end_token_id=298
    )
    return dataclasses.replace(config, **changes)


def sample(config, layout: list[int], seed: int = 0) -> dict:
    """``input_ids`` (1, S) and the ``pixel_values`` of its images (text runs at even indices)."""
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    tiles = 0
    for i, n in enumerate(layout):
        if i % 2 == 0:
            ids += torch.randint(0, config.image_start_token_id, (n,), generator=g).tolist()
        else:
            ids += [config.image_start_token_id, *[config.image_token_id] * (n * config.tokens_per_tile)]
            ids.append(config.image_end_token_id)
            tiles += n
    size = config.vision.image_size
    pixels = torch.randn(tiles, 3, size, size, generator=g) if tiles else None
    return {"input_ids": torch.tensor([ids]), "pixel_values": pixels}


def hf_model(config: InternVL3Config, seed: int = 0) -> InternVLForConditionalGeneration:
    """transformers' model for ``config``, weights spread so every part moves the output."""
    torch.manual_seed(seed)
    hf_config = InternVLConfig(**config_to_hf(config))
    hf_config._attn_implementation = "eager"
    model = InternVLForConditionalGeneration(hf_config).eval()
    return spread_weights_(model, seed=seed)


# OpenGVLab's InternVLChatModel names -> transformers' (the renames of transformers' InternVL
# conversion script, applied the other way).
_TO_ORIGINAL = [
    (r"^vision_tower\.", "vision_model."),
    (r"\.encoder\.layer\.", ".encoder.layers."),
    (r"embeddings\.cls_token", "embeddings.class_embedding"),
    (r"embeddings\.position_embeddings", "embeddings.position_embedding"),
    (r"embeddings\.patch_embeddings\.projection", "embeddings.patch_embedding"),
    (r"\.lambda_(\d)", r".ls\1"),
    (r"attention\.projection_layer", "attn.proj"),
    (r"\.attention\.", ".attn."),
    (r"layernorm_before", "norm1"),
    (r"layernorm_after", "norm2"),
    (r"^multi_modal_projector\.layer_norm", "mlp1.0"),
    (r"^multi_modal_projector\.linear_1", "mlp1.1"),
    (r"^multi_modal_projector\.linear_2", "mlp1.3"),
]


def disk_state_dict(model: InternVLForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The model's tensors under the names transformers 5 writes to disk (``vision_tower.*``,
    ``language_model.model.*``, ``language_model.lm_head.weight``, ...)."""
    renames = {
        "model.vision_tower.": "vision_tower.",
        "model.multi_modal_projector.": "multi_modal_projector.",
        "model.language_model.": "language_model.model.",
        "lm_head.": "language_model.lm_head.",
    }
    out = {}
    for name, tensor in model.state_dict().items():
        prefix = next(p for p in renames if name.startswith(p))
        out[renames[prefix] + name[len(prefix) :]] = tensor
    return out


def original_state_dict(model: InternVLForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The same weights in OpenGVLab's layout: renamed, and q/k/v fused into ``attn.qkv``."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in disk_state_dict(model).items():
        for pattern, replacement in _TO_ORIGINAL:
            name = re.sub(pattern, replacement, name)
        out[name] = tensor
    for name in [n for n in out if ".attn.q_proj." in n]:
        parts = [out.pop(name.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
        out[name.replace("q_proj", "qkv")] = torch.cat(parts)
    return out
