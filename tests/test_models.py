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


def _saved_hf(name: str, directory) -> tuple[mmzoo.VLModel, dict[str, torch.Tensor]]:
    """A tiny model of ``name`` with spread weights, saved as an HF checkpoint, and its tensors."""
    from safetensors.torch import load_file

    from mmzoo.checkpoint.hf_export import save_hf
    from mmzoo.testing import spread_weights_

    model = spread_weights_(mmzoo.build_model(name, "tiny"))
    save_hf(model, directory)
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return model, tensors


@pytest.mark.parametrize("name", [r.spec.name for r in all_models() if r.spec.config_to_hf is not None])
def test_conversion_round_trip_at_tp2_pp2_is_exact(name, tmp_path):
    """HF -> mm at tp 2 / pp 2 -> resplit to tp 1 / pp 1 -> HF gives back every tensor bit for bit."""
    from safetensors.torch import load_file

    from mmzoo.checkpoint import conversion
    from mmzoo.convert.parallel import depths

    _, expected = _saved_hf(name, tmp_path / "hf")
    layers = depths(mmzoo.get_model(name).weight_mapping(mmzoo.get_model(name).variant("tiny")))
    vision, language = layers["vision"], layers["text"]
    quiet = {"report": lambda line: None}
    mm = conversion.hf_to_mm(
        tmp_path / "hf",
        tmp_path / "mm",
        tp=2,
        vit_pp_layers=[vision, 0],
        llm_pp_layers=[language // 2, language - language // 2],
        **quiet,
    )
    whole = conversion.resplit(mm, tmp_path / "mm1", tp=1, **quiet)
    back = conversion.mm_to_hf(whole, tmp_path / "back", **quiet)
    got = {}
    for file in sorted(back.glob("*.safetensors")):
        got.update(load_file(file))
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


@pytest.mark.parametrize("name", MODELS)
def test_generation_with_the_cache_equals_recomputing_every_step(name):
    """Greedy decoding with the KV cache picks, at every step, the argmax of a full forward over
    the prompt and the tokens so far: cache, positions and media agree."""
    from mmzoo.infer import SamplingConfig, generate

    torch.manual_seed(0)
    model = mmzoo.build_model(name, "tiny").eval()
    batch = mmzoo.get_model(name).example_batch(model.config)
    prompt, media = batch["input_ids"], batch["media"]
    (tokens,) = generate(model, prompt, media=media, sampling=SamplingConfig(max_new_tokens=4))
    with torch.no_grad():
        full = torch.cat([prompt, torch.tensor([tokens[:-1]])], dim=1)
        positions = model.compute_position_ids(model.config, prompt, media=media)
        step = positions.amax(dim=(0, 2)) + 1 + torch.arange(len(tokens) - 1)  # text after the prompt
        positions = torch.cat([positions, step.expand(positions.shape[0], 1, -1)], dim=2)
        logits = model(full, media=media, position_ids=positions).logits[0, prompt.shape[1] - 1 :]
    assert logits.argmax(-1).tolist() == tokens


@pytest.mark.parametrize("name", MODELS)
def test_a_short_training_run_on_the_demo_data(name, tmp_path):
    from mmzoo.cli import main

    args = ["train", "--model", name, "--data.max_samples", "4", "--train.steps", "2"]
    assert main([*args, "--train.tensorboard", "false", "--train.output_dir", str(tmp_path)]) == 0
    model = mmzoo.load_model(tmp_path)
    assert model.name == name
