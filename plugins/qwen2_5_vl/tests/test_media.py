"""Media decoding and the Qwen2.5-VL media processor, checked against transformers' PIL processor."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

import mmzoo
from mmzoo.data.media import Video, load_image, load_video
from mmzoo.errors import MmzooError
from mmzoo_qwen2_5_vl.config import VARIANTS
from mmzoo_qwen2_5_vl.media import QwenMediaProcessor, build_media_processor, smart_resize

DEMO = Path(mmzoo.__file__).parent / "demo"


def photo(name: str, size: tuple[int, int] | None = None, box: tuple[int, int, int, int] | None = None):
    image = load_image(DEMO / name)
    if box is not None:
        image = image.crop(box)
    return image.resize(size, Image.Resampling.BICUBIC) if size else image


def translucent(name: str) -> Image.Image:
    image = photo(name, size=(90, 60)).convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize(image.size))
    return image


# (image, processor settings): aspect ratios from 1:1 to 1:15, sizes that hit the min and max bounds.
CASES = [
    (lambda: photo("chelsea.jpg"), {}),
    (lambda: photo("camera.jpg"), {}),  # grayscale JPEG
    (lambda: translucent("coffee.jpg"), {}),  # alpha composited on white
    (lambda: photo("astronaut.jpg", size=(40, 40)), {}),  # below min_pixels: upscaled
    (lambda: photo("coffee.jpg", box=(0, 90, 320, 120)), {}),  # 320x30 strip
    (lambda: photo("rocket.jpg", box=(150, 0, 170, 214)), {}),  # 20x214 sliver
    (lambda: photo("rocket.jpg"), {"max_pixels": 32 * 28 * 28}),
    (lambda: photo("hubble.jpg", size=(97, 61)), {"min_pixels": 128 * 28 * 28}),
    (lambda: photo("coffee.jpg", size=(131, 257)), {"min_pixels": 64 * 28 * 28, "max_pixels": 96 * 28 * 28}),
]


@pytest.mark.parametrize("make, settings", CASES)
def test_image_matches_transformers(make, settings):
    image = make()
    pixel_values, grid = QwenMediaProcessor(**settings).image(image)
    ref = Qwen2VLImageProcessorPil(**settings)(images=image, return_tensors="pt")
    assert pixel_values.dtype == torch.float32 and pixel_values.shape[1] == 1176
    assert torch.equal(grid, ref["image_grid_thw"])
    torch.testing.assert_close(pixel_values, ref["pixel_values"], atol=1e-5, rtol=1e-5)


def test_image_from_path_and_token_count():
    processor = QwenMediaProcessor()
    pixel_values, grid = processor.image(DEMO / "chelsea.jpg")
    ref, _ = processor.image(photo("chelsea.jpg"))
    assert torch.equal(pixel_values, ref)
    t, h, w = grid[0].tolist()
    item = processor.prepare_image(DEMO / "chelsea.jpg")
    assert processor.num_tokens(item) == t * h * w // 4 == pixel_values.shape[0] // 4
    assert processor.expand(item) == [151652, *[151655] * (t * h * w // 4), 151653]
    assert torch.equal(processor.tensors([item])["pixel_values"], pixel_values)


def test_smart_resize_matches_transformers_and_bounds():
    rng = np.random.default_rng(0)
    for height, width in rng.integers(1, 5000, size=(300, 2)):
        if max(height, width) / min(height, width) > 200:
            continue
        lo, hi = 4 * 28 * 28, 1024 * 28 * 28
        h, w = smart_resize(int(height), int(width), 28, lo, hi)
        assert (h, w) == hf_smart_resize(int(height), int(width), 28, lo, hi)
        assert h % 28 == 0 and w % 28 == 0 and lo <= h * w <= hi


def test_aspect_ratio_above_200_is_refused():
    with pytest.raises(MmzooError, match="aspect ratio"):
        QwenMediaProcessor().image(Image.new("RGB", (2010, 10)))


def test_processor_from_config_takes_patch_sizes():
    processor = build_media_processor(VARIANTS["tiny"], fps=1.0)
    assert (processor.patch_size, processor.temporal_patch_size, processor.merge_size) == (14, 2, 2)
    assert processor.fps == 1.0


# ---- video ----


def write_video(path: Path, n_frames: int, fps: int = 10, size: tuple[int, int] = (64, 48)) -> Path:
    """An mp4 whose frame i is a flat gray of level 8 * i (so a decoded frame tells its index)."""
    width, height = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qp": "0"}
        for i in range(n_frames):
            pixels = np.full((height, width, 3), 8 * i, dtype=np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(stream.encode())
    return path


def frame_indices(video: Video) -> list[int]:
    return [round(float(f.mean()) / 8) for f in video.frames]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", 30)  # 3 s at 10 fps


@pytest.mark.parametrize(
    "fps, max_frames, expected",
    [
        (2.0, 128, [0, 6, 12, 17, 23, 29]),  # 3 s * 2 fps
        (1.0, 128, [0, 29]),
        (2.0, 4, [0, 10, 19, 29]),  # capped
        (2.0, 5, [0, 10, 19, 29]),  # capped, then even
        (100.0, 128, list(range(30))),  # never more than the file has
    ],
)
def test_video_sampling(clip, fps, max_frames, expected):
    video = load_video(clip, fps=fps, max_frames=max_frames)
    assert video.frames.dtype == np.uint8 and video.frames.shape[1:] == (48, 64, 3)
    assert frame_indices(video) == expected
    assert video.source_fps == pytest.approx(10.0) and video.duration == pytest.approx(3.0)
    assert video.fps == pytest.approx(len(expected) / 3.0)


def test_very_short_videos_pad_to_even(tmp_path):
    one = load_video(write_video(tmp_path / "one.mp4", 1))
    assert frame_indices(one) == [0, 0]
    three = load_video(write_video(tmp_path / "three.mp4", 3), fps=10.0)
    assert frame_indices(three) == [0, 2]


def test_decord_backend_samples_the_same_frames(clip):
    pytest.importorskip("decord")
    ours = load_video(clip, backend="pyav")
    other = load_video(clip, backend="decord")
    assert frame_indices(other) == frame_indices(ours)
    assert other.fps == pytest.approx(ours.fps)


def test_decord_missing_is_a_clear_error(clip, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` fail
    with pytest.raises(MmzooError, match="decord.*not installed"):
        load_video(clip, backend="decord")


def test_processor_video_path_respects_fps_and_maxlen(clip):
    pixel_values, grid, second_per_grid_t = QwenMediaProcessor(fps=2.0).video(clip)
    assert grid[0, 0].item() == 3 and second_per_grid_t == pytest.approx(1.0)
    assert pixel_values.shape[0] == grid.prod().item()
    _, grid, second_per_grid_t = QwenMediaProcessor(fps=2.0, video_maxlen=4).video(clip)
    assert grid[0, 0].item() == 2 and second_per_grid_t == pytest.approx(2 / (4 / 3))


def test_video_patches_equal_the_image_path_frame_by_frame():
    pan = load_video(DEMO / "pan.mp4", fps=2.0)
    settings = {"min_pixels": 16 * 28 * 28, "max_pixels": 48 * 28 * 28}
    processor = QwenMediaProcessor(
        **settings, video_min_pixels=settings["min_pixels"], video_max_pixels=settings["max_pixels"]
    )
    pixel_values, grid, _ = processor.video(pan)
    t, h, w = grid[0].tolist()
    assert t == len(pan.frames) // 2 and t >= 2
    video = pixel_values.reshape(t, h * w, 3, 2, 14 * 14)  # (pair, patch, C, frame, pixels)
    for i, frame in enumerate(pan.frames):
        image, image_grid = processor.image(Image.fromarray(frame))
        assert image_grid[0].tolist() == [1, h, w]
        image = image.reshape(h * w, 3, 2, 14 * 14)
        assert torch.equal(image[:, :, 0], image[:, :, 1])  # a still fills both temporal slots
        torch.testing.assert_close(video[i // 2, :, :, i % 2], image[:, :, 0], atol=0, rtol=0)


def test_hand_built_video_is_limited_and_padded():
    frames = np.random.default_rng(0).integers(0, 256, (7, 56, 56, 3), dtype=np.uint8)
    video = Video(frames, fps=7.0, source_fps=7.0, duration=1.0)
    _, grid, second = QwenMediaProcessor(video_maxlen=4).video(video)
    assert grid[0, 0].item() == 2 and second == pytest.approx(2 / 4.0)
    odd = QwenMediaProcessor().video(Video(frames[:3], fps=3.0, source_fps=3.0, duration=1.0))
    assert odd[1][0, 0].item() == 1 and odd[2] == pytest.approx(2 / 2.0)  # first and last of 3 frames
    single, grid, _ = QwenMediaProcessor().video(Video(frames[:1], fps=1.0, source_fps=1.0, duration=1.0))
    assert grid[0, 0].item() == 1  # one frame repeated to fill the pair
    assert torch.equal(single.reshape(-1, 3, 2, 196)[:, :, 0], single.reshape(-1, 3, 2, 196)[:, :, 1])


# ---- decoding errors and image conversions ----


def test_missing_files(tmp_path):
    with pytest.raises(MmzooError, match="not found.*nope.jpg"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(MmzooError, match="not found.*nope.mp4"):
        load_video(tmp_path / "nope.mp4")


def test_corrupt_image(tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(MmzooError, match="garbage.jpg"):
        load_image(garbage)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((DEMO / "chelsea.jpg").read_bytes()[:3000])
    with pytest.raises(MmzooError, match="truncated.jpg"):
        load_image(truncated)


def test_unreadable_video(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(MmzooError, match="bad.mp4"):
        load_video(bad)
    with pytest.raises(MmzooError, match="unknown video backend"):
        load_video(DEMO / "pan.mp4", backend="opencv")


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    top, bottom = np.asarray(loaded)[2, 10], np.asarray(loaded)[-3, 10]
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def test_transparency_on_white_and_gray_to_rgb(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(buffer, format="PNG")
    (tmp_path / "clear.png").write_bytes(buffer.getvalue())
    assert np.asarray(load_image(tmp_path / "clear.png")).min() == 255
    gray = load_image(DEMO / "camera.jpg")
    assert gray.mode == "RGB"
    pixels = np.asarray(gray)
    assert np.array_equal(pixels[..., 0], pixels[..., 2])
