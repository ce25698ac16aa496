"""transformers' keyword call of Qwen2.5-VL on an mmzoo model, for parity tests and users
porting code: ``hf_forward(model, input_ids=..., pixel_values=..., image_grid_thw=...)``."""

from __future__ import annotations

from typing import Any

import torch

from mmzoo.model import VLModel, VLOutput

MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def media_batch(**kwargs: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The mmzoo media batch of transformers' Qwen2.5-VL media arguments (``None`` ones dropped)."""
    unknown = sorted(set(kwargs) - set(MEDIA_KEYS))
    if unknown:
        raise TypeError(f"unknown Qwen2.5-VL media arguments {unknown}; known: {', '.join(MEDIA_KEYS)}")
    return {key: value for key, value in kwargs.items() if value is not None}


def hf_forward(
    model: VLModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
) -> VLOutput:
    """``model`` called as transformers' ``Qwen2_5_VLForConditionalGeneration`` is: media as
    keyword arguments beside ``labels``, ``position_ids``, ``cu_seqlens`` and the other
    :meth:`VLModel.forward` options."""
    media = media_batch(**{key: kwargs.pop(key) for key in MEDIA_KEYS if key in kwargs})
    return model(input_ids, attention_mask, media=media, **kwargs)
