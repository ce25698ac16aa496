"""InternVL3 through the command line: infer on HF checkpoints of both layouts and on mm
checkpoints, eval, conversion, and training started from an HF checkpoint."""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
import torch
from PIL import Image

import mmzoo
from mmzoo.checkpoint.conversion import hf_to_mm
from mmzoo.checkpoint.hf_export import save_hf
from mmzoo.cli import main

CAT = "core/mmzoo/demo/chelsea.jpg"
QUIET = dict(report=lambda line: None)


@pytest.fixture(scope="module")
def tokenizer():
    return mmzoo.get_model("internvl3").default_tokenizer()


def hello_model(layout: str, tokenizer):
    """A tiny real-vocabulary InternVL3 that answers "Hello" and then ends its turn.

    Every embedding is large in dimension 0, so the last hidden state is positive there; only
    "Hello" (weight 1) and <|im_end|> (weight 1.8) read it. With a repetition penalty of 2,
    <|im_end|> (in the prompt) scores 0.9 against 1 for "Hello"; after "Hello", 0.5: it ends.
    """
    model = mmzoo.build_model("internvl3", "tiny", text={"tie_word_embeddings": False}, hf_layout=layout)
    hello, im_end = tokenizer.convert_tokens_to_ids(["Hello", "<|im_end|>"])
    with torch.no_grad():
        model.text_decoder.embedding.word_embeddings.weight[:, 0] = 100.0
        out = model.text_decoder.output_layer.weight
        out.zero_()
        out[hello, 0], out[im_end, 0] = 1.0, 1.8
    return model


@pytest.fixture(scope="module", params=["hf", "opengvlab"])
def hello_dir(request, tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("hello") / request.param
    save_hf(hello_model(request.param, tokenizer), path, tokenizer=tokenizer)
    return path


def infer_args(path, *extra):
    return ["infer", "--model-dir", str(path), "--max-new-tokens", "5", "--repetition-penalty", "2", *extra]


def test_the_checkpoint_is_in_its_layout(hello_dir):
    config = json.loads((hello_dir / "config.json").read_text())
    expected = "InternVLChatModel" if hello_dir.name == "opengvlab" else "InternVLForConditionalGeneration"
    assert config["architectures"] == [expected]


def test_infer_answers_on_hf_and_mm_checkpoints(hello_dir, tmp_path, capsys):
    assert main(infer_args(hello_dir, "--image", CAT, "--prompt", "Who is there?")) == 0
    assert capsys.readouterr().out == "Hello\n"  # without the stop: "HelloHello..."
    mm = hf_to_mm(hello_dir, tmp_path / "mm", tp=2, **QUIET)
    assert main(infer_args(mm, "--image", CAT, "--image", CAT, "--prompt", "<image> or <image>?")) == 0
    captured = capsys.readouterr()
    assert captured.out == "Hello\n" and "no tokenizer files" not in captured.err


def test_infer_with_a_peft_adapter_answers_as_the_merged_model(hello_dir, tmp_path, capsys):
    """``--adapter`` loads a PEFT adapter (here written by ``save_peft``, in the checkpoint's own
    layout's names) and answers as the checkpoint with that adapter merged (``save_hf``)."""
    pytest.importorskip("peft")
    from mmzoo.config import LoraConfig
    from mmzoo.lora.attach import attach
    from mmzoo.lora.peft_format import save_peft

    model = mmzoo.load_model(hello_dir)
    attach(model, LoraConfig(r=2, alpha=4, targets=("text.attention", "text.mlp", "vision.mlp", "projector")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g))
    save_peft(model, tmp_path / "adapter")
    save_hf(model, tmp_path / "merged", tokenizer=mmzoo.get_model("internvl3").default_tokenizer())
    prompt = ("--image", CAT, "--prompt", "Who is there?")
    assert main(infer_args(tmp_path / "merged", *prompt)) == 0
    merged = capsys.readouterr().out
    assert main(infer_args(hello_dir, "--adapter", str(tmp_path / "adapter"), *prompt)) == 0
    assert capsys.readouterr().out == merged != "Hello\n" and merged.strip()


def test_eval_end_to_end(hello_dir, tmp_path, capsys):
    """`mmzoo eval` on a two-row TSV: the model answers "Hello" to everything."""
    buffer = io.BytesIO()
    Image.open(CAT).resize((150, 100)).save(buffer, format="PNG")
    question = {"image": base64.b64encode(buffer.getvalue()).decode(), "A": "Bye", "B": "No", "C": "Hello"}
    rows = [
        {"index": "1", **question, "question": "Greeting?", "answer": "C"},
        {"index": "2", **question, "image": "1", "question": "Farewell?", "answer": "A"},
    ]
    tsv = tmp_path / "ai2d.tsv"
    with tsv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    args = ["eval", "--model-dir", str(hello_dir), "--dataset", "ai2d_test", "--data", str(tsv)]
    args += ["--out", str(out), "--max-new-tokens", "4", "--repetition-penalty", "2"]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("ai2d_test accuracy: 50.00 over 2 questions")
    cached = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert cached == [{"index": "1", "prediction": "Hello"}, {"index": "2", "prediction": "Hello"}]


def test_convert_cli_round_trip(hello_dir, tmp_path):
    mm, pp2, back = tmp_path / "mm", tmp_path / "pp2", tmp_path / "back"
    hf_to = ["convert", "hf-to-mm", "--model", "internvl3", "--hf-dir", str(hello_dir), "--mm-dir", str(mm)]
    assert main([*hf_to, "--tp", "2", "--format", "megatron"]) == 0
    resplit = ["convert", "resplit", "--src", str(mm), "--dst", str(pp2), "--tp", "1"]
    assert main([*resplit, "--vit-pp-layers", "2,0", "--llm-pp-layers", "1,1"]) == 0
    assert main(["convert", "mm-to-hf", "--mm-dir", str(pp2), "--hf-dir", str(back)]) == 0
    assert json.loads((back / "config.json").read_text()) == json.loads(
        (hello_dir / "config.json").read_text()
    )
    first, second = mmzoo.load_model(hello_dir).state_dict(), mmzoo.load_model(back).state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_train_from_an_hf_checkpoint(hello_dir, tmp_path):
    args = ["train", "--model", "internvl3", "--model.load", str(hello_dir), "--data.max_samples", "2"]
    args += ["--train.steps", "1", "--train.tensorboard", "false", "--train.output_dir", str(tmp_path)]
    assert main([*args, "--data.media", "{max_tiles: 2}"]) == 0
    model = mmzoo.load_model(tmp_path)
    assert model.name == "internvl3" and model.config.hf_layout == hello_dir.name


def test_mm_convert_form(hello_dir, tmp_path):
    """MindSpeed-MM's command form, as its InternVL scripts write it."""
    from mmzoo.commands.mm_convert import main as mm_convert

    mm, back = tmp_path / "mm", tmp_path / "back"
    args = [
        "InternVLConverter",
        "hf_to_mm",
        "--cfg.mm_dir",
        str(mm),
        "--cfg.hf_config.hf_dir",
        str(hello_dir),
    ]
    args += [
        "--cfg.parallel_config.llm_pp_layers",
        "[[1,1]]",
        "--cfg.parallel_config.vit_pp_layers",
        "[[2,0]]",
    ]
    assert mm_convert([*args, "--cfg.parallel_config.tp_size", "2", "--cfg.trust_remote_code", "True"]) == 0
    assert sorted(p.name for p in (mm / "release").glob("mp_rank_*")) == [
        "mp_rank_00_000",
        "mp_rank_00_001",
        "mp_rank_01_000",
        "mp_rank_01_001",
    ]
    assert (mm / "release" / "mp_rank_01_001" / "model_optim_rng.pt").is_file()
    args = ["InternVLConverter", "mm_to_hf", "--cfg.save_hf_dir", str(back), "--cfg.mm_dir", str(mm)]
    assert mm_convert([*args, "--cfg.hf_config.hf_dir", str(hello_dir)]) == 0
    first, second = mmzoo.load_model(hello_dir).state_dict(), mmzoo.load_model(back).state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_infer_media_options_reach_the_processor(hello_dir, capsys):
    prompt = ["--image", CAT, "--prompt", "Who?", "--media", "max_tiles=1", "--media", "thumbnail=false"]
    assert main(infer_args(hello_dir, *prompt)) == 0
    assert capsys.readouterr().out == "Hello\n"
    assert main(infer_args(hello_dir, "--image", CAT, "--prompt", "Who?", "--media", "max_pixels=100")) == 2
    assert "unexpected keyword argument 'max_pixels'" in capsys.readouterr().err
    assert main(infer_args(hello_dir, "--prompt", "Who?", "--media", "max_tiles")) == 2
    assert "--media max_tiles: write it as KEY=VALUE" in capsys.readouterr().err


def test_the_example_config_reads():
    from mmzoo.config import load_config

    config = load_config("examples/configs/internvl3_8b.yaml")
    spec = mmzoo.get_model(config.model.name)
    processor = spec.media_processor(spec.variant(config.model.variant), **config.data.media)
    assert (processor.max_tiles, processor.tile_size, processor.tokens_per_tile) == (6, 448, 256)


def test_data_inspect(capsys):
    demo = "core/mmzoo/demo/demo.jsonl"
    assert main(["data", "inspect", "--model", "internvl3", "--data", demo, "--media", "max_tiles=2"]) == 0
    out = capsys.readouterr().out
    assert "image 0: frames (N, H, W) = (3, 448, 448) -> 768 tokens" in out  # 2 tiles + thumbnail, 1b
    assert "<img><IMG_CONTEXT>x768</img>What animal is this?" in out


@pytest.mark.slow
def test_two_ranks_train_the_demo_and_the_dcp_checkpoint_loads(tmp_path):
    """``torchrun --nproc-per-node 2 -m mmzoo train --model internvl3``: FSDP2 over both ranks
    (gloo), a DCP checkpoint that ``mmzoo.load_model`` reads and ``mmzoo convert`` exports."""
    import os
    import subprocess
    import sys

    from mmzoo.testing import free_port

    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "mmzoo",
        "train",
        "--model",
        "internvl3",
        "--data.max_samples",
        "6",
        "--train.steps",
        "2",
        "--train.tensorboard",
        "false",
        "--train.output_dir",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "iter_0000002" / "dcp_meta.json").is_file()
    model = mmzoo.load_model(out)
    assert model.name == "internvl3"
    assert main(["convert", "mm-to-hf", "--mm-dir", str(out), "--hf-dir", str(tmp_path / "hf")]) == 0
    assert mmzoo.load_model(tmp_path / "hf").name == "internvl3"
