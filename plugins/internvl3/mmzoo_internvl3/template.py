"""The ``internvl2_5`` chat template (Qwen's chat format with InternVL's system prompt).

InternVL trains each answer and its ``<|im_end|>`` but not the newline after it. The template
therefore writes that newline at the start of the next turn: answers end at ``<|im_end|>`` and
every other turn opens with ``\\n``. A system turn always comes first (the default system prompt
is InternVL's), so the text is InternVL's own, less the final newline after the last answer.
"""

from __future__ import annotations

from functools import partial

from mmzoo.data.template import ChatTemplate
from mmzoo.data.tokenizer import default_qwen_tokenizer

SYSTEM_PROMPT = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及"
    "多家合作单位联合开发的多模态大语言模型。"
)

TEMPLATE = ChatTemplate(
    name="internvl2_5",
    system_format="<|im_start|>system\n{content}<|im_end|>",
    user_format="\n<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    assistant_format="{content}<|im_end|>",
    default_system=SYSTEM_PROMPT,
    stop_words=("<|im_end|>",),
    media_separator="\n",  # "<image>\n" per image before a prompt that places none
)

# The tokens InternVL adds to Qwen2.5's vocabulary, ids 151665.. in this order.
INTERNVL_TOKENS = (
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)


# Qwen2.5's tokenizer with InternVL's nine added tokens (vocabulary 151,674), no download.
default_tokenizer = partial(default_qwen_tokenizer, INTERNVL_TOKENS)
