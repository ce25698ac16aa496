"""InternViT + pixel shuffle + projector against transformers' InternVLModel.get_image_features."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from internvl3_tiny import VIT_6B_STYLE, VIT_300M_STYLE, disk_state_dict, hf_model, tiny_config

import mmzoo_internvl3.vision as vision_module
from mmzoo.testing import assert_parity
from mmzoo_internvl3.config import VARIANTS
from mmzoo_internvl3.mapping import weight_mapping
from mmzoo_internvl3.vision import InternViT, Projector, build_projector, build_vision_encoder

TINY_448 = dataclasses.replace(VARIANTS["tiny"].vision, hidden_size=32, ffn_hidden_size=64, image_size=448)
STYLES = {"300m": VIT_300M_STYLE, "6b": VIT_6B_STYLE, "300m-448px": TINY_448}


def mmzoo_parts(config, model) -> tuple[InternViT, Projector]:
    """Our encoder and projector holding the transformers model's weights, through the mapping."""
    mapping = weight_mapping(config)
    tensors = {mapping.canonical_hf_name(n): t for n, t in disk_state_dict(model).items()}
    mm = dict(mapping.to_mm(tensors.__getitem__, set(tensors)))
    encoder, projector = build_vision_encoder(config), build_projector(config)
    for part, prefix in ((encoder, "image_encoder.encoder."), (projector, "image_encoder.projector.")):
        part.load_state_dict({n.removeprefix(prefix): t for n, t in mm.items() if n.startswith(prefix)})
    return encoder.eval(), projector.eval()


def transposed_shuffle(features, grid, merge):
    """A wrong pixel shuffle: each block's channels in column-major order."""
    n, _, width = features.shape
    side = grid // merge
    blocks = features.reshape(n, side, merge, side, merge, width)
    return blocks.permute(0, 1, 3, 4, 2, 5).reshape(n * side * side, merge * merge * width)


@pytest.mark.parametrize("style", list(STYLES))
def test_features_equal_transformers(style, monkeypatch):
    config = tiny_config(STYLES[style])
    model = hf_model(config)
    encoder, projector = mmzoo_parts(config, model)
    size = config.vision.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.model.get_image_features(pixel_values=pixels).pooler_output
        expected = expected.reshape(-1, config.text.hidden_size)
        ours = projector(encoder({"pixel_values": pixels}))
        projector.activation = "gelu_tanh"
        tanh_gelu = projector(encoder({"pixel_values": pixels}))
        projector.activation = "gelu"
        monkeypatch.setattr(vision_module, "pixel_shuffle", transposed_shuffle)
        transposed = projector(encoder({"pixel_values": pixels}))
    assert ours.shape == (3 * config.tokens_per_tile, config.text.hidden_size)
    controls = {"tanh gelu in the projector": tanh_gelu, "pixel shuffle transposed": transposed}
    assert_parity(ours, expected, controls=controls, atol=1e-5, rtol=1e-4)


def test_every_parameter_gets_a_gradient():
    config = tiny_config(VIT_6B_STYLE)
    encoder, projector = build_vision_encoder(config), build_projector(config)
    projector(encoder({"pixel_values": torch.randn(2, 3, 56, 56)})).square().mean().backward()
    for name, param in [*encoder.named_parameters(), *projector.named_parameters()]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_module_names_are_the_mm_names():
    config = tiny_config(VIT_300M_STYLE)
    names = {"image_encoder.encoder." + n for n in build_vision_encoder(config).state_dict()}
    names |= {"image_encoder.projector." + n for n in build_projector(config).state_dict()}
    assert names == {n for n in weight_mapping(config).mm_names() if n.startswith("image_encoder.")}


def test_tiles_of_the_wrong_size_are_named():
    encoder = build_vision_encoder(tiny_config(VIT_300M_STYLE))
    with pytest.raises(ValueError, match=r"tiles of \(112, 112\) px give 64 patches, but the position"):
        encoder({"pixel_values": torch.randn(1, 3, 112, 112)})
