"""The Qwen2.5-VL plugin: hook implementations only."""

from __future__ import annotations

from mmzoo import ModelSpec, hookimpl
from mmzoo.loss import causal_lm_loss
from mmzoo.nn import TextDecoder

from mmzoo_qwen2_5_vl.config import VARIANTS, config_from_hf
from mmzoo_qwen2_5_vl.mapping import weight_mapping
from mmzoo_qwen2_5_vl.rope_index import position_ids
from mmzoo_qwen2_5_vl.vision import PatchMerger, VisionEncoder

SPECIAL_TOKENS = {
    "pad_token_id": 151643,  # <|endoftext|>
    "im_start_token_id": 151644,
    "eos_token_id": 151645,  # <|im_end|>
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "image_token_id": 151655,
    "video_token_id": 151656,
}


def build_vision_encoder(config):
    return VisionEncoder(config.vision)


def build_projector(config):
    return PatchMerger(config.vision)


def build_text_decoder(config):
    return TextDecoder(config.text)


SPEC = ModelSpec(
    name="qwen2_5_vl",
    description="Qwen2.5-VL: window-attention ViT, PatchMerger, Qwen2 decoder with M-RoPE",
    variants=VARIANTS,
    build_vision_encoder=build_vision_encoder,
    build_projector=build_projector,
    build_text_decoder=build_text_decoder,
    position_ids=position_ids,
    weight_mapping=weight_mapping,
    config_from_hf=config_from_hf,
    loss=causal_lm_loss,
    hf_architectures=("Qwen2_5_VLForConditionalGeneration",),
    special_tokens=SPECIAL_TOKENS,
    freeze_groups={
        "vision": ("vision_encoder.",),
        "projector": ("projector.",),
        "language": ("text_decoder.",),
    },
)


@hookimpl
def mmzoo_register_models(register):
    register(SPEC)
