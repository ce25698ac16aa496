"""InternVL3 HF <-> mm weight mapping in both HF layouts, on tiny transformers models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from internvl3_tiny import (
    VIT_6B_STYLE,
    VIT_300M_STYLE,
    disk_state_dict,
    hf_model,
    original_state_dict,
    tiny_config,
)

from mmzoo.convert.mapping import COLUMN, REPLICATE, Heads, WeightMapping
from mmzoo.nn import TextDecoder
from mmzoo.testing import assert_parity
from mmzoo_internvl3.mapping import weight_mapping

STYLES = {"300m": VIT_300M_STYLE, "6b": VIT_6B_STYLE}


@pytest.fixture(scope="module", params=list(STYLES))
def style(request):
    config = tiny_config(STYLES[request.param])
    return request.param, config, hf_model(config)


def hf_tensors(config, model):
    """The model's tensors in the config's layout, and the mapping for it."""
    tensors = original_state_dict(model) if config.hf_layout == "opengvlab" else disk_state_dict(model)
    return tensors, weight_mapping(config)


def to_mm(mapping: WeightMapping, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    canonical = {mapping.canonical_hf_name(n): t for n, t in tensors.items()}
    return dict(mapping.to_mm(canonical.__getitem__, set(canonical)))


@pytest.mark.parametrize("layout", ["hf", "opengvlab"])
def test_mapping_covers_every_tensor_and_round_trips(style, layout):
    _, config, model = style
    tensors, mapping = hf_tensors(dataclasses.replace(config, hf_layout=layout), model)
    assert mapping.check_hf_names(set(tensors)) == ([], [])
    mm = to_mm(mapping, tensors)
    back = dict(mapping.to_hf(mm.__getitem__))
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[n], tensors[n]) for n in tensors)


def test_in_memory_names_are_read_too(style):
    _, config, model = style
    mapping = weight_mapping(config)
    names = {mapping.canonical_hf_name(n) for n in model.state_dict()}
    assert mapping.check_hf_names(names) == ([], [])


def test_both_layouts_give_the_same_mm_tensors(style):
    _, config, model = style
    mm_hf = to_mm(*reversed(hf_tensors(config, model)))
    mm_og = to_mm(*reversed(hf_tensors(dataclasses.replace(config, hf_layout="opengvlab"), model)))
    assert mm_hf.keys() == mm_og.keys()
    assert all(torch.equal(mm_hf[n], mm_og[n]) for n in mm_hf)


def test_mm_names_are_mindspeed_mm_names(style):
    name, config, model = style
    mm = to_mm(*reversed(hf_tensors(config, model)))
    vision = {
        n.removeprefix("image_encoder.") for n in mm if n.startswith("image_encoder.") and ".1." not in n
    }
    layer = "encoder.encoder.layers.0."
    linears = ("self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
    expected = {
        "encoder.embeddings.class_embedding",
        "encoder.embeddings.position_embedding",
        "encoder.embeddings.patch_embedding.weight",
        "encoder.embeddings.patch_embedding.bias",
        *(f"projector.{m}.{p}" for m in ("norm", "linear_fc1", "linear_fc2") for p in ("weight", "bias")),
        *(layer + n for n in ("input_layernorm.weight", "pre_mlp_layernorm.weight", "ls1", "ls2")),
        *(f"{layer}{m}.{p}" for m in linears for p in ("weight", "bias")),
        layer + "self_attention.linear_qkv.weight",
    }
    if name == "300m":  # LayerNorm biases and q/k/v biases
        expected |= {layer + "input_layernorm.bias", layer + "pre_mlp_layernorm.bias"}
        expected |= {layer + "self_attention.linear_qkv.bias"}
    else:  # qk-norm over the full width
        expected |= {layer + "self_attention.q_layernorm.weight", layer + "self_attention.k_layernorm.weight"}
    assert vision == expected
    # The ViT's qkv is the plain [q; k; v], not grouped per head.
    attention = model.model.vision_tower.encoder.layer[1].attention
    plain = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    assert torch.equal(mm["image_encoder.encoder.encoder.layers.1.self_attention.linear_qkv.weight"], plain)
    assert mm["image_encoder.encoder.embeddings.class_embedding"].shape == (1, 1, config.vision.hidden_size)


def test_parallel_kinds_and_places():
    rules = {r.mm: r for r in weight_mapping(tiny_config()).rules}
    layer = "image_encoder.encoder.encoder.layers.0."
    assert rules[layer + "self_attention.linear_qkv.weight"].tp == Heads(4, blocks=3)
    assert rules[layer + "self_attention.linear_proj.weight"].tp == Heads(4, dim=1)
    assert rules[layer + "mlp.linear_fc1.weight"].tp == COLUMN
    assert rules[layer + "ls1"].tp == rules[layer + "input_layernorm.weight"].tp == REPLICATE
    projector = rules["image_encoder.projector.linear_fc1.weight"]
    assert (projector.tp, projector.place) == (REPLICATE, "vision:last")
    assert rules["image_encoder.encoder.embeddings.position_embedding"].place == "vision:first"
    assert rules["text_decoder.embedding.word_embeddings.weight"].place == "text:first"
    assert rules["text_decoder.output_layer.weight"].place == "last"


def test_tied_embeddings_drop_the_output_layer():
    config = tiny_config(text=dataclasses.replace(tiny_config().text, tie_word_embeddings=True))
    mapping = weight_mapping(config)
    assert "text_decoder.output_layer.weight" not in mapping.mm_names()
    assert [t.name for t in mapping.tied_copies] == ["text_decoder.output_layer.weight"]


def test_llm_logits_equal_transformers(style):
    """The mapped LLM in mmzoo's decoder gives transformers' logits; misread fused weights do not."""
    _, config, model = style
    mm = to_mm(*reversed(hf_tensors(config, model)))
    ids = torch.randint(0, 290, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.lm_head(model.model.language_model(input_ids=ids).last_hidden_state)[0]

    def logits(tensors):
        decoder = TextDecoder(config.text)
        state = {
            n.removeprefix("text_decoder."): t for n, t in tensors.items() if n.startswith("text_decoder.")
        }
        decoder.load_state_dict(state, strict=True)
        cu = torch.tensor([0, ids.shape[1]], dtype=torch.int32)
        with torch.no_grad():
            return decoder.logits(decoder(decoder.embed(ids[0]), torch.arange(ids.shape[1])[None], cu))

    fc1 = "text_decoder.decoder.layers.0.mlp.linear_fc1.weight"
    qkv = "text_decoder.decoder.layers.0.self_attention.linear_qkv.weight"
    gate, up = mm[fc1].chunk(2)
    attention = model.model.language_model.layers[0].self_attn
    plain_qkv = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    controls = {
        "up/gate swapped": logits({**mm, fc1: torch.cat([up, gate])}),
        "qkv not grouped": logits({**mm, qkv: plain_qkv}),
    }
    assert_parity(logits(mm), expected, controls=controls, atol=1e-5, rtol=1e-4)
