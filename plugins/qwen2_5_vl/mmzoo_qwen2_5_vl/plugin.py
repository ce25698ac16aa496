"""The Qwen2.5-VL plugin: hook implementations only."""

from __future__ import annotations

import torch

from mmzoo import ModelSpec, hookimpl
from mmzoo.data.tokenizer import default_qwen_tokenizer
from mmzoo.loss import causal_lm_loss
from mmzoo.nn import TextDecoder
from mmzoo_qwen2_5_vl.config import VARIANTS, config_from_hf, config_to_hf
from mmzoo_qwen2_5_vl.mapping import weight_mapping
from mmzoo_qwen2_5_vl.media import build_media_processor
from mmzoo_qwen2_5_vl.rope_index import position_ids
from mmzoo_qwen2_5_vl.template import TEMPLATE
from mmzoo_qwen2_5_vl.vision import PatchMerger, VisionEncoder


def build_vision_encoder(config):
    return VisionEncoder(config.vision)


def build_projector(config):
    return PatchMerger(config.vision)


def build_text_decoder(config):
    return TextDecoder(config.text)


def feature_slots(config, media) -> list[tuple[int, int]]:
    """The vision tower encodes images, then videos: their merged patches fill the image pads,
    then the video pads."""
    slots = []
    for token_id, grid in (
        (config.image_token_id, "image_grid_thw"),
        (config.video_token_id, "video_grid_thw"),
    ):
        if grid in media:
            slots.append((token_id, int(media[grid].prod(-1).sum()) // config.vision.spatial_merge_size**2))
    return slots


def example_batch(config, seed: int = 0) -> dict:
    """Text, one image (2x2 windows, one partial) and one 2-frame video, with labels."""
    g = torch.Generator().manual_seed(seed)
    vision = config.vision
    image, video = (1, 10, 12), (2, 4, 4)

    def run(token: int, grid: tuple[int, int, int]) -> list[int]:
        count = grid[0] * grid[1] * grid[2] // vision.spatial_merge_size**2
        return [config.vision_start_token_id] + [token] * count + [config.vision_end_token_id]

    special = min(
        config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id
    )

    def words(n: int) -> list[int]:  # ordinary tokens only: never a placeholder id
        return torch.randint(0, min(special, 1000), (n,), generator=g).tolist()

    ids = (
        words(4) + run(config.image_token_id, image) + words(3) + run(config.video_token_id, video) + words(5)
    )
    input_ids = torch.tensor([ids])
    labels = input_ids.clone()
    labels[0, : len(ids) - 5] = -100
    media = {
        "pixel_values": torch.randn(image[0] * image[1] * image[2], vision.patch_dim, generator=g),
        "image_grid_thw": torch.tensor([image]),
        "pixel_values_videos": torch.randn(video[0] * video[1] * video[2], vision.patch_dim, generator=g),
        "video_grid_thw": torch.tensor([video]),
        "second_per_grid_ts": torch.tensor([1.0]),
    }
    return {"input_ids": input_ids, "labels": labels, "media": media}


SPEC = ModelSpec(
    name="qwen2_5_vl",
    description="Qwen2.5-VL: window-attention ViT, PatchMerger, Qwen2 decoder with M-RoPE",
    variants=VARIANTS,
    build_vision_encoder=build_vision_encoder,
    build_projector=build_projector,
    build_text_decoder=build_text_decoder,
    position_ids=position_ids,
    feature_slots=feature_slots,
    weight_mapping=weight_mapping,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    loss=causal_lm_loss,
    template=TEMPLATE,
    media_processor=build_media_processor,
    default_tokenizer=default_qwen_tokenizer,
    example_batch=example_batch,
    hf_architectures=("Qwen2_5_VLForConditionalGeneration",),
    freeze_groups={
        "vision": ("image_encoder.encoder.",),
        "projector": ("image_encoder.projector.",),
        "language": ("text_decoder.",),
    },
    mm_converters=("Qwen2_5_VLConverter",),
    # The bundled demo's photos and video at a few dozen tokens each: a CPU run in about a minute.
    demo_media={
        "max_pixels": 128 * 28 * 28,
        "video_min_pixels": 32 * 28 * 28,
        "video_max_pixels": 64 * 28 * 28,
    },
)


@hookimpl
def mmzoo_register_models(register):
    register(SPEC)
