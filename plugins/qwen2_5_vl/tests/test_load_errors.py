"""Bad checkpoints give one-line errors that say what is wrong and what to do, at every entry point."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import mmzoo
from mmzoo.cli import main


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


# --- truncated or garbage safetensors files, at every entry point that reads them ----------------

CUTS = {"half": lambda data: data[: len(data) // 2], "100 bytes": lambda data: data[:100]}
SMALL_RUN = ["--data.max_samples", "2", "--data.seq_length", "448", "--train.tensorboard", "false"]


@pytest.fixture(params=list(CUTS))
def cut(request):
    """Truncates a file in place: to half its length, or to its first 100 bytes."""

    def truncate(file):
        file.write_bytes(CUTS[request.param](file.read_bytes()))
        return file

    return truncate


@pytest.fixture(scope="module")
def mm_root(hf_dir, tmp_path_factory):
    from mmzoo.checkpoint.conversion import hf_to_mm

    return hf_to_mm(hf_dir, tmp_path_factory.mktemp("mm") / "ckpt", report=lambda line: None)


@pytest.fixture
def mm(mm_root, tmp_path):
    """A writable copy of the tiny mm checkpoint."""
    return shutil.copytree(mm_root, tmp_path / "mm")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A one-step training run of the tiny model (a checkpoint --resume reads)."""
    from mmzoo.config import load_config
    from mmzoo.train.loop import train

    out = tmp_path_factory.mktemp("run")
    train(load_config(None, [*SMALL_RUN, "--train.steps", "1", "--train.output_dir", str(out)]), out=print)
    return out


def mm_weights(root):
    return root / "release" / "mp_rank_00" / "model.safetensors"


def expect_cli_error(capsys, args, file):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.splitlines()[-1]  # after progress lines such as "preprocessing ..."
    assert last.startswith(f"mmzoo: error: {file}: not a readable safetensors file (")
    assert last.endswith("it is truncated or corrupt, copy or download it again")


def test_api_truncated_hf_weights(ckpt, cut):
    file = cut(ckpt / "model.safetensors")
    expect_error(ckpt, f"{file}: not a readable safetensors file")


def test_api_truncated_mm_weights(mm, cut):
    file = cut(mm_weights(mm))
    expect_error(mm, f"{file}: not a readable safetensors file")
    with pytest.raises(mmzoo.MmzooError, match="not a readable safetensors file"):
        mmzoo.load_model(mm, dtype="auto")  # reads a tensor to find the dtype first


def test_api_garbage_weights(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"not a checkpoint at all" * 8)
    expect_error(ckpt, f"{ckpt / 'model.safetensors'}: not a readable safetensors file")


def test_api_sharded_hf_with_a_truncated_shard(hf_model, tmp_path, cut):
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    file = cut(shards[1])  # listed in the index, opened only when its first tensor is read
    expect_error(tmp_path, f"{file}: not a readable safetensors file")


@pytest.mark.parametrize("kind", ["hf", "mm"])
def test_infer_cli(kind, ckpt, mm, cut, capsys):
    root, file = (ckpt, ckpt / "model.safetensors") if kind == "hf" else (mm, mm_weights(mm))
    cut(file)
    expect_cli_error(capsys, ["infer", "--model-dir", str(root), "--prompt", "hi"], file)


def test_convert_hf_to_mm_cli(ckpt, cut, tmp_path, capsys):
    file = cut(ckpt / "model.safetensors")
    out = tmp_path / "out"
    expect_cli_error(capsys, ["convert", "hf-to-mm", "--hf-dir", str(ckpt), "--mm-dir", str(out)], file)
    assert not out.exists()


def test_convert_mm_to_hf_cli(mm, cut, tmp_path, capsys):
    file = cut(mm_weights(mm))
    out = tmp_path / "out"
    expect_cli_error(capsys, ["convert", "mm-to-hf", "--mm-dir", str(mm), "--hf-dir", str(out)], file)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["hf", "mm"])
def test_train_model_load_cli(kind, ckpt, mm, cut, tmp_path, capsys):
    root, file = (ckpt, ckpt / "model.safetensors") if kind == "hf" else (mm, mm_weights(mm))
    cut(file)
    args = ["train", *SMALL_RUN, "--train.output_dir", str(tmp_path / "run"), "--model.load", str(root)]
    expect_cli_error(capsys, args, file)


@pytest.mark.parametrize("name", ["model", "optimizer", "rng"])
def test_train_resume_cli(name, run_dir, cut, tmp_path, capsys):
    run = shutil.copytree(run_dir, tmp_path / "run")
    file = cut(run / "iter_0000001" / "mp_rank_00" / f"{name}.safetensors")
    args = ["train", *SMALL_RUN, "--train.steps", "2", "--train.output_dir", str(run), "--resume"]
    expect_cli_error(capsys, args, file)


@pytest.mark.parametrize(
    "name", ["trainer_state.json", "scheduler.json", "mp_rank_00/optimizer.json", "mp_rank_00/rng.json"]
)
def test_train_resume_cli_truncated_json(name, run_dir, tmp_path, capsys):
    run = shutil.copytree(run_dir, tmp_path / "run")
    file = run / "iter_0000001" / name
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    args = ["train", *SMALL_RUN, "--train.steps", "2", "--train.output_dir", str(run), "--resume"]
    assert main(args) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"mmzoo: error: {file}: not valid JSON (")
    assert last.endswith("it is truncated or corrupt")
