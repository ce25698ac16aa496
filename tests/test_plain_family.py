"""A family with nothing of Qwen2.5-VL (LayerNorm ViT, no M-RoPE, its own media batch) registers
through the protocols and trains, with no change to the core (tests/plain_family.py)."""

from __future__ import annotations

import torch
from plain_family import NAME

import mmzoo
from mmzoo.cli import main


def test_it_registers_and_runs_forward_and_backward(plain):
    assert NAME in [r.spec.name for r in mmzoo.all_models()]
    model = mmzoo.build_model(NAME, "tiny")
    batch = plain.example_batch(model.config)
    out = model(**batch)
    out.loss.backward()
    vit = model.image_encoder.encoder
    assert vit.encoder.layers[0].input_layernorm.bias.grad is not None  # a LayerNorm, trained
    assert out.logits.shape == (1, 11, model.config.text.vocab_size)


def test_it_trains_for_two_steps_and_loads_back(plain, tmp_path, capsys):
    args = ["train", "--model", NAME, "--data.max_samples", "4", "--train.steps", "2"]
    assert main([*args, "--train.tensorboard", "false", "--train.output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "total            4.92M  (4.92M trainable, 100.00%)" in out
    assert (tmp_path / "iter_0000002").is_dir()
    model = mmzoo.load_model(tmp_path)
    assert model.name == NAME and isinstance(model.image_encoder.encoder.position, torch.nn.Parameter)
