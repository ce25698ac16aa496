"""Generated from the registry: every installed model's tiny variant runs forward and backward."""

from __future__ import annotations

import pytest
import torch

import mmzoo
from mmzoo.registry import all_models

MODELS = [r.spec.name for r in all_models()]


@pytest.mark.parametrize("name", MODELS)
def test_tiny_forward_backward(name):
    torch.manual_seed(0)
    model = mmzoo.build_model(name, "tiny")
    batch = mmzoo.get_model(name).example_batch(model.config)
    out = model(**batch)
    seq = batch["input_ids"].shape[1]
    assert out.logits.shape == (1, seq, model.config.text.vocab_size)
    assert torch.isfinite(out.loss)
    # A random model predicts ~uniformly: the loss sits near log(vocab).
    assert abs(out.loss.item() - torch.log(torch.tensor(float(out.logits.shape[-1]))).item()) < 1.0
    out.loss.backward()
    no_grad = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"


@pytest.mark.parametrize("name", MODELS)
def test_every_variant_builds_a_config(name):
    spec = mmzoo.get_model(name)
    for variant, config in spec.variants.items():
        assert spec.weight_mapping(config).mm_names(), variant


@pytest.mark.parametrize("name", MODELS)
def test_weight_mapping_round_trip_is_exact(name):
    """mm -> HF -> mm through the family's mapping gives back every tensor bit for bit."""
    spec = mmzoo.get_model(name)
    model = mmzoo.build_model(name, "tiny")
    mapping = spec.weight_mapping(model.config)
    state = model.state_dict()
    hf = dict(mapping.to_hf(state.__getitem__))
    assert len(hf) >= len(state)
    back = dict(mapping.to_mm(hf.__getitem__, set(hf)))
    assert back.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(back[key], tensor), key


def test_overrides_and_their_errors():
    model = mmzoo.build_model("qwen2_5_vl", "tiny", text={"num_layers": 1, "vocab_size": 1000})
    assert len(model.text_decoder.decoder.layers) == 1
    assert model.text_decoder.embedding.word_embeddings.num_embeddings == 1000
    with pytest.raises(
        mmzoo.MmzooError, match=r"unknown config key 'text.num_layer'.*did you mean 'num_layers'"
    ):
        mmzoo.build_model("qwen2_5_vl", "tiny", text={"num_layer": 1})
    with pytest.raises(mmzoo.MmzooError, match="no variant '8b'"):
        mmzoo.build_model("qwen2_5_vl", "8b")
    with pytest.raises(mmzoo.MmzooError, match="no model named 'qwen25_vl'.*did you mean 'qwen2_5_vl'"):
        mmzoo.build_model("qwen25_vl")
