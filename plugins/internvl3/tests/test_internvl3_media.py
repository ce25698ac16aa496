"""InternVL3 tiling and media processor, checked against transformers' GotOcr2ImageProcessorPil."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
    GotOcr2ImageProcessorPil,
    get_optimal_tiled_canvas,
)

import mmzoo
from mmzoo.data.media import Video, load_image
from mmzoo.errors import MmzooError
from mmzoo_internvl3.config import VARIANTS, VisionConfig
from mmzoo_internvl3.media import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InternVLMediaProcessor,
    build_media_processor,
    closest_grid,
)
from mmzoo_internvl3.template import default_tokenizer

DEMO = Path(mmzoo.__file__).parent / "demo"
START, END, CONTEXT = 151665, 151666, 151667


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def processor(tok):
    return build_media_processor(VARIANTS["1b"], tokenizer=tok)


def photo(name: str, size: tuple[int, int] | None = None, box: tuple[int, int, int, int] | None = None):
    image = load_image(DEMO / name)
    if box is not None:
        image = image.crop(box)
    return image.resize(size, Image.Resampling.BICUBIC) if size else image


def reference() -> GotOcr2ImageProcessorPil:
    """transformers' processor as InternVL3-*-hf configures it (448 tiles, 1-12, ImageNet mean/std)."""
    return GotOcr2ImageProcessorPil(
        size={"height": 448, "width": 448},
        crop_to_patches=True,
        min_patches=1,
        max_patches=12,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )


# (image, expected (columns, rows)): aspect ratios from 1:11 to 11:1 and three tie cases, where
# grids of the same aspect ratio (1x1/2x2/3x3, 2x1/4x2) compete and the image area decides.
CASES = [
    (lambda: photo("chelsea.jpg"), (3, 2)),
    (lambda: photo("camera.jpg"), (1, 1)),  # grayscale, square and small: tie kept at 1x1
    (lambda: photo("astronaut.jpg", size=(1000, 1000)), (3, 3)),  # square tie: area > half of 3x3
    (lambda: photo("hubble.jpg", size=(896, 448)), (2, 1)),  # 2:1 tie: too small for 4x2
    (lambda: photo("hubble.jpg", size=(1800, 900)), (4, 2)),  # 2:1 tie: area > half of 4x2
    (lambda: photo("coffee.jpg", box=(0, 90, 320, 120)), (11, 1)),  # 320x30 strip
    (lambda: photo("rocket.jpg", box=(150, 0, 170, 214)), (1, 11)),  # 20x214 sliver
    (lambda: photo("coffee.jpg", size=(333, 777)), (2, 5)),  # 3:7 needs 21 tiles; 2:5 is closest
]


@pytest.mark.parametrize("make, grid", CASES)
def test_tiles_equal_transformers(make, grid, processor):
    """Pixel-for-pixel: the same float32 values, bit for bit."""
    image = make()
    item = processor.prepare_image(image)
    ref = reference()(images=image, return_tensors="pt")
    tiles = grid[0] * grid[1]
    assert len(item.frames) == (tiles + 1 if tiles > 1 else 1) == int(ref["num_patches"][0])
    assert item.frames.dtype == np.uint8 and item.frames.shape[1:] == (448, 448, 3)
    pixels = processor.tensors([item])["pixel_values"]
    assert pixels.dtype == torch.float32 and torch.equal(pixels, ref["pixel_values"])


def test_a_wrong_resample_is_caught(processor):
    """The comparison can fail: bilinear instead of bicubic tiles differ."""
    image = photo("chelsea.jpg")
    bilinear = image.resize((3 * 448, 2 * 448), Image.Resampling.BILINEAR)
    ref = reference()(images=image, return_tensors="pt")["pixel_values"]
    first = processor.tensors([processor.prepare_image(bilinear.crop((0, 0, 448, 448)))])["pixel_values"]
    assert (first - ref[:1]).abs().max() > 1e-2


def test_grid_matches_transformers_on_random_sizes():
    rng = np.random.default_rng(0)
    for width, height in rng.integers(1, 4000, size=(2000, 2)):
        for lo, hi in ((1, 12), (1, 6), (2, 9)):
            expected = get_optimal_tiled_canvas((int(height), int(width)), (448, 448), lo, hi)
            assert closest_grid(int(width), int(height), 448, lo, hi) == expected


def test_image_from_path_and_tokens(processor):
    item = processor.prepare_image(DEMO / "chelsea.jpg")
    assert np.array_equal(item.frames, processor.prepare_image(photo("chelsea.jpg")).frames)
    assert item.kind == "image" and processor.num_tokens(item) == 7 * 256
    assert processor.expand(item) == [START, *[CONTEXT] * (7 * 256), END]
    assert processor.feature_token_ids == {CONTEXT} and processor.media_keys == ("pixel_values",)
    assert processor.info_tensors([item]) == {}


def test_tokens_follow_tile_patch_and_ratio(tok):
    """56-px tiles of 14-px patches: 4x4 patches, 2x2 after the pixel shuffle."""
    config = dataclasses.replace(VARIANTS["tiny"], vision=VisionConfig(image_size=56, num_layers=2))
    small = build_media_processor(config, tokenizer=tok)
    item = small.prepare_image(photo("chelsea.jpg"))
    assert item.frames.shape == (7, 56, 56, 3)
    assert small.num_tokens(item) == 7 * 4
    with pytest.raises(MmzooError, match=r"frames of shape \(56, 56, 3\), not \(448, 448, 3\)"):
        build_media_processor(VARIANTS["1b"], tokenizer=tok).num_tokens(item)


def test_tiling_options(tok):
    capped = InternVLMediaProcessor(max_tiles=4, thumbnail=False, tokenizer=tok)
    assert len(capped.prepare_image(photo("hubble.jpg", size=(1800, 900))).frames) == 2  # 2x1 fits in 4
    with pytest.raises(MmzooError, match="min_tiles 3 and max_tiles 2"):
        InternVLMediaProcessor(min_tiles=3, max_tiles=2)


def test_video_frames_and_prefixes(processor, tok):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(3, 90, 160, 3), dtype=np.uint8)
    item = processor.prepare_video(Video(frames, fps=2.0, source_fps=30.0, duration=1.5))
    assert item.kind == "video" and item.frames.shape == (3, 448, 448, 3)
    expected = np.asarray(Image.fromarray(frames[1]).resize((448, 448), Image.Resampling.BICUBIC))
    assert np.array_equal(item.frames[1], expected)
    assert processor.num_tokens(item) == 3 * 256
    # transformers' InternVLProcessor writes a video this way (frames joined by a newline).
    image = "<img>" + "<IMG_CONTEXT>" * 256 + "</img>"
    text = "\n".join(f"Frame{i + 1}: {image}" for i in range(3))
    assert processor.expand(item) == tok(text)["input_ids"]
    assert processor.expand(item)[:5] == [4369, 16, 25, 220, START]  # "Frame", "1", ":", " "


def test_video_from_file(processor):
    item = processor.prepare_video(DEMO / "pan.mp4")
    assert item.frames.shape[1:] == (448, 448, 3) and 2 <= len(item.frames) <= processor.video_maxlen
    pixels = processor.tensors([processor.prepare_image(photo("camera.jpg")), item])["pixel_values"]
    assert pixels.shape == (1 + len(item.frames), 3, 448, 448)


def test_dummy_is_one_tile(processor):
    item = processor.dummy()
    assert item.frames.shape == (1, 448, 448, 3) and processor.num_tokens(item) == 256
    assert processor.tensors([item])["pixel_values"].shape == (1, 3, 448, 448)
    with pytest.raises(MmzooError, match="use dummy"):
        processor.tensors([])
