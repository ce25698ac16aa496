"""InternVL3 media: images to 448-px tiles (dynamic tiling + thumbnail), videos to one tile a frame.

Tiling matches transformers' ``GotOcr2ImageProcessorPil`` (``crop_to_patches``) and InternVL's own
``dynamic_preprocess``: the grid of 1..12 tiles whose aspect ratio is closest to the image's
(on a tie the larger grid, while the image covers more than half of it), a bicubic resize to the
grid, row-major crops, and a thumbnail of the whole image when there is more than one tile.
"""

from __future__ import annotations

import os
from functools import cached_property
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmzoo.data.media import MediaBytes, Video, VideoBackend, load_image, load_video, to_rgb
from mmzoo.errors import MmzooError
from mmzoo.protocols import MediaItem

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def tile_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """Every ``(columns, rows)`` grid of ``min_tiles`` to ``max_tiles`` tiles, fewest tiles first."""
    grids = [
        (cols, rows)
        for cols in range(1, max_tiles + 1)
        for rows in range(1, max_tiles + 1)
        if min_tiles <= cols * rows <= max_tiles
    ]
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def closest_grid(width: int, height: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """The ``(columns, rows)`` grid whose aspect ratio is closest to ``width / height``.

    Grids of equal aspect ratio (1x1, 2x2, 3x3) tie; the larger one wins while the image's area is
    above half the grid's (``tile`` px a side), so small images are not blown up.
    """
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in tile_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def tile_image(
    image: Image.Image, tile: int = 448, min_tiles: int = 1, max_tiles: int = 12, thumbnail: bool = True
) -> np.ndarray:
    """Tiles of an RGB image: uint8 ``(N, tile, tile, 3)``, row-major, then the thumbnail if N > 1."""
    cols, rows = closest_grid(image.width, image.height, tile, min_tiles, max_tiles)
    resized = np.asarray(image.resize((cols * tile, rows * tile), Image.Resampling.BICUBIC))
    # (rows, tile, cols, tile, 3) -> (rows, cols, tile, tile, 3): row-major tiles
    tiles = resized.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4).reshape(-1, tile, tile, 3)
    if thumbnail and len(tiles) > 1:
        whole = np.asarray(image.resize((tile, tile), Image.Resampling.BICUBIC))
        tiles = np.concatenate([tiles, whole[None]])
    return np.ascontiguousarray(tiles)


def normalize(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float32 ``(N, 3, H, W)`` with ImageNet mean/std.

    The arithmetic of transformers' processors (rescale in float64, normalise in float32), so the
    values are bit-identical to theirs.
    """
    pixels = (frames.transpose(0, 3, 1, 2) * np.float64(1 / 255)).astype(np.float32)
    mean = np.array(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.array(IMAGENET_STD, dtype=np.float32)[:, None, None]
    return torch.from_numpy((pixels - mean) / std)


class InternVLMediaProcessor:
    """Images and videos as InternViT tiles, and the token ids each one takes in the text.

    An image is ``<img>`` + ``<IMG_CONTEXT>`` x (tiles x 256) + ``</img>``; a video is one tile a
    frame (no thumbnail), written as transformers' processor and InternVL's chat code write it:
    ``Frame1: <img>...</img>\\nFrame2: <img>...</img>`` (frames joined by a newline).

    Args:
        tile_size: Tile edge in pixels (the ViT's image size).
        patch_size: ViT patch size.
        downsample_ratio: Pixel-shuffle ratio (0.5: 2x2 patches per LLM token).
        min_tiles, max_tiles, thumbnail: Image tiling.
        fps, video_maxlen, video_backend: Video sampling (frames evenly spread over the video,
            first and last included; InternVL's chat code takes segment midpoints instead).
        image_token_id, image_start_token_id, image_end_token_id: ``<IMG_CONTEXT>``, ``<img>``, ``</img>``.
        tokenizer: Gives the ids of the ``FrameN: `` prefixes; the Qwen2.5 tokenizer by default
            (every InternVL3 LLM uses its BPE).
    """

    media_keys = ("pixel_values",)

    def __init__(
        self,
        *,
        tile_size: int = 448,
        patch_size: int = 14,
        downsample_ratio: float = 0.5,
        min_tiles: int = 1,
        max_tiles: int = 12,
        thumbnail: bool = True,
        fps: float = 2.0,
        video_maxlen: int = 8,
        video_backend: VideoBackend = "pyav",
        image_token_id: int = 151667,
        image_start_token_id: int = 151665,
        image_end_token_id: int = 151666,
        tokenizer: Any = None,
    ) -> None:
        if not 1 <= min_tiles <= max_tiles:
            raise MmzooError(f"min_tiles {min_tiles} and max_tiles {max_tiles} must satisfy 1 <= min <= max")
        side = tile_size // patch_size
        merge = round(1 / downsample_ratio)
        if tile_size % patch_size or side % merge:
            raise MmzooError(
                f"tile_size {tile_size} must be a multiple of patch_size {patch_size} x {merge} "
                f"(1 / downsample_ratio {downsample_ratio})"
            )
        self.tile_size, self.tokens_per_tile = tile_size, (side // merge) ** 2
        self.min_tiles, self.max_tiles, self.thumbnail = min_tiles, max_tiles, thumbnail
        self.fps, self.video_maxlen, self.video_backend = fps, video_maxlen, video_backend
        self.image_token_id = image_token_id
        self.start_id, self.end_id = image_start_token_id, image_end_token_id
        self.feature_token_ids = frozenset({image_token_id})
        self._tokenizer = tokenizer

    def prepare_image(self, image: Image.Image | str | os.PathLike | MediaBytes) -> MediaItem:
        """Decode (a path) and tile: frames uint8 ``(N, 448, 448, 3)``."""
        rgb = to_rgb(image) if isinstance(image, Image.Image) else load_image(image)
        tiles = tile_image(rgb, self.tile_size, self.min_tiles, self.max_tiles, self.thumbnail)
        return MediaItem(kind="image", frames=tiles, info={})

    def prepare_video(self, video: Video | str | os.PathLike | MediaBytes) -> MediaItem:
        """Decode and sample (a path), each frame resized to one tile: uint8 ``(T, 448, 448, 3)``."""
        if not isinstance(video, Video):
            video = load_video(video, fps=self.fps, max_frames=self.video_maxlen, backend=self.video_backend)
        size = (self.tile_size, self.tile_size)
        frames = [np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BICUBIC)) for f in video.frames]
        return MediaItem(kind="video", frames=np.stack(frames), info={})

    def num_tokens(self, item: MediaItem) -> int:
        """``<IMG_CONTEXT>`` slots the item fills: 256 per tile or frame."""
        if item.frames.shape[1:] != (self.tile_size, self.tile_size, 3):
            raise MmzooError(
                f"prepared {item.kind} has frames of shape {item.frames.shape[1:]}, not "
                f"({self.tile_size}, {self.tile_size}, 3); prepare it again (or clear the cache)"
            )
        return len(item.frames) * self.tokens_per_tile

    def expand(self, item: MediaItem) -> list[int]:
        """The token ids replacing the item's ``<image>`` / ``<video>`` placeholder."""
        self.num_tokens(item)  # checks the tile size
        if item.kind == "image":
            return self._wrapped(len(item.frames))
        ids: list[int] = []
        for i in range(len(item.frames)):
            ids += self._text_ids(("\n" if i else "") + f"Frame{i + 1}: ") + self._wrapped(1)
        return ids

    def info_tensors(self, items: list[MediaItem]) -> dict[str, torch.Tensor]:
        """Nothing: InternVL3's positions are plain 1-D and need no media information."""
        return {}

    def tensors(self, items: list[MediaItem]) -> dict[str, torch.Tensor]:
        """``pixel_values`` float32 ``(sum N, 3, 448, 448)``: every tile and frame, in item order."""
        if not items:
            raise MmzooError("tensors() needs at least one media item; use dummy() for a step without media")
        return {"pixel_values": torch.cat([normalize(item.frames) for item in items])}

    def dummy(self) -> MediaItem:
        """One black tile: the least vision work for a rank with no media in a step."""
        black = np.zeros((1, self.tile_size, self.tile_size, 3), np.uint8)
        return MediaItem(kind="image", frames=black, info={})

    def _wrapped(self, tiles: int) -> list[int]:
        return [self.start_id, *[self.image_token_id] * (tiles * self.tokens_per_tile), self.end_id]

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    @cached_property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from mmzoo_internvl3.template import default_tokenizer

            self._tokenizer = default_tokenizer()
        return self._tokenizer


def build_media_processor(config=None, **options) -> InternVLMediaProcessor:
    """The InternVL3 media processor, sized from ``config`` when given.

    Args:
        config: An ``InternVL3Config`` (or None for the published tile size and token ids).
        **options: Any ``InternVLMediaProcessor`` argument (max_tiles, fps, tokenizer, ...).
    """
    if config is not None:
        options = {
            "tile_size": config.vision.image_size,
            "patch_size": config.vision.patch_size,
            "downsample_ratio": config.downsample_ratio,
            "min_tiles": config.min_dynamic_patch,
            "max_tiles": config.max_dynamic_patch,
            "thumbnail": config.use_thumbnail,
            "image_token_id": config.image_token_id,
            "image_start_token_id": config.image_start_token_id,
            "image_end_token_id": config.image_end_token_id,
            **options,
        }
    return InternVLMediaProcessor(**options)
