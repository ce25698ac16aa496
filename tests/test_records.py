"""Reading training records, reporting bad ones, and converting LLaVA files."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from PIL import Image

from mmzoo.data import records as records_module
from mmzoo.data.llava import convert_llava
from mmzoo.data.records import Record, SkipReport, read_records, stream_records
from mmzoo.errors import MmzooError


def png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 30, 30)).save(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows are dicts (dumped) or raw strings (written as-is, e.g. broken JSON or blank lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(*turns: str, images=None, videos=None) -> dict:
    """A chat-form record; turns alternate user/assistant."""
    row: dict = {
        "messages": [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    }
    if images is not None:
        row["images"] = images
    if videos is not None:
        row["videos"] = videos
    return row


GOOD = chat("hello", "hi")


def test_chat_jsonl_system_multiturn_image(tmp_path):
    png(tmp_path / "images" / "a.png")
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>\nWhat colour?"},
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes."},
        ],
        "images": ["images/a.png"],
    }
    data = write_jsonl(tmp_path / "d.jsonl", [row])
    (record,) = read_records(str(data))
    assert record == Record(row["messages"], [tmp_path / "images" / "a.png"], [], f"{data}:1")
    assert record.images[0].is_absolute()


def test_llava_json_array_maps_roles_and_prepends_placeholder(tmp_path):
    png(tmp_path / "a.png")
    rows = [
        {
            "id": "1",
            "image": "a.png",
            "conversations": [
                {"from": "system", "value": "You see images."},
                {"from": "human", "value": "What is it?"},
                {"from": "gpt", "value": "A square."},
            ],
        },
        {"id": "2", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    ]
    data = tmp_path / "llava.json"
    data.write_text(json.dumps(rows, indent=2))
    first, second = read_records(str(data))
    assert [m["role"] for m in first.messages] == ["system", "user", "assistant"]
    assert first.messages[1]["content"] == "<image>\nWhat is it?"
    assert first.images == [tmp_path / "a.png"]
    assert first.source == f"{data}:#0"
    assert second.images == [] and second.messages[0] == {"role": "user", "content": "2+2?"}
    assert second.source == f"{data}:#1"


def test_format_is_detected_by_content_not_extension(tmp_path):
    as_json = tmp_path / "array.jsonl"
    as_json.write_text("\n  " + json.dumps([GOOD, GOOD]), encoding="utf-8-sig")  # BOM, as Windows tools write
    as_jsonl = write_jsonl(tmp_path / "lines.json", [GOOD, "", "   ", GOOD])
    assert [r.source for r in read_records(str(as_json))] == [f"{as_json}:#0", f"{as_json}:#1"]
    # Blank lines are skipped but still counted, so sources match the editor's line numbers.
    assert [r.source for r in read_records(str(as_jsonl))] == [f"{as_jsonl}:1", f"{as_jsonl}:4"]


def test_text_only_image_and_video_records_mixed(tmp_path):
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    (tmp_path / "clip.mp4").write_bytes(b"\x00")
    rows = [
        GOOD,
        chat("<image><image>compare", "same", images=["a.png", "b.png"]),
        chat("<video>what happens?", "nothing", videos=["clip.mp4"]),
        # LLaVA-Video marks its video with <image>; LLaVA with no placeholder gets one prepended.
        {
            "video": "clip.mp4",
            "conversations": [{"from": "human", "value": "<image>\nWhy?"}, {"from": "gpt", "value": "x"}],
        },
        {
            "video": "clip.mp4",
            "conversations": [{"from": "human", "value": "Why?"}, {"from": "gpt", "value": "y"}],
        },
    ]
    text, two, video, llava_video, prepended = read_records(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert (text.images, text.videos) == ([], [])
    assert two.images == [tmp_path / "a.png", tmp_path / "b.png"] and two.videos == []
    assert video.videos == [tmp_path / "clip.mp4"] and video.images == []
    assert llava_video.messages[0]["content"] == "<video>\nWhy?" and llava_video.videos == [
        tmp_path / "clip.mp4"
    ]
    assert prepended.messages[0]["content"] == "<video>\nWhy?"


def test_comma_separated_datasets_and_dataset_dir(tmp_path):
    png(tmp_path / "a" / "x.png")
    png(tmp_path / "media" / "x.png")
    absolute = png(tmp_path / "elsewhere" / "y.png")
    first = write_jsonl(tmp_path / "a" / "one.jsonl", [chat("<image>q", "a", images=["x.png"])])
    second = write_jsonl(tmp_path / "b" / "two.jsonl", [chat("<image>q", "a", images=[str(absolute)]), GOOD])

    default = read_records(f"{first}, {second}")
    assert [r.source for r in default] == [f"{first}:1", f"{second}:1", f"{second}:2"]
    assert default[0].images == [tmp_path / "a" / "x.png"]  # relative to its own file
    assert default[1].images == [absolute]

    shared = read_records(f"{first},{second}", dataset_dir=str(tmp_path / "media"))
    assert shared[0].images == [tmp_path / "media" / "x.png"]
    assert shared[1].images == [absolute]  # absolute paths ignore dataset_dir


def test_stream_records_reads_a_file_only_when_its_records_are_wanted(tmp_path):
    first = write_jsonl(tmp_path / "one.jsonl", [GOOD, chat("q", "")])
    report = SkipReport()
    records = stream_records(f"{first},{tmp_path / 'missing.jsonl'}", report=report)
    assert next(records).source == f"{first}:1"  # the second file is not opened yet
    assert report.total == 0  # the first file's skips are merged once it is read
    with pytest.raises(MmzooError, match="missing.jsonl: data file not found"):
        next(records)
    assert report.total == 1


def test_max_samples_caps_each_dataset_after_skipping(tmp_path):
    rows = [chat("q", ""), chat("q1", "a1"), chat("q2", "a2"), chat("q3", "a3")]
    first = write_jsonl(tmp_path / "one.jsonl", rows)
    second = write_jsonl(tmp_path / "two.jsonl", rows)
    report = SkipReport()
    got = read_records(f"{first},{second}", max_samples=2, report=report)
    assert [r.source for r in got] == [f"{first}:2", f"{first}:3", f"{second}:2", f"{second}:3"]
    assert report.counts == {"empty_answer": 2}
    with pytest.raises(MmzooError, match="max_samples must be at least 1"):
        read_records(str(first), max_samples=0)


BAD = {
    "malformed_json": ['{"messages": [', "{'single': 'quotes'}"],
    "unknown_role": [
        {"messages": [{"role": "usr", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"conversations": [{"from": "bot", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ],
    "empty_answer": [chat("q", "  \n"), chat("q")],
    "placeholder_mismatch": [chat("<image><image>q", "a", images=["ok.png"]), chat("<video>q", "a")],
    "missing_file": [chat("<image>q", "a", images=["images/x.png"]), chat("<video>q", "a", videos=["v.mp4"])],
    "bad_structure": [
        {"messages": "hello"},
        {"messages": [{"role": "user", "content": "q"}] * 2 + [{"role": "assistant", "content": "a"}]},
    ],
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_bad_record_reason_is_counted_with_first_place(tmp_path, reason):
    png(tmp_path / "ok.png")
    first, second = BAD[reason]
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", first, GOOD, second])
    report = SkipReport()
    got = read_records(str(data), report=report)
    assert [r.source for r in got] == [f"{data}:1", f"{data}:4"]
    assert report.counts == {reason: 2}
    assert report.first[reason][0] == f"{data}:3"
    (line,) = report.summary_lines()
    assert line.startswith(f"skipped 2 records ({reason}), first at {data}:3: ")


def test_summary_line_names_the_missing_file(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, chat("<image>q", "a", images=["images/x.jpg"])])
    report = SkipReport()
    read_records(str(data), report=report)
    assert report.summary_lines() == [
        f"skipped 1 record (missing_file), first at {data}:2: images/x.jpg not found under {tmp_path}"
    ]


def test_bad_structure_details(tmp_path):
    rows = [
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
            + [{"role": "user", "content": "q"}]
        },
        {"text": "no conversation"},
        [1, 2],
    ]
    data = write_jsonl(tmp_path / "d.jsonl", [*rows, GOOD])
    report = SkipReport()
    read_records(str(data), report=report)
    assert report.counts == {"bad_structure": 4}
    assert report.first["bad_structure"] == (
        f"{data}:1",
        "turn 0 is 'assistant', expected 'user'; roles must alternate",
    )


def test_report_add_is_public_for_media_errors(tmp_path):
    report = SkipReport()
    read_records(str(write_jsonl(tmp_path / "d.jsonl", [GOOD, chat("q")])), report=report)
    report.add("corrupt_image", "d.jsonl:7", "cannot identify image file")
    report.add("corrupt_image", "d.jsonl:9", "truncated")
    assert report.total == 3
    assert (
        report.summary_lines()[1]
        == "skipped 2 records (corrupt_image), first at d.jsonl:7: cannot identify image file"
    )
    with pytest.raises(ValueError, match="did you mean 'corrupt_image'"):
        report.add("corupt_image", "d.jsonl:1", "x")


def test_skips_are_logged_when_no_report_is_given(tmp_path, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, chat("q", " ")])
    with caplog.at_level(logging.WARNING, logger="mmzoo.data.records"):
        read_records(str(data))
    assert (
        f"skipped 1 record (empty_answer), first at {data}:2: turn 1 (assistant) is empty" in caplog.messages
    )


def test_strict_mode_raises_at_first_bad_record(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, chat("<image>q", "a", images=["x.png"]), "{oops"])
    with pytest.raises(MmzooError, match=rf"^{data}:3: missing_file: x.png not found under .*strict mode"):
        read_records(str(data), strict=True)
    broken = write_jsonl(tmp_path / "e.jsonl", [GOOD, "{oops"])
    with pytest.raises(MmzooError, match=rf"^{broken}:2: malformed_json: "):
        read_records(str(broken), strict=True)


def test_empty_dataset_is_an_error_naming_reasons(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [chat("<image>q", "a", images=["x.png"])] * 3 + [chat("q")])
    with pytest.raises(MmzooError) as info:
        read_records(str(data))
    message = str(info.value)
    assert message.startswith(
        f"{data}: no usable records (skipped 3 missing_file, 1 empty_answer; first at {data}:1"
    )
    assert "dataset_dir" in message
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(MmzooError, match="no records in this file"):
        read_records(str(empty))
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(MmzooError, match="no records in this file"):
        read_records(str(tmp_path / "none.json"))


def test_missing_or_invalid_data_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [GOOD])
    with pytest.raises(
        MmzooError, match=r"trian\.jsonl: data file not found \(did you mean 'train\.jsonl'\?\)"
    ):
        read_records(f"{tmp_path / 'train.jsonl'},{tmp_path / 'trian.jsonl'}")
    with pytest.raises(MmzooError, match="no data file given"):
        read_records(" , ")
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"messages": []},\n{"messages": \n]')
    with pytest.raises(MmzooError, match=rf"^{broken}:4: not valid JSON"):
        read_records(str(broken))


def test_each_media_path_is_checked_once(tmp_path, monkeypatch):
    png(tmp_path / "a.png")
    data = write_jsonl(tmp_path / "d.jsonl", [chat("<image>q", "a", images=["a.png"])] * 50)
    calls = []
    real = os.path.isfile
    monkeypatch.setattr(records_module.os.path, "isfile", lambda p: calls.append(p) or real(p))
    assert len(read_records(str(data))) == 50
    assert calls == [str(tmp_path / "a.png")]


def test_convert_llava_skips_missing_images_and_keeps_text_only(tmp_path, caplog):
    images = tmp_path / "coco"
    png(images / "1.jpg")
    src = tmp_path / "llava_instruct.json"
    src.write_text(
        json.dumps(
            [
                {
                    "id": "a",
                    "image": "1.jpg",
                    "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                },
                {
                    "id": "b",
                    "image": "2.jpg",
                    "conversations": [
                        {"from": "human", "value": "<image>\nq"},
                        {"from": "gpt", "value": "a"},
                    ],
                },
                {
                    "id": "c",
                    "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
                },
            ]
        )
    )
    out = tmp_path / "out" / "chat.jsonl"
    report = SkipReport()
    counts = convert_llava(src, images, out, report=report)
    assert counts == {"read": 3, "written": 2, "text_only": 1, "skipped": 1, "missing_file": 1}
    assert report.first["missing_file"] == (f"{src}:#1", f"2.jpg not found under {images}")
    assert os.listdir(out.parent) == ["chat.jsonl"]  # no temp file left behind

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == {
        "messages": [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}],
        "images": [str(images / "1.jpg")],
    }
    assert rows[1] == {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    }
    # The output reads back as chat-form records, from any dataset_dir (paths are absolute).
    again = read_records(str(out), dataset_dir=str(tmp_path / "unrelated"))
    assert again[0].images == [images / "1.jpg"] and again[1].messages == rows[1]["messages"]

    with caplog.at_level(logging.WARNING, logger="mmzoo.data.llava"):
        convert_llava(src, images, out)
    expected = f"skipped 1 record (missing_file), first at {src}:#1: 2.jpg not found under {images}"
    assert caplog.messages == [expected]
    with pytest.raises(MmzooError, match="image directory not found"):
        convert_llava(src, tmp_path / "nope", out)
