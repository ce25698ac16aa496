"""The ``qwen2_vl`` chat template (placeholders are expanded by the media processor)."""

from __future__ import annotations

from mmzoo.data.template import ChatTemplate

TEMPLATE = ChatTemplate(
    name="qwen2_vl",
    system_format="<|im_start|>system\n{content}<|im_end|>\n",
    user_format="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    assistant_format="{content}<|im_end|>\n",
    default_system="You are a helpful assistant.",
    stop_words=("<|im_end|>",),
)
