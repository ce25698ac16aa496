"""M-RoPE ids follow the rule Qwen2.5-VL was trained with (restated in trained_rope.py) in every
path: one sequence, padded batches (either side), and generation's rope deltas. Packed rows are
checked in test_data_pipeline.py, logits under the rule in test_parity.py.

transformers 5.3+ is not the reference here: it continues after a video at start + max(h, w),
not at the largest position so far + 1 (see test_transformers_differs_after_a_long_video).
"""

from __future__ import annotations

import pytest
import torch
from tiny_hf import IMAGE, VIDEO, make_sequence, text, token_types
from trained_rope import trained_positions

import mmzoo
from mmzoo_qwen2_5_vl.rope_index import rope_index

CASES = {
    "long_video_whole_seconds": ([text(5, 0), ("video", (16, 8, 12)), text(4, 1)], [2.0]),
    "long_video_fractional_seconds": ([text(2, 0), ("video", (12, 4, 4)), text(3, 1)], [0.7]),
    "video_three_quarter_seconds": ([text(4, 0), ("video", (6, 4, 6)), text(3, 1)], [0.75]),
    "image_after_video": (
        [text(3, 0), ("video", (8, 4, 4)), text(2, 1), ("image", (1, 8, 6)), text(3, 2)],
        [1.0],
    ),
    "video_image_video": (
        [
            text(2, 0),
            ("video", (4, 4, 4)),
            ("image", (1, 4, 4)),
            text(1, 1),
            ("video", (10, 6, 4)),
            text(2, 2),
        ],
        [1.5, 0.25],
    ),
    "media_first_and_last": ([("image", (1, 4, 6)), text(4, 0), ("video", (6, 4, 4))], [1.0]),
    "video_without_seconds": ([text(3, 0), ("video", (6, 4, 4)), text(2, 1)], None),
    "text_only": ([text(7, 0)], None),
}


@pytest.fixture(scope="module")
def config(hf_dir):
    """The tiny test model's config (its special ids are remapped below the small vocab)."""
    return mmzoo.load_model(hf_dir).config


def reference(batch, seconds, row=0, keep=None):
    ids = batch["input_ids"][row]
    ids = (ids[keep] if keep is not None else ids).tolist()
    return trained_positions(
        ids,
        image_token=IMAGE,
        video_token=VIDEO,
        image_grids=batch["image_grid_thw"].tolist() if "image_grid_thw" in batch else [],
        video_grids=batch["video_grid_thw"].tolist() if "video_grid_thw" in batch else [],
        seconds=seconds,
    )


def media(batch):
    return {k: batch.get(k) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}


@pytest.mark.parametrize("case", CASES)
def test_rope_index_follows_the_trained_rule(case, config):
    parts, seconds = CASES[case]
    batch = make_sequence(parts, seconds or [])
    if seconds is None:
        batch.pop("second_per_grid_ts", None)
    positions, deltas = rope_index(config, batch["input_ids"], **media(batch))
    rows, delta = reference(batch, seconds)
    assert positions[:, 0].tolist() == rows
    assert deltas.tolist() == [[delta]]


def test_time_index_is_float32_then_truncated():
    from mmzoo_qwen2_5_vl.rope_index import time_index

    # 0.7 s per grid at 2 tokens per second: 1.4 per step in float32, so step 5 is exactly 7
    assert time_index(11, 0.7, 2).tolist() == [0, 1, 2, 4, 5, 7, 8, 9, 11, 12, 14]
    assert time_index(4, torch.tensor(2.0), 2).tolist() == [0, 4, 8, 12]
    assert time_index(3, 0.25, 2).tolist() == [0, 0, 1]


def test_transformers_differs_after_a_long_video(hf_model, config):
    """The example of a video with grid (16, 8, 12) at 2 s per grid: the trained rule starts the
    next text at the video's last time step + 1 = start + 61, transformers 5.3+ at start + 6."""
    batch = make_sequence([text(5, 0), ("video", (16, 8, 12)), text(4, 1)], [2.0])
    ours, _ = rope_index(config, batch["input_ids"], **media(batch))
    theirs, _ = hf_model.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=token_types(batch["input_ids"]), **media(batch)
    )
    start = 5 + 1  # five text tokens and <|vision_start|>
    first_text_after = start + 16 * 4 * 6  # <|vision_end|>
    assert ours[:, 0, first_text_after].tolist() == [start + 61] * 3
    assert (ours[:, 0, first_text_after] - theirs[:, 0, first_text_after]).tolist() == [55] * 3
    assert torch.equal(ours[:, :, :first_text_after], theirs[:, :, :first_text_after])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_follows_the_trained_rule_per_row(side, config):
    from mmzoo.data.collate import collate_left_padded

    a = make_sequence([text(3, 0), ("video", (8, 4, 6)), text(4, 1)], [1.0], seed=1)
    b = make_sequence([text(2, 2), ("image", (1, 4, 4)), text(1, 3), ("video", (4, 4, 4)), text(2, 4)], [0.7])
    rows = [
        {"input_ids": s["input_ids"][0], "media": {k: v for k, v in s.items() if k != "input_ids"}}
        for s in (a, b)
    ]
    collated = collate_left_padded(rows, 0)
    batch, mask = {"input_ids": collated["input_ids"], **collated["media"]}, collated["attention_mask"]
    if side == "right":  # move each row's padding to its end
        order = torch.argsort(1 - mask, dim=1, stable=True)
        batch["input_ids"], mask = batch["input_ids"].gather(1, order), mask.gather(1, order)
    positions, deltas = rope_index(config, batch["input_ids"], mask, **media(batch))
    for row, (sample, seconds) in enumerate([(a, [1.0]), (b, [0.7])]):
        keep = mask[row].bool()
        rows, delta = reference(sample, seconds)
        assert positions[:, row, keep].tolist() == rows
        assert positions[:, row, ~keep].eq(0).all()
        assert deltas[row].tolist() == [delta]
