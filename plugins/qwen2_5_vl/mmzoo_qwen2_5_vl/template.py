"""The ``qwen2_vl`` chat template and the expansion of its image/video placeholders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmzoo.data.template import ChatTemplate, ExpandMedia

TEMPLATE = ChatTemplate(
    name="qwen2_vl",
    system_format="<|im_start|>system\n{content}<|im_end|>\n",
    user_format="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    assistant_format="{content}<|im_end|>\n",
    default_system="You are a helpful assistant.",
    stop_words=("<|im_end|>",),
)

_PAD = {"image": "<|image_pad|>", "video": "<|video_pad|>"}


def media_expander(
    tokenizer: Any,
    image_grid_thw: Sequence[Sequence[int]] = (),
    video_grid_thw: Sequence[Sequence[int]] = (),
    merge_size: int = 2,
) -> ExpandMedia:
    """The ``expand_media`` callback for :meth:`ChatTemplate.encode` given the media grids.

    The ``index``-th image becomes ``<|vision_start|>`` + ``<|image_pad|>`` x (t*h*w /
    merge_size**2) + ``<|vision_end|>`` (one pad per merged patch); videos alike with
    ``<|video_pad|>``. An index past the grids raises ``IndexError``, which ``encode`` reports.

    Args:
        tokenizer: the tokenizer the ids come from.
        image_grid_thw: ``(t, h, w)`` patch grid of each image, in placeholder order.
        video_grid_thw: ``(t, h, w)`` patch grid of each video, in placeholder order.
        merge_size: PatchMerger's spatial merge size (``spatial_merge_size``).
    """
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in ("<|vision_start|>", "<|vision_end|>")}
    pads = {kind: tokenizer.convert_tokens_to_ids(token) for kind, token in _PAD.items()}
    grids = {"image": list(image_grid_thw), "video": list(video_grid_thw)}

    def expand(kind: str, index: int) -> list[int]:
        t, h, w = grids[kind][index]
        count = t * h * w // merge_size**2
        return [ids["<|vision_start|>"], *[pads[kind]] * count, ids["<|vision_end|>"]]

    return expand
