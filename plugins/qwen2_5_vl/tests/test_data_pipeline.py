"""The data pipeline on the tiny Qwen2.5-VL: records -> prepared samples -> packed / padded batches.

Checks truncation, packing boundaries (positions, labels, loss), that packed and padded batches give
the logits of each sample run alone, the dummy image that makes every batch run the vision encoder,
the preprocessing cache (hits decode nothing; keys; a concurrent build) and bad media reporting.
Media are tiny (a few dozen tokens) so the whole file runs in seconds on CPU.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from trained_rope import trained_positions

import mmzoo
from mmzoo.config import DataConfig
from mmzoo.data.cache import CacheEntry
from mmzoo.data.collate import collate_packed, collate_padded, pack
from mmzoo.data.dataset import VLDataset, build_dataset
from mmzoo.data.tokenizer import default_qwen_tokenizer
from mmzoo.errors import MmzooError
from mmzoo.loss import IGNORE_INDEX, LossReduction, batch_target_counts, shift_labels
from mmzoo_qwen2_5_vl import media as qwen_media

DEMO = Path(mmzoo.__file__).parent / "demo"
MEDIA = {"max_pixels": 64 * 28 * 28, "video_min_pixels": 16 * 28 * 28, "video_max_pixels": 32 * 28 * 28}


def chat(user: str, answer: str, **media: list[str]) -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
        **media,
    }


def write_jsonl(path: Path, records: list[dict | str]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_video(path: Path, n_frames: int = 8, fps: int = 4, size: tuple[int, int] = (64, 48)) -> Path:
    """A short mp4 of moving noise (frames differ, so the temporal patches matter)."""
    rng = np.random.default_rng(1)
    width, height = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(n_frames):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def tok():
    return default_qwen_tokenizer()


@pytest.fixture(scope="module")
def spec():
    return mmzoo.get_model("qwen2_5_vl")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mmzoo.build_model("qwen2_5_vl", "tiny").eval()


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """Media shared by the tests: two small images and a 2 s video."""
    root = tmp_path_factory.mktemp("assets")
    red = Image.new("RGB", (56, 84), (200, 30, 30))
    red.paste((30, 30, 200), (20, 0, 36, 84))
    red.save(root / "red.png")
    noise = np.random.default_rng(0).integers(0, 256, (84, 112, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "noise.png")
    write_video(root / "clip.mp4")
    return root


def build(spec, tok, path: Path, lines: list[str] | None = None, **data) -> VLDataset:
    config = DataConfig(data=str(path), **{"seq_length": 1024, "media": MEDIA, **data})
    log = lines.append if lines is not None else (lambda _: None)
    return build_dataset(spec, spec.variant("tiny"), tok, config, log=log)


def skip_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("skipped")]


def n_targets(labels: torch.Tensor) -> int:
    return int((shift_labels(labels, torch.tensor([0, len(labels)])) != IGNORE_INDEX).sum())


# ---------------------------------------------------------------- mixed samples, run alone once


MIXED = [
    chat("<image>\nWhat colours are here?", "Red, with a blue stripe.", images=["red.png"]),
    chat("<video>\nWhat happens?", "Coloured noise flickers.", videos=["clip.mp4"]),
    chat("Say hello.", "Hello there!"),
    chat(
        "<image><image>\nCompare them.", "Noise, then a cat.", images=["noise.png", str(DEMO / "chelsea.jpg")]
    ),
    chat("Count to three.", "One, two, three."),
]


@pytest.fixture(scope="module")
def mixed_file(assets) -> Path:
    return write_jsonl(assets / "mixed.jsonl", MIXED)


@pytest.fixture(scope="module")
def mixed(spec, tok, mixed_file) -> VLDataset:
    # train_on_prompt: every sample starts with a trained token, so a label crossing a boundary shows.
    return build(spec, tok, mixed_file, train_on_prompt=True)


def image_frames(prepared) -> list[np.ndarray]:
    return [item.frames for item in prepared.media if item.kind == "image"]


def video_frames(prepared) -> list[np.ndarray]:
    return [item.frames for item in prepared.media if item.kind == "video"]


@pytest.fixture(scope="module")
def alone(model, mixed):
    """Per sample: logits and loss of the model on that sample by itself (its own position ids)."""
    out = []
    with torch.no_grad():
        for i in range(len(mixed)):
            s = mixed[i]
            run = model(s.input_ids[None], labels=s.labels[None], media=s.media)
            out.append((run.logits[0], run.loss, n_targets(s.labels)))
    return out


@pytest.fixture(scope="module")
def packed_run(model, mixed):
    (row,) = mixed.batches(shuffle=False)
    batch = mixed.collate([mixed[i] for i in row])
    with torch.no_grad():
        return batch, model(**batch)


def test_mixed_samples_are_what_the_test_expects(mixed):
    kinds = [
        (len(image_frames(mixed.prepared(i))), len(video_frames(mixed.prepared(i))))
        for i in range(len(mixed))
    ]
    assert kinds == [(1, 0), (0, 1), (0, 0), (2, 0), (0, 0)]
    assert mixed.batches(shuffle=False) == [[0, 1, 2, 3, 4]]
    video = mixed.prepared(1)
    (item,) = video.media  # 2 s at 2 fps, 2 frames per patch
    assert item.frames.shape[0] == 4 and item.info == {"second_per_grid_t": 1.0}


# ---------------------------------------------------------------- 1. truncation


def test_truncation_cuts_text_and_drops_cut_media_or_untrainable(spec, tok, assets):
    path = write_jsonl(
        assets / "long.jsonl",
        [
            chat("Tell me a story.", "Once upon a time " * 40),  # long answer: cut
            chat(
                "word " * 80 + "<image>\nAnd this?", "A red patch.", images=["red.png"]
            ),  # image past the cut
            chat("word " * 80 + "What now?", "Nothing."),  # only prompt survives the cut
            chat("<image>\nShort.", "Yes.", images=["red.png"]),  # fits
        ],
    )
    full = build(spec, tok, path, seq_length=4096)
    assert [len(full.prepared(i)) > 64 for i in range(4)] == [True, True, True, False]
    lines: list[str] = []
    cut = build(spec, tok, path, lines, seq_length=64)
    assert len(cut) == 2
    long, short = cut.prepared(0), cut.prepared(1)
    assert long.source.endswith(":1") and short.source.endswith(":4")
    assert len(long) == 64 and long.position_ids.shape == (3, 64)
    assert torch.equal(long.input_ids, full.prepared(0).input_ids[:64])
    assert torch.equal(long.labels, full.prepared(0).labels[:64])
    assert torch.equal(long.position_ids, torch.arange(64).expand(3, -1))
    assert (long.labels != IGNORE_INDEX).any()
    assert torch.equal(short.input_ids, full.prepared(3).input_ids)
    assert skip_lines(lines) == [
        f"skipped 2 records (too_long), first at {path}:2: "
        f"{len(full.prepared(1))} tokens with media beyond seq_length 64"
    ]


def test_truncation_keeps_a_media_run_that_ends_at_the_limit(spec, tok, assets):
    path = write_jsonl(assets / "edge.jsonl", [chat("<image>", "A red patch.", images=["red.png"])])
    full = build(spec, tok, path, train_on_prompt=True).prepared(0)
    end = int((full.input_ids == spec.variant("tiny").vision_end_token_id).nonzero()[0, 0])
    kept = build(spec, tok, path, seq_length=end + 1, train_on_prompt=True).prepared(0)
    assert torch.equal(kept.input_ids, full.input_ids[: end + 1])
    assert torch.equal(kept.position_ids, full.position_ids[:, : end + 1])
    with pytest.raises(MmzooError, match="1 too_long"):  # the run's closing token is cut: dropped
        build(spec, tok, path, seq_length=end, train_on_prompt=True)


def test_truncation_keeps_a_sample_with_one_target_left(spec, tok, assets):
    path = write_jsonl(assets / "one.jsonl", [chat("word " * 30, "The answer.")])
    full = build(spec, tok, path).prepared(0)
    first = int((full.labels != IGNORE_INDEX).nonzero()[0, 0])  # first answer token
    kept = build(spec, tok, path, seq_length=first + 1).prepared(0)  # it is the last kept token
    assert n_targets(kept.labels) == 1 and torch.equal(kept.labels, full.labels[: first + 1])
    with pytest.raises(MmzooError, match="1 too_long"):
        build(spec, tok, path, seq_length=first)


# ---------------------------------------------------------------- 2. packing boundaries


def test_pack_is_greedy_in_order():
    assert pack([3, 4, 2, 5, 7, 1], 7) == [[0, 1], [2, 3], [4], [5]]
    with pytest.raises(ValueError, match="sample 1 has 8 tokens"):
        pack([3, 8], 7)


def test_packed_row_boundaries_positions_and_labels(spec, mixed, packed_run):
    batch, _ = packed_run
    samples = [mixed[i] for i in range(len(mixed))]
    lengths = [len(s) for s in samples]
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu.tolist() == np.cumsum([0, *lengths]).tolist()
    assert batch["input_ids"].shape == batch["labels"].shape == (1, sum(lengths))
    assert batch["position_ids"].shape == (3, 1, sum(lengths))
    config = spec.variant("tiny")
    for k, s in enumerate(samples):
        start, end = cu[k], cu[k + 1]
        # the trained M-RoPE rule, restated in the tests (the video's time row runs past its grid)
        own, _ = trained_positions(
            s.input_ids.tolist(),
            image_token=config.image_token_id,
            video_token=config.video_token_id,
            image_grids=s.media["image_grid_thw"].tolist() if "image_grid_thw" in s.media else [],
            video_grids=s.media["video_grid_thw"].tolist() if "video_grid_thw" in s.media else [],
            seconds=s.media["second_per_grid_ts"].tolist() if "second_per_grid_ts" in s.media else None,
        )
        assert batch["position_ids"][:, 0, start:end].tolist() == own
        assert batch["position_ids"][:, 0, start].tolist() == [0, 0, 0]  # restarts per sample
        assert torch.equal(batch["labels"][0, start:end], s.labels)
    labels = batch["labels"][0]
    target = shift_labels(labels, cu)
    for boundary in cu[1:-1].tolist():
        assert labels[boundary] != IGNORE_INDEX  # a naive shift would train on it...
        assert target[boundary - 1] == IGNORE_INDEX  # ...across the boundary; this one does not
    inside = torch.ones_like(labels, dtype=torch.bool)
    inside[cu[1:].long() - 1] = False
    assert torch.equal(target[inside], labels.roll(-1)[inside])


def test_packed_row_positions_follow_the_trained_rule_after_a_long_video(spec, tok, assets):
    """A 10 s video: its time row (0..18) runs past its merged grid; the text after it, and the
    next sample in the row, take the positions of the trained M-RoPE rule."""
    write_video(assets / "long.mp4", n_frames=40, fps=4)
    records = [
        chat("<video>\nWhat happens?", "Noise, for a while.", videos=["long.mp4"]),
        chat("Hi.", "Hello!"),
    ]
    data = build(spec, tok, write_jsonl(assets / "long.jsonl", records))
    (row,) = data.batches(shuffle=False)
    batch = data.collate([data[i] for i in row])
    config, video = spec.variant("tiny"), data[0]
    grid = video.media["video_grid_thw"].tolist()
    assert grid[0][0] == 10 and video.media["second_per_grid_ts"].tolist() == [1.0]
    cu = batch["cu_seqlens"].tolist()
    for k in range(2):
        s = data[k]
        own, _ = trained_positions(
            s.input_ids.tolist(),
            image_token=config.image_token_id,
            video_token=config.video_token_id,
            video_grids=grid if k == 0 else [],
            seconds=[1.0] if k == 0 else None,
        )
        assert batch["position_ids"][:, 0, cu[k] : cu[k + 1]].tolist() == own
    after_video = int((video.input_ids == config.vision_end_token_id).nonzero()[0, 0])
    assert batch["position_ids"][0, 0, after_video] > batch["position_ids"][1, 0, after_video - 1] + 2


def test_packed_loss_is_token_weighted_mean_of_sample_losses(alone, packed_run):
    _, out = packed_run
    losses = torch.stack([loss for _, loss, _ in alone])
    counts = torch.tensor([n for _, _, n in alone], dtype=torch.float32)
    torch.testing.assert_close(out.loss, (losses * counts).sum() / counts.sum())
    assert not torch.allclose(out.loss, losses.mean())  # the weighting is what is being checked


# ---------------------------------------------------------------- 3./4. packed and padded = alone


def test_packed_logits_equal_each_sample_alone(alone, packed_run):
    batch, out = packed_run
    cu = batch["cu_seqlens"].tolist()
    for k, (logits, _, _) in enumerate(alone):
        torch.testing.assert_close(out.logits[0, cu[k] : cu[k + 1]], logits)


def test_padded_logits_equal_each_sample_alone(model, mixed, alone, packed_run):
    padded = VLDataset(
        mixed.preprocessor, mixed.stores, replace(mixed.data, packing=False), mixed.pad_token_id
    )
    rows = padded.batches(micro_batch_size=len(padded), shuffle=False)
    assert rows == [[0, 1, 2, 3, 4]]
    batch = padded.collate([padded[i] for i in rows[0]])
    assert (
        "cu_seqlens" not in batch
        and "image_grid_thw" in batch["media"]
        and "video_grid_thw" in batch["media"]
    )
    with torch.no_grad():
        out = model(**batch)
    for r, (logits, _, _) in enumerate(alone):
        n = logits.shape[0]
        assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        torch.testing.assert_close(out.logits[r, :n], logits)
    torch.testing.assert_close(out.loss, packed_run[1].loss)


def test_packed_and_padded_give_equal_gradients_with_media(model, mixed):
    """Per-token loss: the packed row and the padded batch of images, video and text train alike."""
    padded = VLDataset(
        mixed.preprocessor, mixed.stores, replace(mixed.data, packing=False), mixed.pad_token_id
    )
    grads = []
    for data in (mixed, padded):
        (row,) = data.batches(micro_batch_size=len(data), shuffle=False)
        batch = data.collate([data[i] for i in row])
        tokens, count = batch_target_counts(batch)
        model.zero_grad()
        model(
            **batch, loss_reduction=LossReduction("per_token", total_tokens=tokens, total_samples=count)
        ).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad()
    packed, padded_grads = grads
    assert packed.keys() == padded_grads.keys()
    assert any(n.startswith("image_encoder.encoder.") for n in packed) and any(
        n.startswith("image_encoder.projector.") for n in packed
    )
    for name, grad in packed.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, padded_grads[name], msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------- 5. the dummy image


@pytest.mark.parametrize("packing", [True, False])
def test_every_batch_runs_the_vision_encoder_and_the_dummy_has_no_loss(spec, tok, model, assets, packing):
    path = write_jsonl(
        assets / "text.jsonl", [chat(f"Question {i}?", f"Answer number {i}.") for i in range(5)]
    )
    dataset = build(spec, tok, path, seq_length=64, packing=packing)
    batches = dataset.batches(micro_batch_size=1 if packing else 2, seed=3)  # packed: 2 samples a row
    assert len(batches) == 3 and sorted(sum(batches, [])) == list(range(5))
    calls = []
    vit = model.image_encoder.encoder
    hook = vit.register_forward_hook(lambda m, args, out: calls.append(args[0]["image_grid_thw"].tolist()))
    try:
        with torch.no_grad():
            for indices in batches:
                samples = [dataset[i] for i in indices]
                batch = dataset.collate(samples)
                image_token_id = model.config.image_token_id
                image_tokens = int((batch["input_ids"] == image_token_id).sum())
                assert image_tokens == 1 and batch["media"]["image_grid_thw"].tolist() == [[1, 2, 2]]
                assert (batch["labels"][batch["input_ids"] == image_token_id] == IGNORE_INDEX).all()
                with_dummy = model(**batch).loss
                if packing:
                    without = model(**collate_packed(samples)).loss
                else:
                    without = model(**collate_padded(samples, dataset.pad_token_id)).loss
                torch.testing.assert_close(with_dummy, without)
    finally:
        hook.remove()
    assert calls == [[[1, 2, 2]]] * len(batches)


def test_packed_micro_batches_hold_micro_batch_size_rows(spec, tok, assets):
    path = write_jsonl(
        assets / "text7.jsonl", [chat(f"Question {i}?", f"Answer number {i}.") for i in range(7)]
    )
    dataset = build(spec, tok, path, seq_length=64)
    rows = dataset.batches(micro_batch_size=1, seed=5)
    assert len(rows) == 4  # two samples (about 25 tokens each) per 64-token row, one left over
    pairs = dataset.batches(micro_batch_size=2, seed=5)
    assert pairs == [rows[0] + rows[1], rows[2] + rows[3]]
    batch = dataset.collate([dataset[i] for i in pairs[0]])
    lengths = [dataset.lengths[i] for i in pairs[0]]
    assert batch["input_ids"].shape == (1, sum(lengths) + len(dataset.dummy))  # one sequence, no padding
    ends = torch.tensor(lengths + [len(dataset.dummy)]).cumsum(0).tolist()
    assert len(lengths) == 4 and batch["cu_seqlens"].tolist() == [0, *ends]  # each sample on its own


def test_the_dummy_joins_only_batches_without_media(mixed):
    image_only, text_only = mixed[0], mixed[2]
    assert collate_packed([text_only])["media"] == {}
    packed = collate_packed([text_only], mixed.dummy)
    assert packed["cu_seqlens"].tolist() == [0, len(text_only), len(text_only) + len(mixed.dummy)]
    assert packed["media"]["pixel_values"].shape == (4, 1176)
    real = collate_packed([image_only, text_only], mixed.dummy)
    assert torch.equal(real["media"]["image_grid_thw"], image_only.media["image_grid_thw"])
    padded = collate_padded([text_only, text_only], 0, mixed.dummy)
    assert padded["attention_mask"].sum(1).tolist() == [len(text_only) + 3, len(text_only)]


# ---------------------------------------------------------------- 6. cache


def same_prepared(a, b) -> bool:
    return (
        torch.equal(a.input_ids, b.input_ids)
        and torch.equal(a.labels, b.labels)
        and torch.equal(a.position_ids, b.position_ids)
        and len(a.media) == len(b.media)
        and all(
            x.kind == y.kind and x.info == y.info and np.array_equal(x.frames, y.frames)
            for x, y in zip(a.media, b.media, strict=True)
        )
        and a.source == b.source
    )


def entries(cache: Path) -> list[str]:
    return sorted(os.listdir(cache))


def forbid_decoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("media decoded on a cache hit")

    for name in ("prepare_image", "prepare_video"):
        monkeypatch.setattr(qwen_media.QwenMediaProcessor, name, refuse)
    for name in ("load_image", "load_video"):
        monkeypatch.setattr(qwen_media, name, refuse)


def test_cache_hit_decodes_nothing_and_gives_the_same_samples(spec, tok, assets, tmp_path, monkeypatch):
    path = write_jsonl(
        tmp_path / "data.jsonl", [*MIXED, chat("<image>\nBroken?", "Yes.", images=["bad.png"])]
    )
    for name in ("red.png", "noise.png", "clip.mp4"):
        (tmp_path / name).write_bytes((assets / name).read_bytes())
    (tmp_path / "bad.png").write_bytes(b"not a png")
    cache = tmp_path / "cache"
    first_lines: list[str] = []
    first = build(spec, tok, path, first_lines, cache_dir=str(cache))
    assert entries(cache) == [entries(cache)[0]] and len(first) == len(MIXED)
    reference = build(spec, tok, path)  # no cache
    assert all(same_prepared(first.prepared(i), reference.prepared(i)) for i in range(len(first)))

    with monkeypatch.context() as patched:
        forbid_decoding(patched)
        lines: list[str] = []
        again = build(spec, tok, path, lines, cache_dir=str(cache))
        assert any("from cache" in line for line in lines)
        assert skip_lines(lines) == skip_lines(first_lines) != []
        assert f"first at {path}:{len(MIXED) + 1}" in skip_lines(lines)[0]
        assert len(again) == len(first) and again.lengths == first.lengths
        for i in range(len(first)):
            assert same_prepared(again.prepared(i), first.prepared(i))
            a, b = again[i], first[i]
            assert a.media.keys() == b.media.keys()
            assert all(torch.equal(a.media[k], b.media[k]) for k in a.media)
        # Batch layout is not a preprocessing setting: same entry.
        build(spec, tok, path, cache_dir=str(cache), packing=False)
        assert len(entries(cache)) == 1

    changes = [
        {"seq_length": 512},
        {"train_on_prompt": True},
        {"media": {**MEDIA, "max_pixels": 32 * 28 * 28}},
    ]
    for n, change in enumerate(changes, start=2):
        changed = build(spec, tok, path, cache_dir=str(cache), **change)
        assert len(entries(cache)) == n, change
    small, large = (
        image_frames(changed.prepared(3))[1],
        image_frames(first.prepared(3))[1],
    )  # the demo cat photo
    assert small.shape[1] * small.shape[2] <= 32 * 28 * 28 < large.shape[1] * large.shape[2]
    with path.open("a") as f:
        f.write(json.dumps(chat("One more?", "Yes.")) + "\n")
    grown = build(spec, tok, path, cache_dir=str(cache))
    assert len(entries(cache)) == len(changes) + 2 and len(grown) == len(MIXED) + 1
    assert not [name for name in entries(cache) if name.startswith(".")]


def test_cache_misses_when_plugin_template_tokenizer_or_media_change(spec, tmp_path, monkeypatch):
    """Each ingredient of preprocessing, changed alone, gives a new entry: never a stale sample."""
    import shutil

    from mmzoo import registry
    from mmzoo.data.tokenizer import load_tokenizer, qwen_tokenizer_dir

    path = write_jsonl(tmp_path / "data.jsonl", [chat("Is it in the box?", "It is in the box.")])
    tok_dir = tmp_path / "tokenizer"
    shutil.copytree(qwen_tokenizer_dir(), tok_dir)
    tok = load_tokenizer(tok_dir)
    cache = tmp_path / "cache"

    def ids(spec=spec, tok=tok, **data) -> list[int]:
        return build(spec, tok, path, cache_dir=str(cache), **data).prepared(0).input_ids.tolist()

    first = ids()
    assert ids() == first and len(entries(cache)) == 1  # a hit

    # A newer plugin release (its media processor or position ids may have changed).
    registered = registry._collect()[spec.name]
    newer = replace(
        registered, plugin=replace(registered.plugin, version=registered.plugin.version + ".post1")
    )
    with monkeypatch.context() as patched:
        patched.setitem(registry._collect(), spec.name, newer)
        assert ids() == first and len(entries(cache)) == 2

    # The same template name with other content: the default system prompt is in every sample.
    brief = replace(spec, template=replace(spec.template, default_system="Be brief."))
    assert ids(spec=brief) != first and len(entries(cache)) == 3

    # The tokenizer directory edited in place (same path, same size): one merge fewer.
    tokenizer_json = tok_dir / "tokenizer.json"
    content = json.loads(tokenizer_json.read_text())
    content["model"]["merges"].remove(["i", "n"])
    tokenizer_json.write_text(json.dumps(content))
    edited = load_tokenizer(tok_dir)
    assert len(edited) == len(tok) and edited.name_or_path == tok.name_or_path
    assert ids(tok=edited) != first and len(entries(cache)) == 4

    # Another special-token map (eos) in tokenizer_config.json.
    config_json = tok_dir / "tokenizer_config.json"
    config_json.write_text(
        config_json.read_text().replace('"eos_token": "<|im_end|>"', '"eos_token": "<|endoftext|>"')
    )
    eos = load_tokenizer(tok_dir)
    assert eos.eos_token == "<|endoftext|>"
    ids(tok=eos)
    assert len(entries(cache)) == 5

    # Media settings (sizes and frame rate).
    ids(tok=eos, media={**MEDIA, "fps": 1.0})
    assert len(entries(cache)) == 6


def test_same_file_content_elsewhere_gets_its_own_entry(spec, tok, tmp_path):
    # Relative media paths resolve per directory: equal JSONL text can mean different images.
    cache = str(tmp_path / "cache")
    pixels = []
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / name).mkdir()
        Image.new("RGB", (56, 56), colour).save(tmp_path / name / "x.png")
        path = write_jsonl(tmp_path / name / "data.jsonl", [chat("<image>", "A colour.", images=["x.png"])])
        prepared = build(spec, tok, path, cache_dir=cache).prepared(0)
        assert prepared.source == f"{path}:1"
        pixels.append(image_frames(prepared)[0][0, 0, 0].tolist())
    assert pixels == [[255, 0, 0], [0, 0, 255]]


def test_a_failed_build_leaves_no_temporary_entry(spec, tok, assets, tmp_path):
    path = write_jsonl(
        tmp_path / "data.jsonl", [chat("Hi.", "Hello."), chat("<image>", "?", images=["bad.png"])]
    )
    (tmp_path / "bad.png").write_bytes(b"not a png")
    cache = tmp_path / "cache"
    with pytest.raises(MmzooError, match=f"{path}:2"):
        build(spec, tok, path, cache_dir=str(cache), strict=True)
    assert entries(cache) == []


def test_a_killed_builds_temporary_is_removed_by_the_next_build(spec, tok, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [chat("Hi.", "Hello.")])
    cache = tmp_path / "cache"
    build(spec, tok, path, cache_dir=str(cache))
    (key,) = entries(cache)
    shutil.rmtree(cache / key)
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    assert killed.wait() == 0
    partial = cache / f".{key}.tmp-{killed.pid}-0123abcd@{socket.gethostname()}"  # its writer is gone
    partial.mkdir()
    (partial / "samples-00000.safetensors").write_bytes(b"partial")
    assert len(build(spec, tok, path, cache_dir=str(cache))) == 1
    assert entries(cache) == [key]


def _build_in_child(data: DataConfig, tokenizer, barrier, results) -> None:
    """Build ``data`` once both processes are preprocessing (both missed the cache)."""
    from mmzoo.data import pipeline

    real = pipeline.Preprocessor.prepare
    waited = []

    def prepare(self, record, report):
        if not waited:
            waited.append(barrier.wait(timeout=120))
        return real(self, record, report)

    pipeline.Preprocessor.prepare = prepare
    spec = mmzoo.get_model("qwen2_5_vl")
    dataset = build_dataset(spec, spec.variant("tiny"), tokenizer, data, log=lambda _: None)
    results.put([dataset.prepared(i).input_ids.tolist() for i in range(len(dataset))])


def test_two_processes_building_one_entry_both_succeed(spec, tok, mixed_file, tmp_path):
    cache = tmp_path / "cache"
    data = DataConfig(data=str(mixed_file), seq_length=1024, media=MEDIA, cache_dir=str(cache))
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=_build_in_child, args=(data, tok, barrier, results)) for _ in range(2)]
    for w in workers:
        w.start()
    got, deadline = [], time.monotonic() + 180
    while len(got) < len(workers) and time.monotonic() < deadline:
        try:
            got.append(results.get(timeout=0.5))
        except queue.Empty:
            if any(w.exitcode not in (None, 0) for w in workers):
                break  # a worker failed: report it now rather than at the deadline
    for w in workers:
        w.join(timeout=10)
        if w.is_alive():
            w.kill()
    assert [w.exitcode for w in workers] == [0, 0]
    (name,) = entries(cache)  # one entry, no temporary directories left
    entry = CacheEntry(cache / name)
    expected = [s.input_ids.tolist() for s in build(spec, tok, mixed_file)]
    assert got == [expected, expected]
    assert [entry[i].input_ids.tolist() for i in range(len(entry))] == expected


# ---------------------------------------------------------------- 7. bad media


@pytest.fixture
def bad_media(tmp_path, assets) -> Path:
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    (tmp_path / "truncated.jpg").write_bytes((DEMO / "chelsea.jpg").read_bytes()[:3000])
    (tmp_path / "zeros.mp4").write_bytes(b"\x00" * 1000)
    (tmp_path / "red.png").write_bytes((assets / "red.png").read_bytes())
    return tmp_path


def test_bad_media_are_skipped_with_reasons(spec, tok, bad_media):
    path = write_jsonl(
        bad_media / "data.jsonl",
        [
            chat("Hi.", "Hello."),
            chat("<image>", "?", images=["garbage.png"]),
            chat("<image>", "?", images=["truncated.jpg"]),
            chat("<video>", "?", videos=["zeros.mp4"]),
            chat("<image>", "Red.", images=["red.png"]),
        ],
    )
    lines: list[str] = []
    dataset = build(spec, tok, path, lines)
    assert [dataset.prepared(i).source for i in range(len(dataset))] == [f"{path}:1", f"{path}:5"]
    corrupt, video = skip_lines(lines)
    assert corrupt.startswith(f"skipped 2 records (corrupt_image), first at {path}:2: ")
    assert "garbage.png" in corrupt
    assert video.startswith(f"skipped 1 record (unreadable_video), first at {path}:4: ")
    assert "zeros.mp4" in video
    with pytest.raises(MmzooError, match=rf"{path}:2: .*corrupt_image.*garbage\.png"):
        build(spec, tok, path, strict=True)
    video_first = write_jsonl(
        bad_media / "video.jsonl", [chat("Hi.", "Hello."), chat("<video>", "?", videos=["zeros.mp4"])]
    )
    with pytest.raises(MmzooError, match=rf"{video_first}:2: .*unreadable_video"):
        build(spec, tok, video_first, strict=True)


def test_a_dataset_of_only_bad_records_is_an_error(spec, tok, bad_media):
    path = write_jsonl(
        bad_media / "data.jsonl",
        [chat("<image>", "?", images=["garbage.png"]), chat("<video>", "?", videos=["zeros.mp4"])],
    )
    with pytest.raises(MmzooError, match="no usable training samples.*1 corrupt_image, 1 unreadable_video"):
        build(spec, tok, path)


def test_special_tokens_typed_in_text_skip_the_record(spec, tok, tmp_path):
    path = write_jsonl(
        tmp_path / "data.jsonl", [chat("What is <|image_pad|>?", "A token."), chat("Hi.", "Hello.")]
    )
    lines: list[str] = []
    dataset = build(spec, tok, path, lines)
    assert len(dataset) == 1 and dataset.prepared(0).source == f"{path}:2"
    assert skip_lines(lines)[0].startswith(f"skipped 1 record (bad_structure), first at {path}:1: ")


# ---------------------------------------------------------------- 8. a mixed batch trains


def test_mixed_packed_batch_trains(model, spec, packed_run):
    batch, _ = packed_run
    merge = spec.variant("tiny").vision.spatial_merge_size
    media = batch["media"]
    for pixels, grid, token in (
        ("pixel_values", "image_grid_thw", model.config.image_token_id),
        ("pixel_values_videos", "video_grid_thw", model.config.video_token_id),
    ):
        tokens = int((batch["input_ids"] == token).sum())
        assert tokens == int(media[grid].prod(-1).sum()) // merge**2 == media[pixels].shape[0] // merge**2
        with torch.no_grad():
            assert model.image_encoder({pixels: media[pixels], grid: media[grid]}).shape[0] == tokens
    assert media["image_grid_thw"].shape[0] == 3 and media["video_grid_thw"].shape[0] == 1
    model.zero_grad()
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.image_encoder.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.zero_grad()
