"""Qwen2.5-VL media processor: images and videos to flattened pixel patches and (t, h, w) grids.

Matches transformers' ``Qwen2VLImageProcessorPil`` (resize, rescale, normalise, patch order) and
applies the same steps to video frames, two frames per temporal patch. It is the family's
:class:`mmzoo.protocols.MediaProcessor`: its media batch holds ``pixel_values`` and
``image_grid_thw`` for images, ``pixel_values_videos``, ``video_grid_thw`` and
``second_per_grid_ts`` for videos.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from mmzoo.data.media import MediaBytes, Video, VideoBackend, load_image, load_video, to_rgb
from mmzoo.errors import MmzooError
from mmzoo.protocols import MediaItem

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target size: both sides multiples of ``factor``, area within [min_pixels, max_pixels], aspect kept.

    Mirrors transformers' ``smart_resize`` for Qwen2-VL / Qwen2.5-VL.

    Raises:
        MmzooError: The aspect ratio exceeds 200.
    """
    ratio = max(height, width) / min(height, width)
    if ratio > 200:
        raise MmzooError(f"image aspect ratio {ratio:.0f} is above 200 ({width}x{height}): crop or pad it")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class QwenMediaProcessor:
    """Turns images and videos into Qwen2.5-VL vision encoder inputs.

    Each output row is one 14x14 patch over two frames, flattened as (channel, frame, y, x) =
    3*2*14*14 = 1176 values; rows come in 2x2 merge blocks, blocks row-major, frame pairs in order.

    Args:
        min_pixels: Least resized image area.
        max_pixels: Largest resized image area.
        video_min_pixels: Least resized area per video frame.
        video_max_pixels: Largest resized area per video frame (Qwen's video default, 768 tokens a pair).
        fps: Frames sampled per second when a video is given as a path.
        video_maxlen: Most frames sampled from one video.
        video_backend: Decoder for video paths, ``"pyav"`` or ``"decord"``.
        patch_size: Spatial patch size of the ViT.
        temporal_patch_size: Frames per patch.
        merge_size: Patches merged per side by the projector.
        token_ids: ``(image_pad, video_pad, vision_start, vision_end)`` ids (default: the published ones).
    """

    media_keys = (
        "pixel_values",
        "image_grid_thw",
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",
    )

    def __init__(
        self,
        *,
        min_pixels: int = 4 * 28 * 28,
        max_pixels: int = 16384 * 28 * 28,
        video_min_pixels: int = 128 * 28 * 28,
        video_max_pixels: int = 768 * 28 * 28,
        fps: float = 2.0,
        video_maxlen: int = 128,
        video_backend: VideoBackend = "pyav",
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        token_ids: tuple[int, int, int, int] = (151655, 151656, 151652, 151653),
    ) -> None:
        for name, lo, hi in (("", min_pixels, max_pixels), ("video_", video_min_pixels, video_max_pixels)):
            if not 0 < lo <= hi:
                raise MmzooError(f"{name}min_pixels {lo} must be positive and at most {name}max_pixels {hi}")
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.video_min_pixels, self.video_max_pixels = video_min_pixels, video_max_pixels
        self.fps, self.video_maxlen, self.video_backend = fps, video_maxlen, video_backend
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.pad_ids = {"image": token_ids[0], "video": token_ids[1]}
        self.start_id, self.end_id = token_ids[2], token_ids[3]
        # Per column of a patch row, laid out (C, frame, y, x) like the rows themselves.
        per_channel = temporal_patch_size * patch_size * patch_size
        self._mean = np.repeat(np.array(CLIP_MEAN, dtype=np.float32), per_channel)
        self._std = np.repeat(np.array(CLIP_STD, dtype=np.float32), per_channel)

    def image(self, image: Image.Image | str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Process one image (a PIL image or a file path).

        Returns:
            ``pixel_values`` float32 (h*w, 1176) and ``grid_thw`` int64 (1, 3) with t = 1.
        """
        frames = self.prepare_image(image).frames
        return self.pixel_values(frames), self.grid_thw(frames)

    def video(self, video: Video | str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Process one video (decoded frames or a file path, sampled at ``fps``).

        Returns:
            ``pixel_values`` float32 (t*h*w, 1176), ``grid_thw`` int64 (1, 3) and
            ``second_per_grid_t`` = temporal_patch_size / sampled fps (M-RoPE time step).
        """
        item = self.prepare_video(video)
        return (
            self.pixel_values(item.frames),
            self.grid_thw(item.frames),
            float(item.info["second_per_grid_t"]),
        )

    def prepare_image(self, image: Image.Image | str | os.PathLike | MediaBytes) -> MediaItem:
        """Decode and resize: uint8 ``(1, H, W, 3)`` with H and W multiples of 28 (what caches keep)."""
        rgb = to_rgb(image) if isinstance(image, Image.Image) else load_image(image)
        return MediaItem("image", self._resize(rgb, self.min_pixels, self.max_pixels)[None])

    def prepare_video(self, video: Video | str | os.PathLike | MediaBytes) -> MediaItem:
        """Decode, sample and resize: uint8 ``(T, H, W, 3)`` with T even; ``info`` holds
        ``second_per_grid_t`` (seconds per temporal patch, the M-RoPE time step)."""
        if not isinstance(video, Video):
            video = load_video(video, fps=self.fps, max_frames=self.video_maxlen, backend=self.video_backend)
        video = video.limit(self.video_maxlen)
        if len(video.frames) % self.temporal_patch_size:  # a one-frame Video: repeat the frame
            pad = self.temporal_patch_size - len(video.frames) % self.temporal_patch_size
            video = replace(video, frames=np.concatenate([video.frames] + [video.frames[-1:]] * pad))
        frames = np.stack(
            [
                self._resize(Image.fromarray(f), self.video_min_pixels, self.video_max_pixels)
                for f in video.frames
            ]
        )
        return MediaItem("video", frames, {"second_per_grid_t": self.temporal_patch_size / video.fps})

    def grid_thw(self, frames: np.ndarray) -> torch.Tensor:
        """Patch grid ``(1, 3)`` of prepared frames (an image counts as one temporal patch)."""
        t = max(1, frames.shape[0] // self.temporal_patch_size)
        return torch.tensor([[t, frames.shape[1] // self.patch_size, frames.shape[2] // self.patch_size]])

    def pixel_values(self, frames: np.ndarray) -> torch.Tensor:
        """Normalise and patchify prepared uint8 frames into rows of 1176 values."""
        pixels = frames.transpose(0, 3, 1, 2)  # (T, C, H, W), still uint8
        if pixels.shape[0] == 1:  # a still image fills the temporal patch by repeating itself
            pixels = np.broadcast_to(pixels, (self.temporal_patch_size, *pixels.shape[1:]))
        # Patchify the uint8 frames first, then normalise the contiguous rows in place: about
        # twice as fast as normalising strided float frames, and the same arithmetic, so the
        # same values.
        rows = self._patchify(pixels)[0].numpy().astype(np.float32)
        rows *= np.float32(1 / 255)
        rows -= self._mean
        rows /= self._std
        return torch.from_numpy(rows)

    def num_tokens(self, item: MediaItem) -> int:
        """LLM placeholder tokens of one image or video: t*h*w / merge_size**2 of its grid."""
        t, h, w = self.grid_thw(item.frames)[0].tolist()
        return t * h * w // self.merge_size**2

    @property
    def feature_token_ids(self) -> frozenset[int]:
        return frozenset(self.pad_ids.values())

    def expand(self, item: MediaItem) -> list[int]:
        """``<|vision_start|>`` + a pad per merged patch (``<|image_pad|>`` or ``<|video_pad|>``) +
        ``<|vision_end|>``."""
        return [self.start_id, *[self.pad_ids[item.kind]] * self.num_tokens(item), self.end_id]

    def info_tensors(self, items: list[MediaItem]) -> dict[str, torch.Tensor]:
        """Grids of the images and of the videos, and each video's seconds per grid step."""
        out: dict[str, torch.Tensor] = {}
        for kind in ("image", "video"):
            frames = [item.frames for item in items if item.kind == kind]
            if frames:
                out[f"{kind}_grid_thw"] = torch.cat([self.grid_thw(f) for f in frames])
        seconds = [float(item.info["second_per_grid_t"]) for item in items if item.kind == "video"]
        if seconds:
            out["second_per_grid_ts"] = torch.tensor(seconds)
        return out

    def tensors(self, items: list[MediaItem]) -> dict[str, torch.Tensor]:
        """:meth:`info_tensors` plus the patch rows of the images and of the videos."""
        out = self.info_tensors(items)
        for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
            rows = [self.pixel_values(item.frames) for item in items if item.kind == kind]
            if rows:
                out[key] = rows[0] if len(rows) == 1 else torch.cat(rows)
        return out

    def dummy(self) -> MediaItem:
        """A black image of one merge block: one LLM token."""
        size = self.patch_size * self.merge_size
        return MediaItem("image", np.zeros((1, size, size, 3), dtype=np.uint8))

    def _size(self, height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
        return smart_resize(height, width, self.patch_size * self.merge_size, min_pixels, max_pixels)

    def _resize(self, image: Image.Image, min_pixels: int, max_pixels: int) -> np.ndarray:
        """Bicubic resize on uint8 (as transformers does) to the smart_resize size; (H, W, 3)."""
        height, width = self._size(image.height, image.width, min_pixels, max_pixels)
        if (image.height, image.width) != (height, width):
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        return np.asarray(image, dtype=np.uint8)

    def _patchify(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, C, H, W) frames, T a multiple of the temporal patch -> rows of patches and grid."""
        n_frames, channels, height, width = frames.shape
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        grid_t, grid_h, grid_w = n_frames // tp, height // p, width // p
        # (gt, tp, C, gh/m, m, p, gw/m, m, p)
        patches = frames.reshape(grid_t, tp, channels, grid_h // m, m, p, grid_w // m, m, p)
        # (gt, gh/m, gw/m, m, m, C, tp, p, p): merge blocks row-major, each 2x2 block contiguous
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        rows = np.ascontiguousarray(patches).reshape(grid_t * grid_h * grid_w, channels * tp * p * p)
        return torch.from_numpy(rows), torch.tensor([[grid_t, grid_h, grid_w]], dtype=torch.int64)


def build_media_processor(config=None, **overrides) -> QwenMediaProcessor:
    """The Qwen2.5-VL media processor, with patch sizes from ``config.vision`` when given.

    Args:
        config: A ``Qwen2_5_VLConfig`` (or None for the published patch sizes).
        **overrides: Any ``QwenMediaProcessor`` argument (min_pixels, fps, video_maxlen, ...).
    """
    if config is not None:
        vision = config.vision
        overrides = {
            "patch_size": vision.patch_size,
            "temporal_patch_size": vision.temporal_patch_size,
            "merge_size": vision.spatial_merge_size,
            "token_ids": (
                config.image_token_id,
                config.video_token_id,
                config.vision_start_token_id,
                config.vision_end_token_id,
            ),
            **overrides,
        }
    return QwenMediaProcessor(**overrides)
