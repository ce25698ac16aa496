"""The qwen2_vl chat template on the real Qwen2.5 tokenizer: exact ids and label masks."""

from __future__ import annotations

import numpy as np
import pytest

from mmzoo.data.tokenizer import default_qwen_tokenizer
from mmzoo.errors import MmzooError
from mmzoo.protocols import MediaItem
from mmzoo_qwen2_5_vl.media import build_media_processor
from mmzoo_qwen2_5_vl.template import TEMPLATE

IM_START, IM_END, NL = 151644, 151645, 198
V_START, V_END, IMAGE, VIDEO = 151652, 151653, 151655, 151656
SYSTEM = [IM_START, 8948, NL, 2610, 525, 264, 10950, 17847, 13, IM_END, NL]  # published ids
USER = [IM_START, 872, NL]  # <|im_start|>user\n
ASSISTANT = [IM_START, 77091, NL]  # <|im_start|>assistant\n
END = [IM_END, NL]
X = -100


@pytest.fixture(scope="module")
def tok():
    return default_qwen_tokenizer()


def no_media(kind, index):
    raise AssertionError(f"text-only sample asked for {kind} {index}")


def media_expander(tok, image_grid_thw=(), video_grid_thw=()):
    """``expand(kind, index)`` as the data pipeline builds it: the media processor's expansion of
    an item with each given patch grid (``tok`` is the tokenizer whose ids the processor uses)."""
    processor = build_media_processor()
    grids = {"image": list(image_grid_thw), "video": list(video_grid_thw)}

    def expand(kind, index):
        t, h, w = grids[kind][index]
        frames = np.zeros((2 * t if kind == "video" else 1, 14 * h, 14 * w, 3), dtype=np.uint8)
        return processor.expand(MediaItem(kind, frames))

    return expand


def rendered(messages, tok, expand):
    """The conversation as one string with media placeholders replaced by their special tokens."""
    text = TEMPLATE.render(messages)
    for kind, placeholder in (("image", "<image>"), ("video", "<video>")):
        index = 0
        while placeholder in text:
            text = text.replace(placeholder, tok.decode(expand(kind, index)), 1)
            index += 1
    return text


MULTI_TURN = [
    {"role": "user", "content": "<image>What is this?"},
    {"role": "assistant", "content": "A dog runs."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yes."},
]


def test_multi_turn_with_image(tok):
    expand = media_expander(tok, image_grid_thw=[(1, 4, 4)])
    ids, labels, _ = TEMPLATE.encode(MULTI_TURN, tok, expand, num_images=1)
    image = [V_START, *[IMAGE] * 4, V_END]  # 1*4*4 patches / 2x2 merge
    question, answer1, answer2 = [3838, 374, 419, 30], [32, 5562, 8473, 13], [9454, 13]
    prompt1 = SYSTEM + USER + image + question + END + ASSISTANT
    prompt2 = USER + [13048] + END + ASSISTANT
    assert ids == prompt1 + answer1 + END + prompt2 + answer2 + END
    assert labels == [X] * len(prompt1) + answer1 + END + [X] * len(prompt2) + answer2 + END
    assert ids == tok(rendered(MULTI_TURN, tok, expand))["input_ids"]


def test_system_turn_replaces_default(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Describe the video.<video>"},
        {"role": "assistant", "content": "The sky is blue."},
    ]
    expand = media_expander(tok, video_grid_thw=[(2, 4, 4)])
    ids, labels, _ = TEMPLATE.encode(messages, tok, expand, num_videos=1)
    prompt = [IM_START, 8948, NL, 3430, 9814, 13, IM_END, NL] + USER + [74785, 279, 2766, 13]
    prompt += [V_START, *[VIDEO] * 8, V_END] + END + ASSISTANT
    answer = [785, 12884, 374, 6303, 13] + END
    assert ids == prompt + answer
    assert labels == [X] * len(prompt) + answer


def test_empty_system_message_is_rendered(tok):
    ids, _, _ = TEMPLATE.encode(
        [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}], tok, no_media
    )
    assert ids == [IM_START, 8948, NL, IM_END, NL] + USER + [13048] + END + ASSISTANT


def test_text_only_and_generation_prompt(tok):
    ids, labels, _ = TEMPLATE.encode([{"role": "user", "content": "Hi"}], tok, no_media)
    assert ids == SYSTEM + USER + [13048] + END + ASSISTANT
    assert labels == [X] * len(ids)


def test_train_on_prompt_keeps_media_masked(tok):
    expand = media_expander(tok, image_grid_thw=[(1, 4, 4)])
    ids, labels, _ = TEMPLATE.encode(MULTI_TURN, tok, expand, train_on_prompt=True)
    media = [i for i, t in enumerate(ids) if t in (V_START, V_END, IMAGE)]
    assert len(media) == 6
    assert all(labels[i] == X for i in media)
    assert all(labels[i] == t for i, t in enumerate(ids) if i not in media)


def test_mask_history_trains_last_answer_only(tok):
    expand = media_expander(tok, image_grid_thw=[(1, 4, 4)])
    ids, labels, _ = TEMPLATE.encode(MULTI_TURN, tok, expand, mask_history=True)
    assert ids == TEMPLATE.encode(MULTI_TURN, tok, expand)[0]
    assert labels == [X] * (len(ids) - 4) + [9454, 13, IM_END, NL]


@pytest.mark.parametrize(
    "answer",
    [
        "\n\nLeading newlines",
        "  two leading spaces",
        "braces {content} {0}",
        "中文 答案 🐱 2024",
        "trailing \n",
    ],
)
def test_ids_equal_full_string_tokenisation(tok, answer):
    messages = [
        {"role": "user", "content": "<image>\n\n<image>  compare 图片 {x}"},
        {"role": "assistant", "content": answer},
    ]
    expand = media_expander(tok, image_grid_thw=[(1, 2, 2), (2, 2, 4)])
    ids, labels, _ = TEMPLATE.encode(messages, tok, expand, num_images=2)
    assert ids == tok(rendered(messages, tok, expand))["input_ids"]
    trained = [t for t in labels if t != X]
    assert trained == ids[len(ids) - len(trained) :], "trained tokens must be one tail span"
    # Tokens spanning the prompt/answer boundary go to the answer, so compare the text's tail.
    assert tok.decode(trained).endswith(answer + "<|im_end|>\n")
    assert len(tok.decode(trained)) <= len(answer + "<|im_end|>\n") + 1


def test_stop_token_ids(tok):
    assert TEMPLATE.name == "qwen2_vl"
    assert TEMPLATE.stop_token_ids(tok) == [IM_END]


def test_media_expander_sizes(tok):
    expand = media_expander(tok, image_grid_thw=[(1, 6, 8)], video_grid_thw=[(4, 2, 2)])
    assert expand("image", 0) == [V_START, *[IMAGE] * 12, V_END]
    assert expand("video", 0) == [V_START, *[VIDEO] * 4, V_END]


@pytest.mark.parametrize(
    ("messages", "kwargs", "match"),
    [
        ([{"role": "robot", "content": "hi"}], {}, "role 'robot'; roles are system, user, assistant"),
        ([{"content": "hi"}], {}, "role None"),
        ([{"role": "assistant", "content": "hi"}], {}, "message 0 has role 'assistant' where 'user'"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            {},
            "message 1 has role 'user'",
        ),
        ([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}], {}, "where 'assistant'"),
        ([{"role": "user", "content": ["hi"]}], {}, "content must be a string"),
        ([], {}, "at least one message"),
        ([{"role": "user", "content": "<image><image>"}], {}, "more image placeholders"),
        (
            [{"role": "user", "content": "<image>"}],
            {"num_images": 2},
            r"1 <image> placeholder\(s\) but .* 2 image",
        ),
        ([{"role": "user", "content": "no media"}], {"num_videos": 1}, r"0 <video> placeholder"),
        ([{"role": "user", "content": "x"}], {"train_on_prompt": True, "mask_history": True}, "cannot both"),
    ],
)
def test_errors(tok, messages, kwargs, match):
    expand = media_expander(tok, image_grid_thw=[(1, 2, 2)])
    with pytest.raises(MmzooError, match=match):
        TEMPLATE.encode(messages, tok, expand, **kwargs)
