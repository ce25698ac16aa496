"""mmzoo's InternVL3 against transformers' InternVLForConditionalGeneration on the same tiny random
weights (CPU, fp32): logits, loss and greedy generation, from an -hf checkpoint and from the same
weights in OpenGVLab's layout. Each comparison carries negative controls that must fail it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from internvl3_tiny import VIT_6B_STYLE, VIT_300M_STYLE, original_state_dict, sample, tiny_config
from safetensors.torch import save_file
from transformers import InternVLConfig, InternVLForConditionalGeneration

import mmzoo
import mmzoo_internvl3.vision as vision_module
from mmzoo.infer import SamplingConfig, generate
from mmzoo.testing import assert_parity, parity_pair
from mmzoo_internvl3.hf_config import config_to_hf

END, CONTEXT = 298, 299  # tiny_config's image end and context token ids
TOL = dict(atol=1e-5, rtol=1e-4)
# Each sample: its text runs and images (tiles each), alternating text, image, text, ...
CASES = {
    "multi_tile_image": [5, 3, 4],
    "two_images": [3, 1, 2, 3, 6],
    "text_only": [9],
}


def left_pad(*samples: dict) -> tuple[dict, torch.Tensor]:
    """Samples left-padded (id 0) into one batch, their tiles concatenated; and the mask."""
    width = max(s["input_ids"].shape[1] for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(samples):
        n = s["input_ids"].shape[1]
        ids[row, width - n :], mask[row, width - n :] = s["input_ids"][0], 1
    pixels = torch.cat([s["pixel_values"] for s in samples if s["pixel_values"] is not None])
    return {"input_ids": ids, "pixel_values": pixels}, mask


def ours(model, batch: dict, attention_mask=None, **kw):
    media = None if batch["pixel_values"] is None else {"pixel_values": batch["pixel_values"]}
    with torch.no_grad():
        return model(batch["input_ids"], attention_mask, media=media, **kw)


def theirs(reference, batch: dict, attention_mask=None, **kw):
    with torch.no_grad():
        return reference(**batch, attention_mask=attention_mask, **kw)


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """transformers' generate positions for a left-padded batch: real tokens count from 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0) * mask


@pytest.fixture(scope="module", params=["300m", "6b"])
def pair(request, tmp_path_factory):
    vision = {"300m": VIT_300M_STYLE, "6b": VIT_6B_STYLE}[request.param]
    config = tiny_config(vision)
    hf_config = InternVLConfig(**config_to_hf(config))
    hf_config._attn_implementation = "eager"
    found = parity_pair(InternVLForConditionalGeneration, hf_config, tmp_path_factory.mktemp("hf"))
    return config, found


def controls(model, batch: dict, monkeypatch, attention_mask=None, pick=lambda o: o.logits, **kw) -> dict:
    """``pick(output)`` with one deliberately wrong part each (``kw`` go to the forward)."""
    out = {}
    fc1 = model.text_decoder.decoder.layers[0].mlp.linear_fc1.weight
    saved = fc1.detach().clone()
    gate, up = saved.chunk(2)
    with torch.no_grad():
        fc1.copy_(torch.cat([up, gate]))
    try:
        out["LLM layer 0 [up; gate]"] = pick(ours(model, batch, attention_mask, **kw))
    finally:
        with torch.no_grad():
            fc1.copy_(saved)
    if batch["pixel_values"] is None:
        return out
    projector = model.image_encoder.projector
    projector.activation = "gelu_tanh"
    out["projector tanh gelu"] = pick(ours(model, batch, attention_mask, **kw))
    projector.activation = "gelu"
    with monkeypatch.context() as m:
        m.setattr(vision_module, "pixel_shuffle", _transposed_shuffle)
        out["pixel shuffle transposed"] = pick(ours(model, batch, attention_mask, **kw))
    mask = torch.ones_like(batch["input_ids"]) if attention_mask is None else attention_mask
    positions = hf_positions(mask)[None].clone()
    end = int((batch["input_ids"][0] == END).nonzero()[-1, 0])
    positions[:, 0, end + 1 :] += 1  # the text after row 0's last image one position off
    out["text after the image off by one"] = pick(
        ours(model, batch, attention_mask, position_ids=positions, **kw)
    )
    return out


def _transposed_shuffle(features, grid, merge):
    n, _, width = features.shape
    side = grid // merge
    blocks = features.reshape(n, side, merge, side, merge, width)  # each block's channels column-major
    return blocks.permute(0, 1, 3, 4, 2, 5).reshape(n * side * side, merge * merge * width)


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers(case, pair, monkeypatch):
    config, found = pair
    batch = sample(config, CASES[case])
    expected = theirs(found.reference, batch).logits
    got = ours(found.ours, batch).logits
    assert_parity(got, expected, controls=controls(found.ours, batch, monkeypatch), **TOL)


def test_padded_batch_equals_transformers(pair, monkeypatch):
    config, found = pair
    batch, mask = left_pad(sample(config, [4, 3, 2], seed=1), sample(config, [2, 1, 9], seed=2))
    expected = theirs(found.reference, batch, mask, position_ids=hf_positions(mask)).logits
    got = ours(found.ours, batch, mask).logits
    keep = mask.bool()
    broken = controls(found.ours, batch, monkeypatch, mask, pick=lambda o: o.logits[keep])
    assert_parity(got[keep], expected[keep], controls=broken, **TOL)
    assert not got[~keep].any()


def test_loss_equals_transformers(pair, monkeypatch):
    config, found = pair
    batch = sample(config, CASES["two_images"])
    labels = batch["input_ids"].clone()
    labels[:, : labels.shape[1] - 6] = -100
    expected = theirs(found.reference, batch, labels=labels).loss
    got = ours(found.ours, batch, labels=labels).loss
    broken = controls(
        found.ours, batch, monkeypatch, pick=lambda o: ours(found.ours, batch, labels=labels).loss
    )
    broken = {"LLM layer 0 [up; gate]": broken["LLM layer 0 [up; gate]"]}
    assert_parity(got, expected, controls=broken, atol=1e-6, rtol=1e-6)


def test_greedy_generation_is_token_identical(pair):
    config, found = pair
    batch, mask = left_pad(sample(config, [4, 3, 2], seed=3), sample(config, [2, 1, 7], seed=4))
    with torch.no_grad():
        out = found.reference.generate(
            **batch, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0
        )
    expected = out[:, batch["input_ids"].shape[1] :].tolist()
    media = {"pixel_values": batch["pixel_values"]}
    got = generate(
        found.ours, batch["input_ids"], mask, media=media, sampling=SamplingConfig(max_new_tokens=12)
    )
    assert got == expected
    assert len({tuple(row) for row in got}) == 2 and all(len(set(row)) > 2 for row in got)  # not degenerate


def test_the_opengvlab_layout_gives_the_same_logits(pair, tmp_path, monkeypatch):
    """The same weights as OpenGVLab publishes them (fused ViT qkv, mlp1, an untied lm_head)."""
    config, found = pair
    reference = found.reference
    embed = reference.model.language_model.embed_tokens.weight
    assert not torch.equal(reference.lm_head.weight, embed)  # untied: the top-level flag was written
    save_file(
        {k: v.contiguous() for k, v in original_state_dict(reference).items()}, tmp_path / "model.safetensors"
    )
    hf = config_to_hf(dataclasses.replace(config, hf_layout="opengvlab"))
    (tmp_path / "config.json").write_text(json.dumps(hf))
    model = mmzoo.load_model(tmp_path).eval()
    assert model.config.hf_layout == "opengvlab" and not model.config.text.tie_word_embeddings
    # OpenGVLab's config.json names no token ids (the real ones are read); the tiny vocabulary
    # moved them below 300.
    assert model.config.image_token_id == 151667
    model.config = dataclasses.replace(model.config, image_token_id=CONTEXT)
    batch = sample(config, CASES["two_images"], seed=5)
    expected = theirs(reference, batch).logits
    broken = controls(model, batch, monkeypatch)
    with torch.no_grad():  # a reader that ties the output layer to the embedding
        tied = model.text_decoder.output_layer.weight.detach().clone()
        model.text_decoder.output_layer.weight.copy_(embed)
        broken["output layer tied to the embedding"] = ours(model, batch).logits
        model.text_decoder.output_layer.weight.copy_(tied)
    assert_parity(ours(model, batch).logits, expected, controls=broken, **TOL)
