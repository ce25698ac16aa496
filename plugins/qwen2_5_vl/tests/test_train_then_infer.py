"""What a model is trained on is what it answers: ``mmzoo train`` then ``mmzoo infer``, as a user runs them.

The tiny model learns three demo conversations by heart (two with an image, one text-only) and
must give each answer back word for word when asked the same question the way ``mmzoo infer``
asks (media first, then the prompt). A mismatch anywhere between the training sample and the
inference prompt (template, media placement, vision tokens, positions, checkpoint round trip)
shows as a wrong answer.
"""

from __future__ import annotations

import json

from mmzoo.cli import main
from mmzoo.train.loop import DEMO_DATA

MEDIA = ["--min-pixels", "3136", "--max-pixels", "12544"]


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
        args = ["infer", "--model-dir", str(out), *MEDIA, "--prompt", question.replace("<image>", "")]
        for image in record["images"]:
            args += ["--image", image]
        assert main(args) == 0
        assert capsys.readouterr().out == answer + "\n"
