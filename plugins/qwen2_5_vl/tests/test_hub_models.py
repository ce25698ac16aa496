"""Checkpoints by Hub id, read offline from a Hub cache laid out by the test as huggingface_hub
lays it out: ``models--org--name/{blobs/<sha256>, snapshots/<commit>/<file -> blob>, refs/<branch>}``.

``org/name`` holds two commits: ``main`` a tiny real-vocabulary model that answers "Hello"
(test_generate's), branch ``v1`` another tiny model. Every entry point must read the weights of
the commit the id names, exactly as from the local directory.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from PIL import Image
from tiny_hf import infer_args

import mmzoo
from mmzoo.checkpoint.hf_export import save_hf
from mmzoo.cli import main
from mmzoo.commands.mm_convert import main as mm_convert_main

DEMO = Path(mmzoo.__file__).parent / "demo" / "demo.jsonl"
MAIN, V1 = hashlib.sha1(b"main").hexdigest(), hashlib.sha1(b"v1").hexdigest()  # commit hashes


def add_commit(cache: Path, repo_id: str, source: Path, commit: str, branch: str) -> None:
    """Lay ``source``'s files into ``cache`` as commit ``commit`` of ``repo_id``, head of ``branch``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)  # no newline: huggingface_hub reads it verbatim


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    model = mmzoo.build_model("qwen2_5_vl", "tiny")
    spec = mmzoo.get_model("qwen2_5_vl")
    return save_hf(model, tmp_path_factory.mktemp("other") / "hf", tokenizer=spec.default_tokenizer())


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, hello_dir, other_dir) -> Path:
    cache = tmp_path_factory.mktemp("hf-home") / "hub"
    add_commit(cache, "org/name", hello_dir, MAIN, "main")
    add_commit(cache, "org/name", other_dir, V1, "v1")
    return cache


@pytest.fixture
def hub(cache_dir, monkeypatch) -> Path:
    """huggingface_hub offline on the laid-out cache (its settings are read at import: patch them)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache_dir


def state(path: str | Path) -> dict[str, torch.Tensor]:
    return mmzoo.load_model(path).state_dict()


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


@pytest.fixture(scope="module")
def weights(hello_dir, other_dir) -> dict[str, dict[str, torch.Tensor]]:
    return {"main": state(hello_dir), "v1": state(other_dir)}


def test_load_model_reads_the_commit_the_id_names(hub, weights):
    assert not torch.equal(*(w["text_decoder.embedding.word_embeddings.weight"] for w in weights.values()))
    assert_same(state("org/name"), weights["main"])
    assert_same(state(f"org/name@{MAIN}"), weights["main"])
    assert_same(state("org/name@v1"), weights["v1"])
    assert_same(state(f"org/name@{V1}"), weights["v1"])


def test_infer_by_id(hub, capsys):
    assert main(infer_args("org/name", "--prompt", "Who is there?")) == 0
    assert capsys.readouterr().out == "Hello\n"
    # The v1 model with main's tokenizer: the same tokenizer, another answer.
    assert main(infer_args("org/name@v1", "--tokenizer", f"org/name@{MAIN}", "--prompt", "Who?")) == 0
    assert capsys.readouterr().out != "Hello\n"


def test_convert_hf_to_mm_by_id(hub, weights, tmp_path):
    mm = tmp_path / "mm"
    assert main(["convert", "hf-to-mm", "--hf-dir", "org/name@v1", "--mm-dir", str(mm), "--tp", "2"]) == 0
    assert_same(state(mm), weights["v1"])
    assert (mm / "release" / "hf_assets" / "tokenizer.json").is_file()


@pytest.fixture
def bare_mm(hello_dir, tmp_path) -> Path:
    """hello_dir as an mm checkpoint without mm_meta.json or hf_assets (as MindSpeed-MM writes it):
    its config, tokenizer and processor files can only come from the template."""
    mm = tmp_path / "bare"
    assert main(["convert", "hf-to-mm", "--hf-dir", str(hello_dir), "--mm-dir", str(mm), "--tp", "2"]) == 0
    for meta in mm.rglob("mm_meta.json"):
        meta.unlink()
    shutil.rmtree(mm / "release" / "hf_assets")
    return mm


def test_convert_templates_by_id(hub, weights, bare_mm, tmp_path, capsys):
    hf, re = tmp_path / "hf", tmp_path / "re"
    assert (
        main(
            [
                "convert",
                "mm-to-hf",
                "--mm-dir",
                str(bare_mm),
                "--hf-dir",
                str(hf),
                "--hf-template",
                "org/name",
            ]
        )
        == 0
    )
    assert (hf / "tokenizer.json").read_bytes() == (hub_snapshot(hub, MAIN) / "tokenizer.json").read_bytes()
    assert_same(state(hf), weights["main"])
    args = [
        "convert",
        "resplit",
        "--src",
        str(bare_mm),
        "--dst",
        str(re),
        "--hf-template",
        f"org/name@{MAIN}",
    ]
    assert main(args) == 0
    assert_same(state(re), weights["main"])
    capsys.readouterr()
    missing = ["convert", "mm-to-hf", "--mm-dir", str(bare_mm), "--hf-dir", str(tmp_path / "no")]
    assert main([*missing, "--hf-template", "org/missing"]) == 2
    assert capsys.readouterr().err.startswith("mmzoo: error: org/missing@main (Hub cache ")


def test_mm_convert_template_by_id(hub, weights, bare_mm, tmp_path, capsys):
    hf = tmp_path / "hf"
    args = ["Qwen2_5_VLConverter", "mm_to_hf", "--cfg.mm_dir", str(bare_mm), "--cfg.save_hf_dir", str(hf)]
    args += ["--cfg.common_model_config.enable_canonical_hf_struct", "false", "--cfg.hf_config.hf_dir"]
    assert mm_convert_main([*args, "org/name"]) == 0
    assert (hf / "tokenizer.json").read_bytes() == (hub_snapshot(hub, MAIN) / "tokenizer.json").read_bytes()
    assert_same(state(hf), weights["main"])
    capsys.readouterr()
    # v1's config.json (a tied output layer) does not describe these shards: the revision was read.
    assert mm_convert_main([*args, "org/name@v1", "--cfg.force", "true"]) == 2
    err = capsys.readouterr().err
    assert f"does not hold the qwen2_5_vl model {hub_snapshot(hub, V1) / 'config.json'}" in err


def test_data_inspect_tokenizer_by_id(hub, hello_dir, capsys):
    inspect = ["data", "inspect", "--model", "qwen2_5_vl", "--data", str(DEMO), "--max-pixels", "12544"]
    assert main([*inspect, "--tokenizer", str(hello_dir)]) == 0
    local = capsys.readouterr().out
    assert main([*inspect, "--tokenizer", "org/name@v1"]) == 0
    assert capsys.readouterr().out == local and "<|im_start|>" in local
    assert main([*inspect, "--tokenizer", "org/missing"]) == 2
    assert capsys.readouterr().err.startswith("mmzoo: error: org/missing@main (Hub cache ")


def hub_snapshot(cache: Path, commit: str) -> Path:
    return cache / "models--org--name" / "snapshots" / commit


def test_train_starts_from_the_id(hub, weights, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model.load", "org/name@v1", "--train.steps", "1", "--train.lr", "0"]
    args += ["--data.media", "{min_pixels: 3136, max_pixels: 3136}", "--train.tensorboard", "false"]
    args += ["--train.output_dir", str(out)]
    args += ["--save-hf", str(tmp_path / "hf")]
    assert main(args) == 0
    assert_same(state(out), weights["v1"])  # lr 0: the loaded weights, saved unchanged
    assert (tmp_path / "hf" / "tokenizer.json").is_file()  # the snapshot is the export's template


def test_a_local_directory_named_like_the_id_wins(hub, weights, other_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").symlink_to(other_dir)
    assert_same(state("org/name"), weights["v1"])  # the Hub's main is the other model


def hub_env(cache_dir: Path, tmp_path: Path) -> dict[str, str]:
    """The environment without huggingface_hub settings, then ``HF_HOME`` (whose ``hub`` is the
    laid-out cache) and ``HF_HUB_OFFLINE=1``, as a user sets them."""
    home = tmp_path / "hf-home"
    home.mkdir()
    (home / "hub").symlink_to(cache_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return {**env, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}


def test_environment_settings_are_honoured(cache_dir, tmp_path):
    """HF_HOME and HF_HUB_OFFLINE as a user sets them, in a fresh process."""
    env = hub_env(cache_dir, tmp_path)
    script = (
        "import sys; from mmzoo.cli import main; "
        f"main({infer_args('org/name', '--prompt', 'Who is there?')!r}); "
        "sys.exit(main(['infer', '--model-dir', 'org/other', '--prompt', 'hi']))"
    )
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout == "Hello\n"
    assert done.returncode == 2
    cache = tmp_path / "hf-home" / "hub"
    assert f"org/other@main (Hub cache {cache}): not in the cache and HF_HUB_OFFLINE is set" in done.stderr


def test_eval_by_id(hub, tmp_path, capsys):
    """`mmzoo eval` on a one-question TSV: the "Hello" model answers B."""
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), "gray").save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    tsv = tmp_path / "ai2d.tsv"
    tsv.write_text(f"index\timage\tquestion\tA\tB\tanswer\n1\t{image}\tGreeting?\tBye\tHello\tB\n")
    args = infer_args("org/name", "--dataset", "ai2d_test", "--data", str(tsv), "--out", str(tmp_path))
    assert main(["eval", *args[1:]]) == 0  # infer's model options, eval's command
    assert capsys.readouterr().out.startswith("ai2d_test accuracy: 100.00 over 1 questions")


@pytest.mark.slow
def test_train_on_two_ranks_by_id(cache_dir, weights, tmp_path):
    """Under torchrun local rank 0 resolves the id first, then rank 1 (``node_first``)."""
    from launch import SMALL, torchrun

    out = tmp_path / "run"
    env = {**hub_env(cache_dir, tmp_path), "OMP_NUM_THREADS": "1"}
    args = ["train", "--model.load", "org/name@v1", "--train.steps", "1", "--train.lr", "0", *SMALL]
    done = torchrun(2, *args, "--train.output_dir", str(out), env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same(state(out), weights["v1"])  # the DCP checkpoint of the loaded weights
