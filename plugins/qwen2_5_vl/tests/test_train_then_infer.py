"""What a model is trained on is what it answers: ``mmzoo train`` then ``mmzoo infer``, as a user runs them.

The tiny model learns three demo conversations by heart (two with an image, one text-only) and
must give each answer back word for word when asked the same question the way ``mmzoo infer``
asks (media first, then the prompt). A mismatch anywhere between the training sample and the
inference prompt (template, media placement, vision tokens, positions, checkpoint round trip)
shows as a wrong answer.
"""

from __future__ import annotations

import json

import torch

import mmzoo
from mmzoo.cli import build_parser, main
from mmzoo.commands.infer import load_chat
from mmzoo.train.checkpoint import TrainingCheckpoint, save_training_checkpoint
from mmzoo.train.loop import DEMO_DATA


def test_trained_answers_come_back_from_infer(tmp_path, capsys):
    demo = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()]
    records = [demo[0], demo[2], demo[12]]  # the cat, the cup, the capital of France
    assert [len(r.get("images", [])) for r in records] == [1, 1, 0]
    for record in records:
        record["images"] = [str(DEMO_DATA.parent / name) for name in record.get("images", [])]
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    train = ["train", "--data.data", str(data), "--data.media", "{min_pixels: 3136, max_pixels: 12544}"]
    train += ["--train.steps", "60", "--train.lr", "1e-2", "--train.schedule", "constant"]
    train += ["--train.warmup", "0", "--train.tensorboard", "false", "--train.output_dir", str(out)]
    assert main(train) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss"] < 0.1
    capsys.readouterr()

    for record in records:
        question, answer = (m["content"] for m in record["messages"])
        # No media options: infer sizes the images as training did (the checkpoint's media.json).
        args = ["infer", "--model-dir", str(out), "--prompt", question.replace("<image>", "")]
        for image in record["images"]:
            args += ["--image", image]
        assert main(args) == 0
        assert capsys.readouterr().out == answer + "\n"


def test_infer_sizes_media_as_training_did_unless_told_otherwise(tmp_path, capsys):
    trained = dict(mmzoo.get_model("qwen2_5_vl").demo_media)  # what `mmzoo train` on the demo saves
    model = mmzoo.build_model("qwen2_5_vl", "tiny")
    optimizer = torch.optim.AdamW(model.parameters())
    save_training_checkpoint(tmp_path, 1, TrainingCheckpoint(model, optimizer, variant="tiny", media=trained))
    video = DEMO_DATA.parent / "pan.mp4"
    in_training = mmzoo.get_model("qwen2_5_vl").media_processor(model.config, **trained)

    def processor(*flags: str):
        args = build_parser().parse_args(["infer", "--model-dir", str(tmp_path), *flags, "--prompt", "?"])
        return load_chat(args).preprocessor.processor

    default = processor()
    assert default.prepare_video(video).frames.shape == in_training.prepare_video(video).frames.shape
    assert (default.max_pixels, default.video_max_pixels) == (
        trained["max_pixels"],
        trained["video_max_pixels"],
    )
    assert "media as in training: max_pixels=100352, video_min_pixels=25088" in capsys.readouterr().err
    told = processor("--max-pixels", "50000", "--fps", "1")  # explicit options win, video included
    assert (told.max_pixels, told.video_max_pixels, told.fps) == (50000, 50000, 1.0)
