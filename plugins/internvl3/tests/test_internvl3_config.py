"""InternVL3 sizes and config.json reading/writing in both layouts, checked against transformers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration

from mmzoo.errors import MmzooError
from mmzoo.nn import TextDecoder
from mmzoo_internvl3.config import VARIANTS, InternVL3Config
from mmzoo_internvl3.hf_config import config_from_hf, config_to_hf

# Parameters each published checkpoint holds, in billions (the Hub's safetensors counts; the 2B's
# 2.09B only adds up with its own lm_head: tied it would be 1.86B).
PUBLISHED_SIZES = {"1b": 0.94, "2b": 2.09, "8b": 7.94, "14b": 15.1, "38b": 38.4, "78b": 78.4}

# OpenGVLab/InternVL3-1B config.json, the fields mmzoo reads (values as published).
OPENGVLAB_1B = {
    "architectures": ["InternVLChatModel"],
    "downsample_ratio": 0.5,
    "dynamic_image_size": True,
    "force_image_size": 448,
    "max_dynamic_patch": 12,
    "min_dynamic_patch": 1,
    "model_type": "internvl_chat",
    "ps_version": "v2",
    "select_layer": -1,
    "template": "internvl2_5",
    "tie_word_embeddings": False,
    "use_thumbnail": True,
    "llm_config": {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_act": "silu",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "model_type": "qwen2",
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "vocab_size": 151674,
    },
    "vision_config": {
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "image_size": 448,
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-06,
        "norm_type": "layer_norm",
        "num_attention_heads": 16,
        "num_channels": 3,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "qk_normalization": False,
        "qkv_bias": True,
    },
}


def opengvlab_1b_hf_4_52() -> dict:
    """OpenGVLab/InternVL3-1B-hf as converted with transformers 4.52: no top-level tie flag."""
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "downsample_ratio": 0.5,
        "image_seq_length": 256,
        "image_token_id": 151667,
        "model_type": "internvl",
        "projector_hidden_act": "gelu",
        "text_config": {k: v for k, v in OPENGVLAB_1B["llm_config"].items() if k != "architectures"},
        "vision_config": {
            "attention_bias": True,
            "hidden_size": 1024,
            "image_size": [448, 448],
            "intermediate_size": 4096,
            "layer_norm_eps": 1e-06,
            "model_type": "internvl_vision",
            "norm_type": "layer_norm",
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "patch_size": [14, 14],
            "use_qk_norm": False,
        },
    }


def parameters(config: InternVL3Config) -> int:
    """Parameters of the whole model: InternViT + projector counted here, the decoder built on meta."""
    v, c = config.vision, config.vision.hidden_size
    norm = 2 * c if v.norm == "layer_norm" else c
    layer = (
        c * 3 * c
        + (3 * c if v.qkv_bias else 0)
        + c * c
        + c
        + 2 * c * v.ffn_hidden_size
        + v.ffn_hidden_size
        + c
        + 2 * norm
        + 2 * c  # ls1, ls2
        + (2 * c if v.qk_norm else 0)
    )
    embeddings = v.in_channels * v.patch_size**2 * c + c + (v.grid**2 + 1) * c + c
    merged, hidden = c * config.merge**2, config.text.hidden_size
    projector = 2 * merged + merged * hidden + hidden + hidden * hidden + hidden
    with torch.device("meta"):
        decoder = sum(p.numel() for p in TextDecoder(config.text).parameters())
    return embeddings + v.num_layers * layer + projector + decoder


@pytest.mark.parametrize("name", list(PUBLISHED_SIZES))
def test_variant_sizes_match_published_totals(name):
    config = VARIANTS[name]
    assert parameters(config) / 1e9 == pytest.approx(PUBLISHED_SIZES[name], rel=0.02)
    assert config.tokens_per_tile == 256 and config.text.vocab_size == 151674
    assert (config.image_start_token_id, config.image_end_token_id, config.image_token_id) == (
        151665,
        151666,
        151667,
    )


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("layout", ["hf", "opengvlab"])
def test_round_trip_both_layouts(name, layout):
    config = dataclasses.replace(VARIANTS[name], hf_layout=layout)
    back = config_from_hf(config_to_hf(config))
    assert dataclasses.astuple(back) == dataclasses.astuple(config)  # compare=False fields too


def test_reads_published_opengvlab_config():
    config = config_from_hf(OPENGVLAB_1B)
    assert config == VARIANTS["1b"] and config.hf_layout == "opengvlab"
    assert config.dynamic_rope_factor == 2.0 and not config.text.tie_word_embeddings


def test_reads_converted_config_without_top_level_tie_flag():
    config = config_from_hf(opengvlab_1b_hf_4_52())
    assert config == VARIANTS["1b"] and config.hf_layout == "hf"
    assert not config.text.tie_word_embeddings


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_ties_as_written(tied):
    """transformers 5 ties on the top-level flag (default True): an untied export must say so."""
    text = dataclasses.replace(VARIANTS["tiny"].text, vocab_size=300, tie_word_embeddings=tied)
    config = dataclasses.replace(VARIANTS["tiny"], text=text, image_token_id=299)
    model = InternVLForConditionalGeneration(InternVLConfig(**config_to_hf(config)))
    shared = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert shared == tied
    assert config_from_hf(model.config.to_dict()) == config


def test_transformers_reads_the_6b_vit_fields():
    hf = InternVLConfig(**config_to_hf(VARIANTS["78b"]))
    v = hf.vision_config
    assert (v.num_hidden_layers, v.hidden_size, v.num_attention_heads, v.intermediate_size) == (
        45,
        3200,
        25,
        12800,
    )
    assert (v.norm_type, v.use_qk_norm, v.attention_bias) == ("rms_norm", True, False)
    assert hf.text_config.rope_parameters == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["llm_config"].update(architectures=["InternLM3ForCausalLM"]), "InternLM3"),
        (lambda c: c.update(ps_version="v1"), "ps_version = 'v1'"),
        (lambda c: c["vision_config"].update(hidden_act="quick_gelu"), "vision_config.hidden_act"),
        (
            lambda c: c["llm_config"].update(rope_scaling={"type": "yarn", "factor": 4.0}),
            "rope_type = 'yarn'",
        ),
    ],
)
def test_unsupported_fields_are_named(change, message):
    config = {**OPENGVLAB_1B, "llm_config": dict(OPENGVLAB_1B["llm_config"])}
    config["vision_config"] = dict(OPENGVLAB_1B["vision_config"])
    change(config)
    with pytest.raises(MmzooError, match=message):
        config_from_hf(config)


def test_neither_layout_is_an_error():
    with pytest.raises(MmzooError, match="neither text_config nor llm_config"):
        config_from_hf({"architectures": ["InternVLChatModel"]})


def test_unsupported_llm_activation_is_named():
    config = {**OPENGVLAB_1B, "llm_config": {**OPENGVLAB_1B["llm_config"], "hidden_act": "gelu"}}
    with pytest.raises(ValueError, match="llm_config.hidden_act 'gelu' is not supported"):
        config_from_hf(config)
