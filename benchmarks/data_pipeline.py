"""Data pipeline throughput: mmzoo's preprocessing vs the transformers processor path.

Generates chat-form JSONL records over the demo photos (rescaled to 640x480, 1024x768 and
768x1024 JPEGs), some text-only records and optionally a few video records, then measures
samples/s for:

* mmzoo without a cache (``cache_dir=None``): the same as the first run, minus the cache write;
* mmzoo, first run: ``build_dataset`` into an empty cache dir (decode + resize + tokenise +
  position ids + cache write), then ``dataset[i]`` for every sample (normalise + patchify);
* mmzoo, second run: the same two steps reading the cache written by the first run;
* mmzoo from one parquet file of the same records with the JPEGs embedded as bytes (what
  ``mmzoo data convert-llava --out x.parquet`` writes), the three runs above again;
* transformers: per record, PIL load + ``Qwen2VLImageProcessorPil`` + the same chat text with
  the image placeholders expanded + ``tokenizer(text)``, what a transformers-based trainer
  does per sample (it has no cache, so every epoch costs the same).

Image and text records go through both paths; video records (``--videos``) only through mmzoo
and are timed on their own. Each row is the fastest of ``--repeat`` interleaved
repetitions. Prints a markdown table; run with ``python benchmarks/data_pipeline.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from machine import cpu_model  # benchmarks/machine.py
from PIL import Image, ImageOps

import mmzoo
from mmzoo.config import DataConfig
from mmzoo.data.dataset import build_dataset
from mmzoo.data.parquet_out import write_parquet
from mmzoo.data.records import read_records
from mmzoo.data.tokenizer import default_qwen_tokenizer

DEMO = Path(mmzoo.__file__).resolve().parent / "demo"
SIZES = ((640, 480), (1024, 768), (768, 1024))  # (width, height)
QUESTIONS = (
    "What is in this picture?",
    "Describe the image in one sentence.",
    "What colours stand out?",
    "Is this photo taken indoors or outdoors?",
    "What is the main object, and where is it in the frame?",
)
ANSWERS = (
    "A photograph with one clear subject in the middle of the frame.",
    "The main subject is well lit against a plain background, with some detail in the corners.",
    "Mostly muted tones, with a brighter patch near the centre.",
    "It looks like an everyday scene, photographed from a normal viewpoint.",
)
TEXT_QUESTIONS = (
    "What is the capital of France?",
    "Give me two tips for writing clear commit messages.",
    "Explain in a sentence what a convolution does.",
)


def make_records(root: Path, records: int, videos: int, seed: int) -> tuple[Path, Path | None]:
    """Write images and ``records`` image/text records (plus ``videos`` video records) under ``root``.

    Returns:
        The image/text JSONL file and the video JSONL file (None without videos).
    """
    rng = random.Random(seed)
    images_dir = root / "images"
    images_dir.mkdir()
    image_names = []
    for photo in sorted(DEMO.glob("*.jpg")):
        with Image.open(photo) as im:
            im = im.convert("RGB")
            for width, height in SIZES:
                name = f"{photo.stem}_{width}x{height}.jpg"
                # Crop to the aspect ratio, then upscale: real photos at common camera/web sizes.
                fitted = ImageOps.fit(im, (width, height), Image.Resampling.LANCZOS)
                fitted.save(images_dir / name, quality=90)
                image_names.append(f"images/{name}")
    lines = []
    for i in range(records):
        if i % 8 == 7:  # one in eight is text-only
            user, images = rng.choice(TEXT_QUESTIONS), []
        elif i % 16 == 3:  # a few with two images
            user = f"<image>\n<image>\nCompare the two pictures. {rng.choice(QUESTIONS)}"
            images = rng.sample(image_names, 2)
        else:
            user, images = f"<image>\n{rng.choice(QUESTIONS)}", [rng.choice(image_names)]
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": " ".join(rng.sample(ANSWERS, rng.randint(1, 3)))},
        ]
        lines.append(json.dumps({"messages": messages, "images": images}))
    data = root / "records.jsonl"
    data.write_text("\n".join(lines) + "\n")
    if not videos:
        return data, None
    shutil.copy(DEMO / "pan.mp4", root / "pan.mp4")
    video_lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "<video>\nWhat happens in this clip?"},
                    {"role": "assistant", "content": rng.choice(ANSWERS)},
                ],
                "videos": ["pan.mp4"],
            }
        )
        for _ in range(videos)
    ]
    video_data = root / "videos.jsonl"
    video_data.write_text("\n".join(video_lines) + "\n")
    return data, video_data


def run_mmzoo(spec, model_config, tokenizer, data: Path, cache_dir: Path | None) -> dict:
    """build_dataset, then every sample; seconds of each step and the samples."""
    config = DataConfig(data=str(data), seq_length=4096, cache_dir=str(cache_dir) if cache_dir else None)
    started = time.perf_counter()
    dataset = build_dataset(spec, model_config, tokenizer, config, log=lambda _: None)
    prepared = time.perf_counter()
    samples = [dataset[i] for i in range(len(dataset))]
    done = time.perf_counter()
    return {"prepare": prepared - started, "materialise": done - prepared, "samples": samples}


class TransformersPath:
    """What a transformers-based trainer does per record: PIL load, image processor, tokenizer."""

    def __init__(self, spec, tokenizer, min_pixels: int, max_pixels: int) -> None:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
        self.template = spec.template
        self.tokenizer = tokenizer
        self.merge = self.processor.merge_size

    def __call__(self, data: Path) -> dict:
        started = time.perf_counter()
        samples = []
        base = data.parent
        with open(data) as f:
            for line in f:
                record = json.loads(line)
                text = self.template.render(record["messages"])
                sample = {}
                if record.get("images"):
                    images = []
                    for name in record["images"]:
                        with Image.open(base / name) as im:
                            images.append(ImageOps.exif_transpose(im).convert("RGB"))
                    sample = dict(self.processor(images=images, return_tensors="pt"))
                    for t, h, w in sample["image_grid_thw"].tolist():
                        pads = "<|image_pad|>" * (t * h * w // self.merge**2)
                        text = text.replace("<image>", f"<|vision_start|>{pads}<|vision_end|>", 1)
                sample["input_ids"] = self.tokenizer(text, return_tensors="pt")["input_ids"][0]
                samples.append(sample)
        return {"seconds": time.perf_counter() - started, "samples": samples}


def check_same(mmzoo_samples, hf_samples) -> str:
    """Whether both paths produced the same token ids and (to float tolerance) pixel values."""
    if len(mmzoo_samples) != len(hf_samples):
        return f"no: {len(mmzoo_samples)} vs {len(hf_samples)} samples"
    worst = 0.0
    for i, (ours, theirs) in enumerate(zip(mmzoo_samples, hf_samples, strict=True)):
        if not torch.equal(ours.input_ids, theirs["input_ids"]):
            return f"no: input_ids differ at sample {i}"
        if "pixel_values" in theirs:
            if not torch.equal(ours.media["image_grid_thw"], theirs["image_grid_thw"]):
                return f"no: image_grid_thw differ at sample {i}"
            worst = max(worst, (ours.media["pixel_values"] - theirs["pixel_values"]).abs().max().item())
    return f"yes (same input_ids and grids; pixel_values max abs diff {worst:.1e})"


@dataclass
class Bench:
    """What every run needs: the model family, its 7b config (no model is built), the tokenizer and
    the transformers baseline sized as mmzoo's media processor."""

    spec: Any
    model_config: Any
    tokenizer: Any
    baseline: TransformersPath

    def mmzoo(self, data: Path, cache_dir: Path | None) -> dict:
        return run_mmzoo(self.spec, self.model_config, self.tokenizer, data, cache_dir)


class Best:
    """The fastest repetition of each row, and whether mmzoo's first repetition matched the baseline."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}
        self.same: dict[str, str] = {}

    def keep(self, name: str, result: dict) -> None:
        total = result.get("seconds") or result["prepare"] + result["materialise"]
        result = {k: v for k, v in result.items() if k != "samples"} | {"total": total}
        if name not in self.rows or total < self.rows[name]["total"]:
            self.rows[name] = result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200, help="image/text records (default 200)")
    parser.add_argument("--videos", type=int, default=0, help="video records, mmzoo only (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="record generation seed (default 0)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions, fastest kept (default 3)")
    return parser.parse_args()


def warm_up(bench: Bench, root: Path, data: Path, video_data: Path | None) -> None:
    """A few records through each path (imports, lazy inits, page cache), so first-run numbers
    measure preprocessing, not one-time start-up."""
    warm = root / "warm.jsonl"
    warm.write_text("".join(data.read_text().splitlines(keepends=True)[:4]))
    bench.mmzoo(warm, None)
    bench.baseline(warm)
    if video_data:
        bench.mmzoo(video_data, None)


def repetition(
    bench: Bench, best: Best, root: Path, rep: int, sources: dict[str, Path], video_data: Path | None
) -> tuple[int, int]:
    """One repetition of every row; returns (images, text-only records) the baseline saw."""
    # Samples are compared with the baseline's, then dropped: at most two sets of pixel values
    # (~3 GB each at the defaults) are alive at once.
    hf = bench.baseline(sources["files"])
    best.keep("hf", hf)
    counts = (
        sum(len(s.get("image_grid_thw", ())) for s in hf["samples"]),
        sum("image_grid_thw" not in s for s in hf["samples"]),
    )
    for source, data in sources.items():
        cache = root / f"cache-{source}-{rep}"  # empty for this repetition's first run
        for run, cache_dir in (("no cache", None), ("first", cache), ("cached", cache)):
            name = f"{source}: {run}"
            result = bench.mmzoo(data, cache_dir)
            if rep == 0:
                best.same[name] = check_same(result["samples"], hf["samples"])
            best.keep(name, result)
            del result
    del hf
    if video_data:
        video_cache = root / f"video-cache-{rep}"
        best.keep("video first", bench.mmzoo(video_data, video_cache))
        best.keep("video cached", bench.mmzoo(video_data, video_cache))
    return counts


SOURCES = {"files": "JSONL + JPEG files", "parquet": "parquet, JPEGs embedded"}
RUNS = (  # (row label, name of the kept result)
    ("without cache (cache_dir=None)", "no cache"),
    ("first run, empty cache", "first"),
    ("cached run", "cached"),
)


def print_report(
    args: argparse.Namespace,
    best: Best,
    records: int,
    counts: tuple[int, int],
    processor: Any,
    parquet_bytes: int,
) -> None:
    """The date, machine and records lines, the table, then whether the outputs agree."""
    n_images, n_text = counts
    hf_rate = records / best.rows["hf"]["total"]

    def row(path: str, records: int, seconds: float, relative: str | None = None) -> str:
        rate = records / seconds
        return f"| {path} | {records} | {seconds:.2f} | {rate:.1f} | {relative or f'{rate / hf_rate:.2f}x'} |"

    print(f"Date: {datetime.date.today().isoformat()}")
    print(
        f"Machine: {os.cpu_count()} CPUs ({cpu_model()}), "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, numpy {np.__version__}, torch threads "
        f"{torch.get_num_threads()}; fastest of {args.repeat} interleaved repetitions"
    )
    print(
        f"Records: {records} image/text records ({records - n_text} with images, {n_images} images in all; "
        f"{n_text} text-only), seed {args.seed}; qwen2_5_vl 7b config, seq_length 4096, "
        f"min/max pixels {processor.min_pixels}/{processor.max_pixels}; the parquet file "
        f"{parquet_bytes / 1e6:.1f} MB (mmzoo.data.parquet_out.write_parquet)"
    )
    print()
    print("| path | records | seconds | samples/s | relative to transformers |")
    print("|---|---|---|---|---|")
    hf_path = "transformers: PIL + Qwen2VLImageProcessorPil + tokenizer (every epoch)"
    print(row(hf_path, records, best.rows["hf"]["total"]))
    for source, what in SOURCES.items():
        for label, run in RUNS:
            result = best.rows[f"{source}: {run}"]
            step = "(one step)"
            name = f"mmzoo, {what}, {label}"
            print(row(f"{name}: prepare (build_dataset)", records, result["prepare"], step))
            print(row(f"{name}: materialise (dataset[i])", records, result["materialise"], step))
            print(row(f"**{name}: total**", records, result["total"]))
    if args.videos:
        for label, name in (("first run", "video first"), ("cached run", "video cached")):
            path = f"mmzoo video records only, {label}: total"
            print(row(path, args.videos, best.rows[name]["total"], "n/a (no baseline)"))
    print()
    for source, what in SOURCES.items():
        for label, run in RUNS:
            print(f"Same outputs as transformers, mmzoo {what}, {label}: {best.same[f'{source}: {run}']}")


def main() -> None:
    args = parse_args()
    spec = mmzoo.get_model("qwen2_5_vl")
    model_config = spec.variant("7b")  # the config only: no model is built
    tokenizer = default_qwen_tokenizer()
    root = Path(tempfile.mkdtemp(prefix="mmzoo-bench-"))
    try:
        data, video_data = make_records(root, args.records, args.videos, args.seed)
        # Check records up front so both paths see the same good records.
        good = read_records(str(data))
        records = len(good)
        parquet = root / "records.parquet"
        write_parquet(parquet, good)
        parquet_bytes = parquet.stat().st_size
        del good
        processor = spec.media_processor(model_config)
        baseline = TransformersPath(spec, tokenizer, processor.min_pixels, processor.max_pixels)
        bench = Bench(spec, model_config, tokenizer, baseline)
        warm_up(bench, root, data, video_data)
        # Repetitions are interleaved and each row keeps its fastest one: on a shared VM, other
        # load only ever adds time. Stderr of build_dataset (progress lines) is dropped: the
        # table is the output.
        best = Best()
        with contextlib.redirect_stderr(io.StringIO()):
            for rep in range(args.repeat):
                sources = {"files": data, "parquet": parquet}
                counts = repetition(bench, best, root, rep, sources, video_data)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_report(args, best, records, counts, processor, parquet_bytes)


if __name__ == "__main__":
    main()
