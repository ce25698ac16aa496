"""The typed parts a model family provides, and the check run when a plugin registers one.

The core reads a family only through these: its media processor, chat template, position-id
function and config. :func:`missing_members` names what a part lacks, so a plugin that forgets a
method fails at registration with the plugin and the attribute named, not deep inside training.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch


@dataclass
class MediaItem:
    """One image or video as its family prepared it: resized uint8 frames, what caches keep.

    Attributes:
        kind: ``"image"`` or ``"video"``.
        frames: uint8 ``(N, H, W, 3)``: an image's resized frame, a video's sampled frames, or tiles.
        info: JSON-able extras the family needs later (e.g. a video's seconds per grid step).
    """

    kind: str
    frames: np.ndarray
    info: dict[str, float | int] = field(default_factory=dict)


class MediaProcessor(Protocol):
    """Images and videos -> what the family's vision encoder takes.

    Built by ``spec.media_processor(config, **options)``.

    Preparing (decode, resize, tile) gives :class:`MediaItem` s of uint8 frames, small enough to
    cache; :meth:`tensors` turns a sample's items into its media batch when a batch is built.
    """

    media_keys: tuple[str, ...]  # tensors a media batch may hold; batches concatenate each along dim 0
    feature_token_ids: frozenset[int]  # placeholder ids that receive vision features

    def prepare_image(self, path: Any) -> MediaItem: ...

    def prepare_video(self, path: Any) -> MediaItem: ...

    def num_tokens(self, item: MediaItem) -> int:
        """Feature tokens (placeholders) the item fills in the LLM input."""
        ...

    def expand(self, item: MediaItem) -> list[int]:
        """Token ids that replace the item's ``<image>``/``<video>`` placeholder."""
        ...

    def info_tensors(self, items: Sequence[MediaItem]) -> dict[str, torch.Tensor]:
        """The media batch without pixels: what position ids need, cheap to compute."""
        ...

    def tensors(self, items: Sequence[MediaItem]) -> dict[str, torch.Tensor]:
        """The full media batch of ``items`` (pixels and :meth:`info_tensors`)."""
        ...

    def dummy(self) -> MediaItem:
        """The smallest image, fed loss-free to a rank whose batch holds no media."""
        ...


class Template(Protocol):
    """A chat format (:class:`mmzoo.data.template.ChatTemplate` is the usual one)."""

    name: str
    image_placeholder: str
    video_placeholder: str

    def encode(
        self, messages: Sequence[Mapping[str, Any]], tokenizer: Any, expand_media: Any, **options: Any
    ) -> Any:
        """``(input_ids, labels, media_end)``: see :meth:`mmzoo.data.template.ChatTemplate.encode`."""
        ...

    def render(self, messages: Sequence[Mapping[str, Any]]) -> str: ...

    def stop_token_ids(self, tokenizer: Any) -> list[int]: ...

    def place_media(self, text: str, num_images: int, num_videos: int) -> str:
        """``text`` with placeholders for media a prompt gave without any."""
        ...


class PositionIds(Protocol):
    """``(config, input_ids (B, S), attention_mask=None, media=None) -> (rows, B, S)`` position ids."""

    def __call__(
        self,
        config: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        media: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor: ...


class FamilyConfig(Protocol):
    """A family's config: a frozen dataclass (checkpoints store it as JSON and compare variants by
    equality); the core reads no other attribute."""

    __dataclass_fields__: ClassVar[dict[str, Any]]


def _members(protocol: type) -> list[str]:
    methods = [n for n, v in vars(protocol).items() if not n.startswith("_") and callable(v)]
    return sorted({*methods, *(n for n in protocol.__annotations__ if not n.startswith("_"))})


def missing_members(obj: Any, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks; for :class:`PositionIds`, its parameters."""
    if protocol is FamilyConfig:
        return (
            [] if hasattr(obj, "__dataclass_fields__") else ["__dataclass_fields__ (it must be a dataclass)"]
        )
    if protocol is not PositionIds:
        return [name for name in _members(protocol) if not hasattr(obj, name)]
    if not callable(obj):
        return ["__call__"]
    try:
        parameters = inspect.signature(obj).parameters
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return []
    return [f"parameter {n}" for n in ("attention_mask", "media") if n not in parameters]
