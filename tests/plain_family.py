"""A throwaway family built only from the core's parts and protocols: a LayerNorm ViT on fixed
28-pixel images (four 14-pixel patches, one LLM token each), an MLP projector and the core's text
decoder with plain 1-D rotary positions. Nothing in it is Qwen2.5-VL's; tests install it as a
plugin (``throwaway_plugin.install``) to show a new family needs no change to the core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from throwaway_plugin import installed_family
from torch import nn

import mmzoo
from mmzoo.convert.mapping import Rule, WeightMapping
from mmzoo.data.media import load_image
from mmzoo.data.template import ChatTemplate
from mmzoo.data.tokenizer import default_qwen_tokenizer
from mmzoo.errors import MmzooError
from mmzoo.loss import causal_lm_loss
from mmzoo.nn import (
    MLP,
    DecoderConfig,
    LayerNorm,
    LayerStack,
    SelfAttention,
    TextDecoder,
    TransformerLayer,
    text_position_ids,
)
from mmzoo.protocols import MediaItem

NAME = "plain_vl"
IMAGE_TOKEN = 151655  # a special token of the Qwen vocabulary the demo data never types
SIZE, PATCH = 28, 14


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2


@dataclass(frozen=True)
class PlainConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: DecoderConfig = field(
        default_factory=lambda: DecoderConfig(
            vocab_size=151936,
            hidden_size=32,
            ffn_hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            tie_word_embeddings=True,
        )
    )


class PlainViT(nn.Module):
    """Patch embedding, LayerNorm transformer layers without rotary (bidirectional), final norm."""

    def __init__(self, config: PlainConfig) -> None:
        super().__init__()
        c = config.vision
        self.patch_embed = nn.Linear(3 * PATCH * PATCH, c.hidden_size)
        self.position = nn.Parameter(torch.zeros((SIZE // PATCH) ** 2, c.hidden_size))
        head_dim = c.hidden_size // c.num_heads
        layers = [
            TransformerLayer(
                self_attention=SelfAttention(
                    c.hidden_size,
                    c.num_heads,
                    c.num_heads,
                    head_dim,
                    qkv_bias=True,
                    proj_bias=True,
                    causal=False,
                ),
                mlp=MLP(c.hidden_size, 2 * c.hidden_size, bias=True, gated=False, activation="gelu"),
                hidden_size=c.hidden_size,
                eps=1e-6,
                norm="layer",
            )
            for _ in range(c.num_layers)
        ]
        self.encoder = LayerStack(layers, final_layernorm=LayerNorm(c.hidden_size))

    def forward(self, media: dict[str, torch.Tensor]) -> torch.Tensor:
        pixels = media["pixel_values"].to(self.patch_embed.weight.dtype)  # (N, 3, 28, 28)
        n = pixels.shape[0]
        patches = pixels.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # (N, 3, 2, 2, 14, 14)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(n, -1, 3 * PATCH * PATCH)
        x = (self.patch_embed(patches) + self.position).flatten(0, 1)  # (N * 4, C)
        per_image = torch.arange(0, x.shape[0] + 1, patches.shape[1], dtype=torch.int32, device=x.device)
        return self.encoder(x, None, None, per_image)


class PlainProcessor:
    """Images resized to 28x28; each of their four patches becomes one ``IMAGE_TOKEN``."""

    media_keys = ("pixel_values",)
    feature_token_ids = frozenset({IMAGE_TOKEN})

    def __init__(self, config: PlainConfig) -> None:
        self.config = config

    def prepare_image(self, path: Any) -> MediaItem:
        image = load_image(path).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        return MediaItem("image", np.asarray(image, dtype=np.uint8)[None])

    def prepare_video(self, path: Any) -> MediaItem:
        raise MmzooError(f"{path}: {NAME} reads no videos")

    def num_tokens(self, item: MediaItem) -> int:
        return (SIZE // PATCH) ** 2

    def expand(self, item: MediaItem) -> list[int]:
        return [IMAGE_TOKEN] * self.num_tokens(item)

    def info_tensors(self, items: list[MediaItem]) -> dict[str, torch.Tensor]:
        return {}

    def tensors(self, items: list[MediaItem]) -> dict[str, torch.Tensor]:
        frames = np.concatenate([item.frames for item in items])  # (N, 28, 28, 3)
        return {"pixel_values": torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1}

    def dummy(self) -> MediaItem:
        return MediaItem("image", np.zeros((1, SIZE, SIZE, 3), dtype=np.uint8))


def feature_slots(config, media) -> list[tuple[int, int]]:
    return [(IMAGE_TOKEN, media["pixel_values"].shape[0] * (SIZE // PATCH) ** 2)]


def weight_mapping(config: PlainConfig) -> WeightMapping:
    """Every parameter under its own name; layers grouped so pipeline splits know the stacks."""
    table = []
    for name in mmzoo.build.compose(mmzoo.get_model(NAME), config).to("meta").state_dict():
        for prefix, group in (
            ("image_encoder.encoder.encoder.layers.", "vision"),
            ("text_decoder.decoder.layers.", "text"),
        ):
            if name.startswith(prefix):
                index, rest = name[len(prefix) :].split(".", 1)
                if index == "0":
                    template = f"{prefix}{{i}}.{rest}"
                    table.append(Rule(template, (template,), layers=group))
                break
        else:
            table.append(Rule(name, (name,)))
    return WeightMapping.expand(table, {"vision": config.vision.num_layers, "text": config.text.num_layers})


def example_batch(config: PlainConfig) -> dict[str, Any]:
    ids = torch.tensor([[1, 2, 3, *[IMAGE_TOKEN] * 4, 4, 5, 6, 7]])
    labels = ids.clone()
    labels[0, :8] = -100
    pixels = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": labels, "media": {"pixel_values": pixels}}


SPEC = mmzoo.ModelSpec(
    name=NAME,
    description="a throwaway family: LayerNorm ViT, MLP projector, 1-D rotary decoder",
    variants={"tiny": PlainConfig()},
    build_vision_encoder=PlainViT,
    build_projector=lambda config: MLP(
        config.vision.hidden_size,
        64,
        bias=True,
        gated=False,
        activation="gelu",
        out_size=config.text.hidden_size,
    ),
    build_text_decoder=lambda config: TextDecoder(config.text),
    position_ids=text_position_ids,
    feature_slots=feature_slots,
    weight_mapping=weight_mapping,
    config_from_hf=lambda hf: PlainConfig(),
    loss=causal_lm_loss,
    example_batch=example_batch,
    template=ChatTemplate(
        name="plain",
        system_format="<|im_start|>system\n{content}<|im_end|>\n",
        user_format="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        assistant_format="{content}<|im_end|>\n",
        stop_words=("<|im_end|>",),
        media_separator="\n",
    ),
    media_processor=lambda config, **options: PlainProcessor(config),
    default_tokenizer=default_qwen_tokenizer,
)


@mmzoo.hookimpl
def mmzoo_register_models(register):
    register(SPEC)


@pytest.fixture(name="plain")
def plain_fixture(tmp_path, monkeypatch):
    """This family installed as a plugin beside the real ones; gives its spec."""
    yield from installed_family(tmp_path, monkeypatch, "plain_family", NAME)
