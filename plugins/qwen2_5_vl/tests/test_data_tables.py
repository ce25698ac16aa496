"""Training data from parquet files and ``datasets`` save_to_disk directories, media embedded.

The same records as JSONL with files on disk are the reference: token ids, labels, position ids
and pixel values must be equal. Also: bad rows under the strict / skip rules with row numbers,
the preprocessing cache, reading a row group at a time, and convert-llava to parquet then
training from it. Media are the demo photos and clip at a few dozen tokens each.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_data_pipeline import build, skip_lines

import mmzoo
from mmzoo.cli import main
from mmzoo.data.dataset import VLDataset
from mmzoo.data.media import MediaBytes, load_video
from mmzoo.data.records import iter_records
from mmzoo.data.tokenizer import default_qwen_tokenizer
from mmzoo.errors import MmzooError
from mmzoo_qwen2_5_vl import media as qwen_media

DEMO = Path(mmzoo.__file__).parent / "demo"
TURN = pa.struct([("role", pa.string()), ("content", pa.string())])
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def chat(user: str, answer: str, **media: list[str]) -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
        **media,
    }


def llava(user: str, answer: str, **media: str) -> dict:
    turns = [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]
    return {"conversations": turns, **media}


CHAT = [
    chat("<image>\nWhat animal is this?", "A tabby cat.", images=["chelsea.jpg"]),
    chat("<video>\nWhat happens?", "The camera pans.", videos=["pan.mp4"]),
    chat("Say hello.", "Hello there!"),
    chat("<image><image>\nCompare them.", "Coffee, then a rocket.", images=["coffee.png", "rocket.jpg"]),
]
LLAVA = [
    llava("What is in the cup?", "Espresso.", image="coffee.png"),  # placeholder added before the question
    llava("<image>\nWhat animal?", "A cat.", image="chelsea.jpg"),
    llava("<video>\nWhat moves?", "The view.", video="pan.mp4"),
    llava("Count to two.", "One, two."),
]


@pytest.fixture(scope="module")
def spec():
    return mmzoo.get_model("qwen2_5_vl")


@pytest.fixture(scope="module")
def tok():
    return default_qwen_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """The demo media on disk (one photo as PNG) and both record forms as JSONL."""
    root = tmp_path_factory.mktemp("files")
    for name in ("chelsea.jpg", "rocket.jpg", "pan.mp4"):
        shutil.copy(DEMO / name, root / name)
    with Image.open(DEMO / "coffee.jpg") as im:
        im.save(root / "coffee.png")
    for name, records in (("chat.jsonl", CHAT), ("llava.jsonl", LLAVA)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def cell(root: Path, name: str) -> dict:
    """``datasets``' Image / Video struct holding the file's bytes."""
    return {"bytes": (root / name).read_bytes(), "path": name}


def write_chat_parquet(root: Path, out: Path, row_group_size: int = 2) -> Path:
    """CHAT with images as structs and videos as plain bytes, two rows per row group."""
    rows = [
        {
            "messages": r["messages"],
            "images": [cell(root, n) for n in r.get("images", [])],
            "videos": [(root / n).read_bytes() for n in r.get("videos", [])],
        }
        for r in CHAT
    ]
    schema = pa.schema(
        [("messages", pa.list_(TURN)), ("images", pa.list_(IMAGE)), ("videos", pa.list_(pa.binary()))]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema), out, row_group_size=row_group_size)
    return out


def write_llava_dataset(root: Path, out: Path) -> Path:
    """LLAVA through ``datasets``: images in an Image feature (bytes), videos as paths."""
    rows = {
        "id": [str(i) for i in range(len(LLAVA))],
        "conversations": [r["conversations"] for r in LLAVA],
        "image": [cell(root, r["image"]) if "image" in r else None for r in LLAVA],
        "video": [r.get("video") for r in LLAVA],
    }
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
            "image": datasets.Image(),
            "video": datasets.Value("string"),
        }
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(out))
    return out


def assert_same_samples(a: VLDataset, b: VLDataset) -> None:
    assert len(a) == len(b) > 0
    for i in range(len(a)):
        x, y = a[i], b[i]
        for name in ("input_ids", "labels", "position_ids"):
            assert torch.equal(getattr(x, name), getattr(y, name)), (i, name)
        assert x.media.keys() == y.media.keys(), i
        for key in x.media:
            assert torch.equal(x.media[key], y.media[key]), (i, key)


def test_chat_parquet_gives_the_samples_of_jsonl_with_files(spec, tok, files, tmp_path):
    data = write_chat_parquet(files, tmp_path / "train.parquet")
    reference = build(spec, tok, files / "chat.jsonl")
    ours = build(spec, tok, data)  # dataset_dir unused: every medium is embedded
    assert_same_samples(ours, reference)
    assert [ours[i].source for i in range(len(ours))] == [f"{data} row {i}" for i in range(len(CHAT))]
    assert "pixel_values_videos" in ours[1].media and "pixel_values" in ours[3].media
    # Negative control: another photo's bytes in row 0 change its pixels.
    other = pq.read_table(data).to_pylist()
    other[0]["images"] = [cell(files, "rocket.jpg")]
    pq.write_table(pa.Table.from_pylist(other, pq.read_schema(data)), tmp_path / "other.parquet")
    with pytest.raises(AssertionError):
        assert_same_samples(build(spec, tok, tmp_path / "other.parquet"), reference)


def test_llava_save_to_disk_gives_the_samples_of_jsonl_with_files(spec, tok, files, tmp_path):
    data = write_llava_dataset(files, tmp_path / "llava_ds")
    reference = build(spec, tok, files / "llava.jsonl")
    ours = build(spec, tok, data, dataset_dir=str(files))  # the video is a path under dataset_dir
    assert_same_samples(ours, reference)
    assert ours[0].source == f"{data} row 0"
    parquet = tmp_path / "llava.parquet"  # the same dataset through datasets' parquet writer
    datasets.load_from_disk(str(data)).to_parquet(str(parquet))
    assert_same_samples(build(spec, tok, parquet, dataset_dir=str(files)), reference)


def test_data_format_picks_the_reader(spec, tok, files, tmp_path):
    data = write_chat_parquet(files, tmp_path / "train.bin")  # no .parquet suffix: auto reads JSON
    with pytest.raises(MmzooError, match="not UTF-8 text"):
        build(spec, tok, data)
    assert len(build(spec, tok, data, format="parquet")) == len(CHAT)
    with pytest.raises(MmzooError, match=r"data.format arrow reads a datasets save_to_disk directory"):
        build(spec, tok, data, format="arrow")
    dict_dir = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": [1]})}).save_to_disk(str(dict_dir))
    with pytest.raises(MmzooError, match=r"a DatasetDict \(train\); pass one split's directory"):
        build(spec, tok, dict_dir)


def bad_table(files: Path, out: Path) -> Path:
    """Row 0 good; row 1 without messages; row 2 with bytes that are no image; row 3 a video of
    the wrong type (an int); row 4 good."""
    good = chat("<image>\nWhat animal?", "A cat.")
    rows = [
        {**good, "images": [(files / "chelsea.jpg").read_bytes()]},
        {"images": [(files / "chelsea.jpg").read_bytes()]},
        {**good, "images": [b"not an image"]},
        {**chat("<video>\nWhat?", "Nothing."), "videos": [7]},
        {**good, "images": [(files / "rocket.jpg").read_bytes()]},
    ]
    schema = pa.schema(
        [("messages", pa.list_(TURN)), ("images", pa.list_(pa.binary())), ("videos", pa.list_(pa.int64()))]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema), out)
    return out


def test_bad_rows_are_skipped_or_stop_a_strict_run_with_row_numbers(spec, tok, files, tmp_path):
    data = bad_table(files, tmp_path / "bad.parquet")
    lines: list[str] = []
    dataset = build(spec, tok, data, lines)
    assert [dataset[i].source for i in range(len(dataset))] == [f"{data} row 0", f"{data} row 4"]
    skipped = skip_lines(lines)
    assert skipped[0] == (
        f"skipped 2 records (bad_structure), first at {data} row 1: "
        "no 'messages' or 'conversations' key (keys: images)"
    )
    assert skipped[1] == (
        f"skipped 1 record (corrupt_image), first at {data} row 2: "
        "cannot read image embedded images[0], 12 bytes: cannot identify image file (in memory)"
    )
    assert len(skipped) == 2
    with pytest.raises(MmzooError, match=rf"^{data} row 1: bad_structure: no 'messages' .* \(strict mode;"):
        build(spec, tok, data, strict=True)
    records = iter_records(str(data), strict=True)  # a reader error names the row too
    next(records)
    with pytest.raises(MmzooError, match=rf"^{data} row 1: bad_structure"):
        next(records)
    readable = [r.source for r in iter_records(str(data))]
    assert readable == [f"{data} row {i}" for i in (0, 2, 4)]  # image bytes are checked when decoded


def forbid_decoding(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("media decoded on a cache hit")

    for name in ("load_image", "load_video"):
        monkeypatch.setattr(qwen_media, name, refuse)


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))


def test_cache_hits_on_a_second_read_and_misses_when_an_embedded_byte_changes(
    spec, tok, files, tmp_path, monkeypatch
):
    data = write_chat_parquet(files, tmp_path / "train.parquet")
    arrow_dir = write_llava_dataset(files, tmp_path / "llava_ds")
    cache = tmp_path / "cache"
    first = build(spec, tok, data, cache_dir=str(cache))
    first_dir = build(spec, tok, arrow_dir, cache_dir=str(cache), dataset_dir=str(files))
    assert len(entries(cache)) == 2
    with monkeypatch.context() as patched:
        forbid_decoding(patched)
        lines: list[str] = []
        assert_same_samples(build(spec, tok, data, lines, cache_dir=str(cache)), first)
        assert_same_samples(
            build(spec, tok, arrow_dir, lines, cache_dir=str(cache), dataset_dir=str(files)), first_dir
        )
        assert sum("from cache" in line for line in lines) == 2
    # One pixel of the PNG in row 3, so one byte of its content: a new entry, new pixels.
    with Image.open(files / "coffee.png") as im:
        im = im.copy()
    im.putpixel((0, 0), tuple(255 - v for v in im.getpixel((0, 0))))
    buffer = io.BytesIO()
    im.save(buffer, format="PNG")
    rows = pq.read_table(data).to_pylist()
    rows[3]["images"][0]["bytes"] = buffer.getvalue()
    pq.write_table(pa.Table.from_pylist(rows, pq.read_schema(data)), data, row_group_size=2)
    changed = build(spec, tok, data, cache_dir=str(cache))
    assert len(entries(cache)) == 3
    assert not torch.equal(changed[3].media["pixel_values"], first[3].media["pixel_values"])
    assert torch.equal(changed[0].media["pixel_values"], first[0].media["pixel_values"])


def test_parquet_is_read_one_row_group_at_a_time(files, tmp_path, monkeypatch):
    data = write_chat_parquet(files, tmp_path / "train.parquet", row_group_size=1)
    assert pq.ParquetFile(data).num_row_groups == len(CHAT)
    read = pq.ParquetFile.read_row_group
    groups: list[int] = []

    def spy(self, i, *args, **kwargs):
        groups.append(i)
        return read(self, i, *args, **kwargs)

    def whole(*args, **kwargs):
        raise AssertionError("the whole parquet file was read")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", whole)
    monkeypatch.setattr(pq, "read_table", whole)
    records = iter_records(str(data))
    first = next(records)
    assert groups == [0] and first.source == f"{data} row 0"
    next(records)
    assert groups == [0, 1]
    assert len(list(records)) == 2 and groups == [0, 1, 2, 3]
    groups.clear()
    assert len(list(iter_records(str(data), max_samples=2))) == 2 and groups == [0, 1]


def test_convert_llava_to_parquet_then_train_from_it(files, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("coffee.png", "chelsea.jpg", "pan.mp4"):
        shutil.copy(files / name, images / name)
    src = tmp_path / "llava.json"
    src.write_text(json.dumps([*LLAVA, llava("<image>\nWhat?", "Gone.", image="gone.jpg")]))
    out = tmp_path / "train.parquet"
    args = ["data", "convert-llava", "--src", str(src), "--image-dir", str(images), "--out", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"wrote 4 records to {out} (1 text-only), skipped 1 of 5"
    rows = pq.read_table(out).to_pylist()
    assert rows[0]["images"] == [{"bytes": (images / "coffee.png").read_bytes(), "path": "coffee.png"}]
    assert rows[0]["messages"][0] == {"role": "user", "content": "<image>\nWhat is in the cup?"}
    assert rows[2]["videos"][0]["bytes"] == (images / "pan.mp4").read_bytes()
    shutil.rmtree(images)  # the parquet file holds its media
    run = tmp_path / "run"
    train = ["train", "--data.data", str(out), "--train.steps", "2", "--train.output_dir", str(run)]
    assert main([*train, "--data.seq_length", "512"]) == 0
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all(s["loss"] > 0 for s in steps)


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_video_bytes_decode_as_the_file_does(backend):
    path = DEMO / "pan.mp4"
    ours = load_video(MediaBytes(path.read_bytes(), "videos[0]"), backend=backend)
    reference = load_video(path, backend=backend)
    assert ours.frames.shape == reference.frames.shape and (ours.fps, ours.duration) == (
        reference.fps,
        reference.duration,
    )
    assert (ours.frames == reference.frames).all()
    with pytest.raises(MmzooError, match=r"^cannot read video embedded videos\[0\], 2 bytes: "):
        load_video(MediaBytes(b"xx", "videos[0]"), backend=backend)


def test_inspect_reads_parquet(files, tmp_path, capsys):
    data = write_chat_parquet(files, tmp_path / "train.parquet")
    assert main(["data", "inspect", "--model", "qwen2_5_vl", "--data", str(data), "--index", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"sample 3 of 4 ({data} row 3)"
    assert out[2].startswith("image 0: ") and out[3].startswith("image 1: ")
