"""The internvl2_5 chat template: ids against transformers' InternVL chat template and processor
expansion, labels against InternVL's training rule (answer + <|im_end|>, never the newline)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import InternVLProcessor

from mmzoo.data.media import Video
from mmzoo.loss import IGNORE_INDEX
from mmzoo_internvl3.media import InternVLMediaProcessor
from mmzoo_internvl3.template import SYSTEM_PROMPT, TEMPLATE, default_tokenizer

# OpenGVLab/InternVL3-*-hf chat_template.jinja (after the processor update): no default system
# prompt, <IMG_CONTEXT>\n per image and <video>\n per video before the text.
HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
# What InternVLProcessor's expansion methods read from the processor.
HF_PROCESSOR = SimpleNamespace(
    start_image_token="<img>", end_image_token="</img>", image_token="<IMG_CONTEXT>", image_seq_length=256
)
IM_END, NL = 151645, 198


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def media(tok):
    processor = InternVLMediaProcessor(tokenizer=tok)
    rng = np.random.default_rng(0)
    image = processor.dummy()
    image.frames = np.repeat(image.frames, 7, axis=0)  # a 3x2 grid + thumbnail
    video = processor.prepare_video(Video(rng.integers(0, 256, (3, 32, 48, 3), np.uint8), 1.0, 30.0, 3.0))
    return processor, {"image": [image, processor.dummy()], "video": [video]}


def hf_ids(tok, messages, generation=False, tiles=(7, 1), frames=(3,)):
    """Token ids as transformers renders the conversation and InternVLProcessor expands its media."""
    text = tok.apply_chat_template(
        messages, chat_template=HF_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=generation
    )
    images = {"num_patches": list(tiles)}
    videos = {"pixel_values_videos": [torch.zeros(n, 3, 1, 1) for n in frames]}
    image, video = iter(range(len(tiles))), iter(range(len(frames)))
    # re.sub never looks inside what it inserted, so the expansions' own <IMG_CONTEXT> are safe.
    text = re.sub(
        "<IMG_CONTEXT>\n",
        lambda _: InternVLProcessor.replace_image_token(HF_PROCESSOR, images, next(image)) + "\n",
        text,
    )
    text = re.sub(
        "<video>", lambda _: InternVLProcessor.replace_video_token(HF_PROCESSOR, videos, next(video)), text
    )
    return tok(text)["input_ids"]


def ours(tok, media, messages):
    processor, items = media
    return TEMPLATE.encode(messages, tok, lambda kind, i: processor.expand(items[kind][i]))


def hf_message(role, text, images=0, videos=0):
    parts = [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "text", "text": text}]
    return {"role": role, "content": parts}


def mm_message(role, text, images=0, videos=0):
    return {"role": role, "content": TEMPLATE.place_media(text, images, videos)}


CONVERSATION = [  # (role, text, images, videos)
    ("system", "You are terse.", 0, 0),
    ("user", "What is in the first picture?", 1, 0),
    ("assistant", "A cat on a mat.", 0, 0),
    ("user", "And these?", 1, 1),
    ("assistant", "A black tile and a clip.\nDone.", 0, 0),
]


def test_conversation_equals_transformers_less_the_last_newline(tok, media):
    ids, _, media_end = ours(tok, media, [mm_message(*turn) for turn in CONVERSATION])
    reference = hf_ids(tok, [hf_message(*turn) for turn in CONVERSATION])
    assert reference[-1] == NL and ids == reference[:-1]
    assert ids[media_end - 1] == 151666 and 151666 not in ids[media_end:]  # past the video's last </img>
    assert ids.count(151667) == (7 + 1 + 3) * 256


def test_generation_prompt_equals_transformers(tok, media):
    prompt = CONVERSATION[:4]
    ids, _, _ = ours(tok, media, [mm_message(*turn) for turn in prompt])
    assert ids == hf_ids(tok, [hf_message(*turn) for turn in prompt], generation=True)


def test_default_system_prompt(tok, media):
    ids, _, _ = ours(tok, media, [mm_message("user", "Hi"), mm_message("assistant", "Hello.")])
    explicit = [
        hf_message("system", SYSTEM_PROMPT),
        hf_message("user", "Hi"),
        hf_message("assistant", "Hello."),
    ]
    assert ids == hf_ids(tok, explicit, tiles=(), frames=())[:-1]
    assert tok.decode(ids[:3]) == "<|im_start|>system\n" and "书生·万象" in tok.decode(ids)


TURN_MEDIA = [((), ()), ((7,), ()), ((), ()), ((1,), (3,)), ((), ())]  # tiles, frames per turn


def internvl_reference(tok):
    """InternVL's training preprocessing (``preprocess_internvl2_5``): each turn tokenised alone;
    an answer turn is trained except its '<|im_start|>assistant\\n' head and its final newline."""
    head = len(tok("<|im_start|>assistant\n")["input_ids"])
    ids, labels = [], []
    for (role, text, images, videos), (tiles, frames) in zip(CONVERSATION, TURN_MEDIA, strict=True):
        turn = hf_ids(tok, [hf_message(role, text, images, videos)], tiles=tiles, frames=frames)
        ids += turn
        answer = [IGNORE_INDEX] * head + turn[head:-1] + [IGNORE_INDEX]
        labels += answer if role == "assistant" else [IGNORE_INDEX] * len(turn)
    return ids, labels


def test_labels_equal_internvl_training(tok, media):
    ids, labels, _ = ours(tok, media, [mm_message(*turn) for turn in CONVERSATION])
    ref_ids, ref_labels = internvl_reference(tok)
    assert ids == ref_ids[:-1] and labels == ref_labels[:-1]


def test_labels_train_answers_and_im_end_only(tok, media):
    messages = [mm_message(*turn) for turn in CONVERSATION]
    ids, labels, _ = ours(tok, media, messages)
    trained = [(i, t) for i, (t, label) in enumerate(zip(ids, labels, strict=True)) if label != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i, _ in trained)
    spans = tok.decode([t for _, t in trained])
    assert spans == "A cat on a mat.<|im_end|>A black tile and a clip.\nDone.<|im_end|>"
    # Each trained span ends at <|im_end|>; the newline after it and every prompt token are masked.
    ends = [i for i, t in trained if t == IM_END]
    assert len(ends) == 2 and all(labels[i + 1] == IGNORE_INDEX for i in ends if i + 1 < len(ids))


def test_place_media():
    assert TEMPLATE.place_media("Hi", 2, 1) == "<image>\n<image>\n<video>\nHi"
    assert TEMPLATE.place_media("Hi", 0, 0) == "Hi"


def test_tokenizer_ids(tok):
    assert len(tok) == 151674
    ids = tok.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>", "<box>", "</box>"])
    assert ids == [151665, 151666, 151667, 151672, 151673]
