"""The shared Qwen2 LLM helpers: weight rules under any prefix, and the decoder config both ways.

A tiny random transformers ``Qwen2ForCausalLM`` (1-D rotary, as InternVL3's LLM) is converted with
the rules under each prefix a family uses, run through mmzoo's ``TextDecoder`` against
transformers, and converted back.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mmzoo.convert import qwen2_llm
from mmzoo.convert.mapping import WeightMapping
from mmzoo.nn import DecoderConfig, TextDecoder
from mmzoo.testing import assert_parity, spread_weights_

transformers = pytest.importorskip("transformers")

PREFIXES = {  # family layout: (prefix of the LLM's body, name of its lm_head)
    "qwen2_5_vl": ("model.", "lm_head.weight"),
    "internvl3": ("language_model.model.", "language_model.lm_head.weight"),
    "internvl3-hf": ("model.language_model.", "lm_head.weight"),
}


def hf_qwen2(tied: bool) -> transformers.Qwen2ForCausalLM:
    config = transformers.Qwen2Config(
        vocab_size=120,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return spread_weights_(transformers.Qwen2ForCausalLM(config).eval())


def hf_state(model, prefix: str, lm_head: str) -> dict[str, torch.Tensor]:
    """The model's tensors renamed into a family layout (``model.`` -> ``prefix``)."""
    state = {}
    for name, tensor in model.state_dict().items():
        state[lm_head if name == "lm_head.weight" else prefix + name.removeprefix("model.")] = tensor
    return state


def mapping(config: DecoderConfig, layout: str) -> WeightMapping:
    prefix, lm_head = PREFIXES[layout]
    rules = qwen2_llm.weight_rules(config, prefix=prefix, lm_head=lm_head)
    return WeightMapping.expand(rules, {"text": config.num_layers}, tied_copies=qwen2_llm.tied_copies(config))


def decoder_from(hf_model, layout: str) -> tuple[TextDecoder, dict[str, torch.Tensor]]:
    config = qwen2_llm.decoder_config_from_hf(hf_model.config.to_dict())
    state = hf_state(hf_model, *PREFIXES[layout])
    converted = dict(mapping(config, layout).to_mm(state.__getitem__, set(state)))
    decoder = TextDecoder(config)
    decoder.load_state_dict({k.removeprefix("text_decoder."): v for k, v in converted.items()})
    return decoder.eval(), state


def packed_logits(decoder: TextDecoder, sequences: list[torch.Tensor]) -> torch.Tensor:
    ids = torch.cat(sequences)
    positions = torch.cat([torch.arange(len(s)) for s in sequences])[None]  # (1, T): plain rotary
    cu = F.pad(torch.tensor([len(s) for s in sequences]).cumsum(0, dtype=torch.int32), (1, 0))
    return decoder.logits(decoder(decoder.embed(ids), positions, cu))


@pytest.mark.parametrize("layout", PREFIXES)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@torch.no_grad()
def test_rules_convert_a_qwen2_llm_both_ways_under_each_prefix(layout, tied):
    hf_model = hf_qwen2(tied)
    decoder, state = decoder_from(hf_model, layout)
    config = decoder.config
    assert (config.num_kv_heads, config.mrope_section, config.tie_word_embeddings) == (2, None, tied)
    sequences = [torch.randint(0, 120, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 12)]
    expected = torch.cat([hf_model(input_ids=s[None]).logits[0] for s in sequences])
    ours = packed_logits(decoder, sequences)

    broken = {"one sequence": packed_logits(decoder, [torch.cat(sequences)])}
    name = "text_decoder.decoder.layers.0.self_attention.linear_qkv.weight"
    qkv_rule = next(r for r in mapping(config, layout).rules if r.mm == name)
    qkv = decoder.decoder.layers[0].self_attention.linear_qkv.weight
    saved = qkv.clone()
    qkv.copy_(torch.cat([state[n] for n in qkv_rule.hf]))  # [Q; K; V], not grouped per KV head
    broken["qkv not grouped per KV head"] = packed_logits(decoder, sequences)
    qkv.copy_(saved)
    assert_parity(ours, expected, controls=broken, atol=1e-5, rtol=1e-4)

    mm = {"text_decoder." + k: v for k, v in decoder.state_dict().items()}
    back = dict(mapping(config, layout).to_hf(mm.__getitem__))
    expected_names = set(state) - ({PREFIXES[layout][1]} if tied else set())
    assert set(back) == expected_names
    assert all(torch.equal(back[name], state[name]) for name in back)


def test_rule_names_under_the_internvl3_prefix():
    config = qwen2_llm.decoder_config_from_hf(hf_qwen2(False).config.to_dict())
    names = {r.mm: r.hf for r in mapping(config, "internvl3").rules}
    assert names["text_decoder.embedding.word_embeddings.weight"] == (
        "language_model.model.embed_tokens.weight",
    )
    assert names["text_decoder.output_layer.weight"] == ("language_model.lm_head.weight",)
    assert names["text_decoder.decoder.layers.1.mlp.linear_fc1.weight"] == (
        "language_model.model.layers.1.mlp.gate_proj.weight",
        "language_model.model.layers.1.mlp.up_proj.weight",
    )
    assert names["text_decoder.decoder.final_layernorm.weight"] == ("language_model.model.norm.weight",)


def test_decoder_config_round_trips_through_transformers():
    config = DecoderConfig(
        vocab_size=151674,
        hidden_size=3584,
        ffn_hidden_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    hf = qwen2_llm.decoder_config_to_hf(config)
    assert hf["model_type"] == "qwen2" and hf["bos_token_id"] == 151643 and hf["eos_token_id"] == 151645
    assert qwen2_llm.decoder_config_from_hf(hf) == config
    assert qwen2_llm.decoder_config_from_hf(transformers.Qwen2Config(**hf).to_dict()) == config
    older = {k: v for k, v in hf.items() if k != "rope_parameters"} | {"rope_theta": 5e5}  # pre-5.x form
    assert qwen2_llm.decoder_config_from_hf(older).rope_theta == 5e5
    assert qwen2_llm.decoder_config_from_hf(hf, tie_word_embeddings=True).tie_word_embeddings
    dynamic = hf | {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}}
    assert qwen2_llm.decoder_config_from_hf(dynamic) == config
    with pytest.raises(ValueError, match="qkv_bias=False cannot be exported"):
        qwen2_llm.decoder_config_to_hf(dataclasses.replace(config, qkv_bias=False))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"hidden_act": "gelu"}, r"llm_config.hidden_act 'gelu' is not supported \(Qwen2 uses silu\)"),
        ({"use_sliding_window": True}, r"llm_config.use_sliding_window is true"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
            r"llm_config rope type 'yarn' is not supported",
        ),
        ({"head_dim": 64}, r"llm_config.head_dim 64 x 28 heads is not hidden_size 3584"),
    ],
    ids=["act", "sliding", "yarn", "head_dim"],
)
def test_unreadable_text_configs_say_which_field(change, message):
    hf = transformers.Qwen2Config(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4).to_dict()
    with pytest.raises(ValueError, match=message):
        qwen2_llm.decoder_config_from_hf(hf | change, where="llm_config")
