"""mmzoo's Qwen2.5-VL against transformers' on the same tiny random weights (CPU, fp32).

The weights are spread (tiny_hf.SPREAD) and each comparison carries negative controls, one wrong
part each, that must fail the same assertion. transformers 5.3+ computes M-RoPE after a video
differently from the rule the model was trained with (test_rope_index.py): here transformers
computes positions itself only for inputs where both rules agree (images, videos whose time row
stays within their height and width); for longer videos it is fed the trained rule's positions.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny_hf import IMAGE, V_END, V_START, VIDEO, left_pad, make_sample, make_sequence, text, token_types
from trained_rope import trained_positions

import mmzoo
from mmzoo.testing import assert_parity
from mmzoo_qwen2_5_vl.compat import hf_forward

# Grids are in 14-px patches; 8x12 gives merged 4x6 -> a full 4x4 window and a partial 4x2 one.
# Videos here end their time row below max(h, w) merged rows: both M-RoPE rules agree.
CASES = {
    "one_image": dict(images=[(1, 8, 12)]),
    "two_images_different_sizes": dict(images=[(1, 8, 12), (1, 10, 6)]),
    "video": dict(videos=[(4, 6, 8)], seconds=[0.5]),
    "video_fractional_seconds": dict(videos=[(2, 4, 4)], seconds=[0.75]),
    "image_and_video": dict(images=[(1, 12, 10)], videos=[(2, 8, 4)], seconds=[0.5]),
    "text_only": dict(),
}
# Videos whose time row runs past their height and width: transformers is fed the trained positions.
LONG_VIDEOS = {
    "long_video": [text(5, 0), ("video", (8, 4, 6)), text(4, 1)],
    "long_video_then_image": [text(3, 2), ("video", (6, 4, 4)), text(2, 3), ("image", (1, 4, 6)), text(3, 4)],
}
LONG_SECONDS = {"long_video": [1.0], "long_video_then_image": [0.7]}
TOL = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def mm_model(pair):
    return pair.ours


def hf_logits(hf_model, batch, attention_mask=None):
    with torch.no_grad():
        return hf_model(
            **batch, attention_mask=attention_mask, mm_token_type_ids=token_types(batch["input_ids"])
        ).logits


def broken_outputs(mm_model, batch, monkeypatch, pick=lambda out: out.logits) -> dict[str, torch.Tensor]:
    """``pick(output)`` of the model with one deliberately wrong part each (the negative controls)."""
    out = {}
    media = "image_grid_thw" in batch or "video_grid_thw" in batch
    with torch.no_grad():
        fc1 = mm_model.text_decoder.decoder.layers[0].mlp.linear_fc1.weight
        saved = fc1.clone()
        gate, up = saved.chunk(2)
        try:  # the fused [gate; up] of one layer read as [up; gate]
            fc1.copy_(torch.cat([up, gate]))
            out["layer 0 [up; gate]"] = pick(hf_forward(mm_model, **batch))
        finally:
            fc1.copy_(saved)
        if not media:
            return out
        with monkeypatch.context() as m:  # the projector's GELU as quick_gelu
            m.setattr(torch.nn.functional, "gelu", lambda x, approximate="none": x * torch.sigmoid(1.702 * x))
            out["projector quick_gelu"] = pick(hf_forward(mm_model, **batch))
        mask = batch.get("attention_mask")
        positions = mm_model.compute_position_ids(
            mm_model.config, batch["input_ids"], attention_mask=mask, media=media_of(batch)
        )
        last = int(torch.isin(batch["input_ids"][0], torch.tensor([IMAGE, VIDEO])).nonzero()[-1, 0])
        positions[:, 0, last + 1 :] += 1  # row 0's text after its last media one position off
        out["text after media off by one"] = pick(hf_forward(mm_model, **batch, position_ids=positions))
    return out


def media_of(batch: dict) -> dict:
    return {k: batch.get(k) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, hf_model, mm_model, monkeypatch):
    batch = make_sample(**CASES[case])
    with torch.no_grad():
        ours = hf_forward(mm_model, **batch).logits
    assert_parity(
        ours, hf_logits(hf_model, batch), controls=broken_outputs(mm_model, batch, monkeypatch), **TOL
    )


@pytest.mark.parametrize("case", LONG_VIDEOS)
def test_long_video_logits_match_transformers_fed_the_trained_positions(
    case, hf_model, mm_model, monkeypatch
):
    batch = make_sequence(LONG_VIDEOS[case], LONG_SECONDS[case])
    ids = batch["input_ids"][0].tolist()
    rows, _ = trained_positions(
        ids,
        image_token=IMAGE,
        video_token=VIDEO,
        image_grids=batch.get("image_grid_thw", torch.empty(0, 3)).tolist(),
        video_grids=batch["video_grid_thw"].tolist(),
        seconds=LONG_SECONDS[case],
    )
    with torch.no_grad():
        ours = hf_forward(mm_model, **batch).logits
        theirs = hf_model(**batch, position_ids=torch.tensor(rows)[:, None]).logits
        own_rule = hf_logits(hf_model, batch)  # transformers' own (5.3+) positions
    controls = broken_outputs(mm_model, batch, monkeypatch)
    controls["transformers 5.3+ positions"] = own_rule
    assert_parity(ours, theirs, controls=controls, **TOL)


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


def test_padded_batch_matches_transformers(hf_model, mm_model, monkeypatch):
    batch, mask = padded_pair()
    with torch.no_grad():
        ours = hf_forward(mm_model, **batch, attention_mask=mask).logits
    theirs = hf_logits(hf_model, batch, attention_mask=mask)
    keep = mask.bool()
    controls = broken_outputs(
        mm_model, dict(batch, attention_mask=mask), monkeypatch, lambda o: o.logits[keep]
    )
    assert_parity(ours[keep], theirs[keep], controls=controls, **TOL)
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


def test_loss_matches_transformers(hf_model, mm_model, monkeypatch):
    batch = make_sample(images=[(1, 8, 12)], videos=[(2, 4, 4)], seconds=[0.5])
    labels = batch["input_ids"].clone()
    labels[:, :6] = -100
    with torch.no_grad():
        ours = hf_forward(mm_model, **batch, labels=labels).loss
        theirs = hf_model(**batch, labels=labels, mm_token_type_ids=token_types(batch["input_ids"])).loss
    controls = broken_outputs(mm_model, dict(batch, labels=labels), monkeypatch, lambda o: o.loss)
    assert_parity(ours, theirs, controls=controls, atol=1e-6, rtol=1e-6)  # a scalar: a tight tolerance


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
        torch.testing.assert_close(
            hf_forward(model, **batch).logits, hf_logits(hf_model, batch), atol=1e-5, rtol=1e-4
        )


def test_image_token_count_mismatch_is_a_clear_error(mm_model):
    batch = make_sample(images=[(1, 8, 12)])
    batch["input_ids"] = torch.tensor([text(3, 0) + [V_START] + [IMAGE] * 5 + [V_END]])
    with pytest.raises(
        mmzoo.MmzooError,
        match="placeholders and media features differ: the input ids hold 5 tokens of id 995 but the media "
        "give 24",
    ):
        hf_forward(mm_model, **batch)
