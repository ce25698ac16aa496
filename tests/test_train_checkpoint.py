"""Training checkpoints: exact resume, crash safety, pruning, optional optimizer/RNG state."""

from __future__ import annotations

import random
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import mmzoo
from mmzoo.checkpoint.mm import TRACKER
from mmzoo.train import checkpoint as ckpt
from mmzoo.train.checkpoint import (
    SaveOptions,
    TrainingCheckpoint,
    latest_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)

# Placeholder ids above the 0..999 range example_batch draws its words from, so they never collide.
TINY = dict(
    text={"vocab_size": 1024},
    image_token_id=1022,
    video_token_id=1023,
    vision_start_token_id=1020,
    vision_end_token_id=1021,
)
SPEC = mmzoo.get_model("qwen2_5_vl")


def make(seed: int, params=None):
    torch.manual_seed(seed)
    model = mmzoo.build_model("qwen2_5_vl", "tiny", **TINY)
    optimizer = torch.optim.AdamW(
        params(model) if params else model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    return model, optimizer, scheduler


def contents(model, optimizer, scheduler, state=None) -> TrainingCheckpoint:
    return TrainingCheckpoint(model, optimizer, scheduler, state or {}, variant="tiny")


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def train_step(model, optimizer, scheduler, step: int) -> torch.Tensor:
    batch = SPEC.example_batch(model.config, seed=step)
    # Draw from every RNG the checkpoint restores, so a resume without them would diverge.
    noise = 1 + 0.01 * (torch.rand(()) + random.random() + np.random.rand())
    loss = model(**batch).loss * noise
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def names(root):
    return sorted(p.name for p in root.iterdir())


def test_resume_is_bitwise_exact(tmp_path):
    model, optimizer, scheduler = make(0)
    seed_all(1)
    losses = []
    for step in range(6):
        losses.append(train_step(model, optimizer, scheduler, step))
        if step + 1 == 3:
            state = {"step": 3, "epoch": 0, "position": 3, "tokens_seen": 123}
            save_training_checkpoint(tmp_path, 3, contents(model, optimizer, scheduler, state))
            at_save = {k: v.clone() for k, v in model.state_dict().items()}

    out = tmp_path / "iter_0000003"
    assert names(tmp_path) == ["iter_0000003", TRACKER]
    assert names(out) == ["mp_rank_00", "scheduler.json", "trainer_state.json"]
    assert names(out / "mp_rank_00") == [
        "mm_meta.json",
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "rng.json",
        "rng.safetensors",
    ]
    assert latest_checkpoint(tmp_path) == out

    # A different init and different RNG streams: everything must come from the checkpoint.
    resumed, optimizer2, scheduler2 = make(42)
    seed_all(7)
    trainer_state = load_training_checkpoint(tmp_path, resumed, optimizer2, scheduler2)
    assert trainer_state == {"step": 3, "epoch": 0, "position": 3, "tokens_seen": 123}
    assert optimizer2.param_groups[0]["betas"] == (0.9, 0.95)
    resumed_losses = [train_step(resumed, optimizer2, scheduler2, step) for step in range(3, 6)]

    for a, b in zip(losses[3:], resumed_losses, strict=True):
        assert torch.equal(a, b), (losses[3:], resumed_losses)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    # The weights are an mm checkpoint: mmzoo.load_model reads them directly.
    for name, tensor in mmzoo.load_model(out).state_dict().items():
        assert torch.equal(tensor, at_save[name]), name


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer, scheduler = make(0)
    train_step(model, optimizer, scheduler, 0)
    save_training_checkpoint(tmp_path, 1, contents(model, optimizer, scheduler, {"step": 1}))
    train_step(model, optimizer, scheduler, 1)

    def crash(optimizer, model, shard):
        assert (shard / "model.safetensors").is_file()  # the model part is already written
        raise RuntimeError("killed")

    monkeypatch.setattr(ckpt, "_write_optimizer", crash)
    with pytest.raises(RuntimeError, match="killed"):
        save_training_checkpoint(tmp_path, 2, contents(model, optimizer, scheduler, {"step": 2}))
    monkeypatch.undo()
    assert names(tmp_path) == ["iter_0000001", TRACKER]
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_0000001"
    fresh, optimizer2, scheduler2 = make(5)
    assert load_training_checkpoint(tmp_path, fresh, optimizer2, scheduler2) == {"step": 1}

    # A process killed mid-save leaves a dot-named temporary naming it; the next save removes it.
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    assert killed.wait() == 0
    stale = tmp_path / f".iter_0000002.tmp-{killed.pid}-deadbeef@{socket.gethostname()}" / "mp_rank_00"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    save_training_checkpoint(tmp_path, 2, contents(model, optimizer, scheduler, {"step": 2}))
    assert names(tmp_path) == ["iter_0000001", "iter_0000002", TRACKER]


def test_bad_trainer_state_changes_nothing(tmp_path):
    model, optimizer, scheduler = make(0)
    with pytest.raises(mmzoo.MmzooError, match="trainer_state.json.*only JSON values"):
        save_training_checkpoint(tmp_path, 1, contents(model, optimizer, scheduler, {"x": object()}))
    assert names(tmp_path) == []
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None


def test_keep_last(tmp_path):
    model, optimizer, scheduler = make(0)
    keep_two = SaveOptions(keep_last=2)
    for step in range(1, 5):
        save_training_checkpoint(tmp_path, step, contents(model, optimizer, scheduler), keep_two)
    assert names(tmp_path) == ["iter_0000003", "iter_0000004", TRACKER]
    assert (tmp_path / TRACKER).read_text() == "4"
    with pytest.raises(mmzoo.MmzooError, match="keep_last must be at least 1"):
        SaveOptions(keep_last=0)


def test_weights_only_checkpoint(tmp_path):
    model, optimizer, scheduler = make(0)
    train_step(model, optimizer, scheduler, 0)
    options = SaveOptions(save_optimizer=False, save_rng=False)
    out = save_training_checkpoint(tmp_path, 1, contents(model, optimizer, scheduler, {"step": 1}), options)
    assert names(out / "mp_rank_00") == ["mm_meta.json", "model.safetensors"]

    fresh, optimizer2, scheduler2 = make(3)
    with pytest.raises(mmzoo.MmzooError, match="has no optimizer state.*load_optimizer=False"):
        load_training_checkpoint(out, fresh, optimizer2, scheduler2)
    assert not torch.equal(next(fresh.parameters()), next(model.parameters()))  # untouched by the error
    with pytest.warns(UserWarning, match="no RNG state"):
        state = load_training_checkpoint(out, fresh, optimizer2, scheduler2, load_optimizer=False)
    assert state == {"step": 1}
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not optimizer2.state  # a fresh optimizer
    assert scheduler2.last_epoch == 1


def test_optimizer_mismatch_is_named(tmp_path):
    model, optimizer, scheduler = make(0)
    train_step(model, optimizer, scheduler, 0)
    save_training_checkpoint(tmp_path, 1, contents(model, optimizer, scheduler))
    # Same model, but the vision tower is frozen (left out of the optimizer).
    fresh, optimizer2, scheduler2 = make(
        0, params=lambda m: [p for n, p in m.named_parameters() if not n.startswith("image_encoder.encoder.")]
    )
    with pytest.raises(mmzoo.MmzooError, match=r"group 0 differs.*saved but not optimized: image_encoder"):
        load_training_checkpoint(tmp_path, fresh, optimizer2, scheduler2)
