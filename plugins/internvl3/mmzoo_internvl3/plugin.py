"""The InternVL3 plugin: hook implementations only."""

from __future__ import annotations

from mmzoo import ModelSpec, hookimpl
from mmzoo.loss import causal_lm_loss
from mmzoo.nn import text_position_ids
from mmzoo_internvl3.config import VARIANTS
from mmzoo_internvl3.hf_config import HF_ARCHITECTURE, OPENGVLAB_ARCHITECTURE, config_from_hf, config_to_hf
from mmzoo_internvl3.mapping import weight_mapping
from mmzoo_internvl3.media import build_media_processor
from mmzoo_internvl3.parts import build_text_decoder, example_batch, feature_slots
from mmzoo_internvl3.template import TEMPLATE, default_tokenizer
from mmzoo_internvl3.vision import build_projector, build_vision_encoder

SPEC = ModelSpec(
    name="internvl3",
    description="InternVL3: InternViT on 448-px tiles, pixel shuffle + MLP projector, Qwen2.5 decoder",
    variants=VARIANTS,
    build_vision_encoder=build_vision_encoder,
    build_projector=build_projector,
    build_text_decoder=build_text_decoder,
    position_ids=text_position_ids,
    feature_slots=feature_slots,
    weight_mapping=weight_mapping,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    loss=causal_lm_loss,
    template=TEMPLATE,
    media_processor=build_media_processor,
    default_tokenizer=default_tokenizer,
    example_batch=example_batch,
    hf_architectures=(HF_ARCHITECTURE, OPENGVLAB_ARCHITECTURE),
    freeze_groups={
        "vision": ("image_encoder.encoder.",),
        "projector": ("image_encoder.projector.",),
        "language": ("text_decoder.",),
    },
    mm_converters=("InternVLConverter",),
    # The demo's photos in at most 4 tiles (+ thumbnail) of 16 tokens: a CPU run of a minute or two.
    demo_media={"max_tiles": 4},
)


@hookimpl
def mmzoo_register_models(register):
    register(SPEC)
