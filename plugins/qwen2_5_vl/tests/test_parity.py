"""mmzoo's Qwen2.5-VL against transformers' on the same tiny random weights (CPU, fp32)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny_hf import IMAGE, V_END, V_START, left_pad, make_sample, text, token_types

import mmzoo

# Grids are in 14-px patches; 8x12 gives merged 4x6 -> a full 4x4 window and a partial 4x2 one.
CASES = {
    "one_image": dict(images=[(1, 8, 12)]),
    "two_images_different_sizes": dict(images=[(1, 8, 12), (1, 10, 6)]),
    "video": dict(videos=[(4, 6, 8)], seconds=[1.0]),
    "video_fractional_seconds": dict(videos=[(2, 4, 4)], seconds=[0.75]),
    "image_and_video": dict(images=[(1, 12, 10)], videos=[(2, 8, 4)], seconds=[0.5]),
    "text_only": dict(),
}


@pytest.fixture(scope="module")
def mm_model(hf_dir):
    return mmzoo.load_model(hf_dir).eval()


def hf_logits(hf_model, batch, attention_mask=None):
    with torch.no_grad():
        return hf_model(
            **batch, attention_mask=attention_mask, mm_token_type_ids=token_types(batch["input_ids"])
        ).logits


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, hf_model, mm_model):
    batch = make_sample(**CASES[case])
    with torch.no_grad():
        ours = mm_model(**batch).logits
    torch.testing.assert_close(ours, hf_logits(hf_model, batch), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", [c for c in CASES if c != "text_only"])
def test_rope_index_equals_transformers(case, hf_model, mm_model):
    from mmzoo_qwen2_5_vl.rope_index import rope_index

    batch = make_sample(**CASES[case])
    media = {k: batch.get(k) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
    expected, expected_deltas = hf_model.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=token_types(batch["input_ids"]), **media
    )
    positions, deltas = rope_index(mm_model.config, batch["input_ids"], **media)
    assert torch.equal(positions, expected)
    assert torch.equal(deltas, expected_deltas.view(-1, 1))


def padded_pair():
    """Two samples of different lengths, left-padded into one batch, each with an image."""
    return left_pad(make_sample(images=[(1, 8, 12)], seed=1), make_sample(images=[(1, 4, 4)], seed=2))


def test_padded_batch_matches_transformers(hf_model, mm_model):
    batch, mask = padded_pair()
    with torch.no_grad():
        ours = mm_model(**batch, attention_mask=mask).logits
    theirs = hf_logits(hf_model, batch, attention_mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-5, rtol=1e-4)
    assert torch.equal(ours[~keep], torch.zeros_like(ours[~keep]))


def test_padded_rope_index_equals_transformers(hf_model, mm_model):
    from mmzoo_qwen2_5_vl.rope_index import rope_index

    batch, mask = padded_pair()
    expected, _ = hf_model.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=token_types(batch["input_ids"]),
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=mask,
    )
    positions, _ = rope_index(mm_model.config, batch["input_ids"], mask, batch["image_grid_thw"])
    assert torch.equal(positions[:, mask.bool()], expected[:, mask.bool()])


def test_loss_matches_transformers(hf_model, mm_model):
    batch = make_sample(images=[(1, 8, 12)], videos=[(2, 4, 4)], seconds=[1.0])
    labels = batch["input_ids"].clone()
    labels[:, :6] = -100
    with torch.no_grad():
        ours = mm_model(**batch, labels=labels).loss
        theirs = hf_model(**batch, labels=labels, mm_token_type_ids=token_types(batch["input_ids"])).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_loads_in_memory_key_layout(hf_model, hf_dir, tmp_path):
    """Checkpoints written from a state dict use model.visual.* / model.language_model.*."""
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    half = len(state) // 2
    names = sorted(state)
    save_file({k: state[k] for k in names[:half]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in names[half:]}, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    model = mmzoo.load_model(tmp_path).eval()
    batch = make_sample(images=[(1, 8, 12)])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, hf_logits(hf_model, batch), atol=1e-5, rtol=1e-4)


def test_image_token_count_mismatch_is_a_clear_error(mm_model):
    batch = make_sample(images=[(1, 8, 12)])
    batch["input_ids"] = torch.tensor([text(3, 0) + [V_START] + [IMAGE] * 5 + [V_END]])
    with pytest.raises(mmzoo.MmzooError, match="image tokens and image features differ"):
        mm_model(**batch)
