"""``mmzoo data inspect`` and ``mmzoo data convert-llava`` as users run them."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

import mmzoo
from mmzoo.cli import main

DEMO = Path(mmzoo.__file__).parent / "demo" / "demo.jsonl"


def test_inspect_marks_trained_spans_and_media(capsys):
    assert (
        main(["data", "inspect", "--model", "qwen2_5_vl", "--data", str(DEMO), "--max-pixels", "50000"]) == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"sample 0 of 14 ({DEMO}:1)"
    assert out[2] == "image 0: frames (N, H, W) = (1, 168, 252) -> 54 tokens"
    text = "\n".join(out)
    assert "<|vision_start|><|image_pad|>x54<|vision_end|>" in text
    assert "«A tabby cat, seen in close-up with its face filling the frame.<|im_end|>\n»" in text
    assert "«" not in text.split("<|im_start|>assistant")[0]  # nothing before the answer is trained


def test_inspect_video_sample(capsys):
    assert main(["data", "inspect", "--model", "qwen2_5_vl", "--data", str(DEMO), "--index", "11"]) == 0
    out = capsys.readouterr().out
    assert "video 0: " in out and "<|video_pad|>x" in out


def test_inspect_errors_are_one_line(capsys):
    assert main(["data", "inspect", "--model", "qwen2_5_vl", "--data", str(DEMO), "--index", "99"]) == 2
    assert (
        capsys.readouterr().err == f"mmzoo: error: --index 99 is out of range: {DEMO} has 14 usable records\n"
    )
    assert main(["data", "inspect", "--model", "qwen_vl", "--data", str(DEMO)]) == 2
    assert "did you mean 'qwen2_5_vl'" in capsys.readouterr().err


def test_inspect_counts_and_numbers_only_records_it_can_show(tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"not a png")  # exists, so the record reads; it cannot be prepared
    cat = str(DEMO.parent / "chelsea.jpg")
    records = [
        {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]},
        {
            "messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "?"}],
            "images": ["bad.png"],
        },
        {
            "messages": [
                {"role": "user", "content": "<image>Cat?"},
                {"role": "assistant", "content": "Yes."},
            ],
            "images": [cat],
        },
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    inspect = ["data", "inspect", "--model", "qwen2_5_vl", "--data", str(data), "--max-pixels", "12544"]
    assert main([*inspect, "--index", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == f"sample 1 of 2 ({data}:3)"
    assert f"skipped 1 record (corrupt_image), first at {data}:2" in captured.err
    assert main([*inspect, "--index", "2"]) == 2
    assert capsys.readouterr().err.endswith(
        f"mmzoo: error: --index 2 is out of range: {data} has 2 usable records (1 skipped, reasons above)\n"
    )


def test_convert_llava_skips_missing_images(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 24), "red").save(images / "a.jpg")
    records = [
        {
            "id": "1",
            "image": "a.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nColour?"},
                {"from": "gpt", "value": "Red."},
            ],
        },
        {
            "id": "2",
            "image": "gone.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat?"},
                {"from": "gpt", "value": "Nothing."},
            ],
        },
        {"id": "3", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    ]
    src = tmp_path / "llava.json"
    src.write_text(json.dumps(records))
    out = tmp_path / "out" / "chat.jsonl"
    assert (
        main(["data", "convert-llava", "--src", str(src), "--image-dir", str(images), "--out", str(out)]) == 0
    )
    captured = capsys.readouterr()
    assert captured.out.strip() == f"wrote 2 records to {out} (1 text-only), skipped 1 of 3"
    assert "skipped 1 record (missing_file)" in captured.err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["images"] == [str(images / "a.jpg")]
    assert rows[0]["messages"][1] == {"role": "assistant", "content": "Red."}
    assert "images" not in rows[1] or rows[1]["images"] == []
