"""Family-agnostic media decoding: image files to RGB PIL images, video files to sampled frames.

Model families turn the results into their own pixel layout (see each plugin's media processor).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from mmzoo.errors import MmzooError

VideoBackend = Literal["pyav", "decord"]


@dataclass(frozen=True)
class MediaBytes:
    """An encoded image or video held in memory (a parquet or arrow cell), decoded like a file.

    Attributes:
        data: the file's bytes (JPEG, PNG, mp4, ...).
        name: where it came from, for messages, e.g. ``images[0] (cat.jpg)``.
    """

    data: bytes = field(repr=False)
    name: str

    def __str__(self) -> str:
        return f"embedded {self.name}, {len(self.data)} bytes"

    def open(self) -> io.BytesIO:
        """A binary file object over ``data``."""
        return _InMemory(self.data)


class _InMemory(io.BytesIO):
    def __repr__(self) -> str:  # PIL names an unreadable file object by its repr (an address)
        return "(in memory)"


def load_image(path: str | os.PathLike | MediaBytes) -> Image.Image:
    """Decode an image file to RGB (see ``to_rgb``), with its EXIF orientation applied.

    Args:
        path: Any format PIL reads, as a file or as :class:`MediaBytes`.

    Returns:
        A fully decoded RGB image.

    Raises:
        MmzooError: The file is missing or not a readable image.
    """
    try:
        with Image.open(path.open() if isinstance(path, MediaBytes) else path) as image:
            image.load()  # decode now, while the file is open, so corrupt data fails here
            ImageOps.exif_transpose(image, in_place=True)
    except FileNotFoundError:
        raise MmzooError(f"image file not found: {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MmzooError(f"cannot read image {path}: {e}") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert to RGB, compositing transparency onto white as transformers' ``convert_to_rgb`` does."""
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


@dataclass(frozen=True)
class Video:
    """Frames sampled from a video.

    Attributes:
        frames: uint8 array (T, H, W, 3), T even.
        fps: Sampling rate of ``frames`` (T / duration); models derive frame timing from it.
        source_fps: Frame rate of the file.
        duration: Length of the file in seconds.
    """

    frames: np.ndarray
    fps: float
    source_fps: float
    duration: float

    def limit(self, max_frames: int) -> Video:
        """Return at most ``max_frames`` (rounded down to even) frames, evenly spread, fps adjusted."""
        n = _even_count(min(len(self.frames), max_frames))
        if n >= len(self.frames):
            return self
        keep = np.linspace(0, len(self.frames) - 1, n).round().astype(int)
        return replace(self, frames=self.frames[keep], fps=self.fps * n / len(self.frames))


def _even_count(n: int) -> int:
    # Frames go into temporal patches of 2; two is the least a video can be.
    return max(2, n - n % 2)


def _sample_count(duration: float, total: int, fps: float, max_frames: int) -> int:
    """Frames to take: ``duration * fps``, capped by the frames available and ``max_frames``, even."""
    return _even_count(min(round(duration * fps), total, max_frames))


def _indices(total: int, n: int) -> np.ndarray:
    """``n`` frame indices spread evenly over ``total`` frames, first and last included."""
    return np.linspace(0, max(total - 1, 0), n).round().astype(int)


def _pad_even(frames: list[np.ndarray], n: int) -> np.ndarray:
    # A video shorter than two frames (or one that ends early) repeats its last frame.
    frames = frames + [frames[-1]] * (n - len(frames))
    return np.stack(frames)


def _decode_pyav(path: str | io.BytesIO, name: str, fps: float, max_frames: int) -> Video:
    try:
        import av
    except ImportError:
        raise MmzooError("video backend 'pyav' is not installed: pip install av") from None

    with av.open(path, mode="r") as container:
        if not container.streams.video:
            raise MmzooError(f"no video stream in {name}")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        source_fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = 0.0
        # Containers without a frame count (some webm, raw streams) get an estimate from the duration.
        total = stream.frames or max(1, round(duration * source_fps))
        duration = duration or total / source_fps
        n = _sample_count(duration, total, fps, max_frames)
        wanted = _indices(total, n)
        frames: list[np.ndarray] = []
        for i, frame in enumerate(container.decode(stream)):
            # An index repeats when n > total (very short videos): keep one copy per occurrence.
            for _ in range(int(np.count_nonzero(wanted == i))):
                frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) >= n:
                break
    if not frames:
        raise MmzooError(f"no frames decoded from {name}")
    return Video(_pad_even(frames, n), n / duration, source_fps, duration)


def _decode_decord(path: str | io.BytesIO, name: str, fps: float, max_frames: int) -> Video:
    try:
        import decord
    except ImportError:
        raise MmzooError(
            "video backend 'decord' is not installed: pip install decord, or use 'pyav'"
        ) from None
    reader = decord.VideoReader(path, num_threads=1)
    total = len(reader)
    if total == 0:
        raise MmzooError(f"no frames decoded from {name}")
    source_fps = float(reader.get_avg_fps()) or 25.0
    duration = total / source_fps
    n = _sample_count(duration, total, fps, max_frames)
    frames = reader.get_batch(_indices(total, n).tolist()).asnumpy()
    return Video(np.ascontiguousarray(frames), n / duration, source_fps, duration)


def load_video(
    path: str | os.PathLike | MediaBytes,
    fps: float = 2.0,
    max_frames: int = 128,
    backend: VideoBackend = "pyav",
) -> Video:
    """Decode a video and sample frames evenly over its duration.

    Takes ``duration * fps`` frames, at most ``max_frames`` and at most the frames in the file,
    rounded down to an even count (at least two: a one-frame video repeats its frame).

    Args:
        path: Any file the backend decodes (mp4, webm, avi, ...), or such a file as
            :class:`MediaBytes` (both backends read it from memory).
        fps: Frames to sample per second of video.
        max_frames: Upper bound on the number of frames.
        backend: ``"pyav"`` (default) or ``"decord"``.

    Returns:
        The sampled frames with their timing.

    Raises:
        MmzooError: The file is missing or unreadable, or the backend is unknown or not installed.
    """
    if backend not in ("pyav", "decord"):
        raise MmzooError(f"unknown video backend {backend!r}: choose 'pyav' or 'decord'")
    if fps <= 0:
        raise MmzooError(f"video fps must be positive, got {fps}")
    if max_frames < 2:
        raise MmzooError(f"video max_frames must be at least 2, got {max_frames}")
    if not isinstance(path, MediaBytes):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise MmzooError(f"video file not found: {path}")
    decode = _decode_pyav if backend == "pyav" else _decode_decord
    try:
        return decode(path.open() if isinstance(path, MediaBytes) else path, str(path), fps, max_frames)
    except MmzooError:
        raise
    except Exception as e:  # each backend raises its own error types for broken files
        raise MmzooError(f"cannot read video {path}: {type(e).__name__}: {e}") from None
