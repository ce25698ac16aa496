"""Bad checkpoints give one-line errors that say what is wrong and what to do."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import mmzoo


@pytest.fixture
def ckpt(hf_dir, tmp_path):
    """A writable copy of the tiny HF checkpoint."""
    path = tmp_path / "ckpt"
    shutil.copytree(hf_dir, path)
    return path


def edit_weights(path, fn):
    weights = load_file(path / "model.safetensors")
    fn(weights)
    save_file(weights, path / "model.safetensors")


def expect_error(path, match):
    with pytest.raises(mmzoo.MmzooError, match=match) as info:
        mmzoo.load_model(path)
    assert "\n" not in str(info.value)


def test_wrong_path(tmp_path):
    expect_error(tmp_path / "nope", "no such directory")


def test_directory_without_config(tmp_path):
    expect_error(tmp_path, "no config.json here")


def test_unknown_architecture(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["LlavaForConditionalGeneration"]
    (ckpt / "config.json").write_text(json.dumps(config))
    expect_error(ckpt, "no installed plugin reads the architecture 'LlavaForConditionalGeneration'")


def test_missing_weights_are_named(ckpt):
    edit_weights(ckpt, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    expect_error(ckpt, r"1 weights missing .*model\.layers\.1\.mlp\.up_proj\.weight")


def test_unexpected_weights_are_named(ckpt):
    edit_weights(ckpt, lambda w: w.__setitem__("model.layers.9.extra.weight", torch.zeros(2)))
    expect_error(ckpt, r"unexpected weights .*model\.layers\.9\.extra\.weight")


def test_shape_mismatch(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (ckpt / "config.json").write_text(json.dumps(config))
    expect_error(ckpt, r"shape mismatch for text_decoder\.decoder\.layers\.0\.mlp\.linear_fc1\.weight")


def test_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    expect_error(ckpt, r"no \*\.safetensors weights found")
