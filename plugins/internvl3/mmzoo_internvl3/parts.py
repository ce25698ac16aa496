"""The InternVL3 parts the spec names beside the vision tower: the decoder, where the features go,
and the small batch the generated tests run (positions: ``mmzoo.nn.text_position_ids``, plain 1-D
rope)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mmzoo.nn import TextDecoder
from mmzoo_internvl3.config import InternVL3Config


def build_text_decoder(config: InternVL3Config) -> TextDecoder:
    return TextDecoder(config.text)


def feature_slots(config: InternVL3Config, media: Mapping[str, torch.Tensor]) -> list[tuple[int, int]]:
    """Every tile's tokens fill the ``<IMG_CONTEXT>`` placeholders, in order."""
    return [(config.image_token_id, media["pixel_values"].shape[0] * config.tokens_per_tile)]


def example_batch(config: InternVL3Config, seed: int = 0) -> dict:
    """Text, one image of three tiles (2 x 1 and the thumbnail), more text; the answer trained."""
    g = torch.Generator().manual_seed(seed)
    special = min(config.image_token_id, config.image_start_token_id, config.image_end_token_id)

    def words(n: int) -> list[int]:  # ordinary tokens only: never a placeholder id
        return torch.randint(0, min(special, 1000), (n,), generator=g).tolist()

    tiles = 3
    image = [config.image_start_token_id, *[config.image_token_id] * (tiles * config.tokens_per_tile)]
    ids = words(4) + image + [config.image_end_token_id] + words(6)
    input_ids = torch.tensor([ids])
    labels = input_ids.clone()
    labels[0, : len(ids) - 4] = -100
    size = config.vision.image_size
    pixels = torch.randn(tiles, config.vision.in_channels, size, size, generator=g)
    return {"input_ids": input_ids, "labels": labels, "media": {"pixel_values": pixels}}
