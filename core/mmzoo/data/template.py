"""Chat templates: messages -> token ids and labels, with media placeholders expanded.

A :class:`ChatTemplate` is generic; model plugins instantiate it (e.g. ``qwen2_vl``). Each turn is
rendered to text with its format string, the text is split at the tokenizer's added (special)
tokens and at media placeholders, and each text run between them is tokenised whole. Tokenizers
split added tokens out before pre-tokenising, so the ids equal ``tokenizer(rendered_text)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from mmzoo.errors import MmzooError
from mmzoo.loss import IGNORE_INDEX

ExpandMedia = Callable[[str, int], list[int]]
_ROLES = ("system", "user", "assistant")


class Encoded(NamedTuple):
    """One conversation as token ids and labels; ``media_end`` is the index just past the last
    media expansion (0 without media): truncation must not cut before it."""

    input_ids: list[int]
    labels: list[int]
    media_end: int


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format. ``{content}`` in a format string is replaced by the message text.

    Attributes:
        name: registry name, e.g. ``"qwen2_vl"``.
        system_format: renders the system turn.
        user_format: renders a user turn, including the header that opens the assistant's reply
            (so a conversation ending in a user turn is a generation prompt).
        assistant_format: renders an answer including the string that ends the turn; all of it
            is trained.
        default_system: system prompt used when the messages have none (``""``: no system turn;
            an explicit system message is always rendered, even an empty one).
        stop_words: strings that end a turn (generation stops at their token ids).
        image_placeholder: the text in a message that stands for the next image.
        video_placeholder: the text in a message that stands for the next video.
        media_separator: what follows each placeholder that :meth:`place_media` puts before a
            prompt given without placeholders (``""``: media straight before the text).
    """

    name: str
    system_format: str
    user_format: str
    assistant_format: str
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    image_placeholder: str = "<image>"
    video_placeholder: str = "<video>"
    media_separator: str = ""

    def place_media(self, text: str, num_images: int, num_videos: int) -> str:
        """``text`` led by a placeholder per image, then per video, each followed by
        :attr:`media_separator` (for prompts that give media without placing them)."""
        sep = self.media_separator
        return (
            (self.image_placeholder + sep) * num_images + (self.video_placeholder + sep) * num_videos + text
        )

    def render(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The conversation as text, media placeholders left in place."""
        return "".join(text for text, _ in self._turns(messages))

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Token ids of :attr:`stop_words` (each must be a single token)."""
        return [tokenizer.convert_tokens_to_ids(word) for word in self.stop_words]

    def encode(
        self,
        messages: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        expand_media: ExpandMedia,
        train_on_prompt: bool = False,
        mask_history: bool = False,
        *,
        num_images: int | None = None,
        num_videos: int | None = None,
    ) -> Encoded:
        """Token ids and labels for one conversation.

        Args:
            messages: ``{"role": "system"|"user"|"assistant", "content": str}`` dicts; an optional
                system message first, then user and assistant alternating, starting with user.
            tokenizer: a ``transformers`` tokenizer.
            expand_media: ``(kind, index) -> ids`` replacing the ``index``-th ``"image"`` or
                ``"video"`` placeholder (counted from 0 over the whole conversation).
            train_on_prompt: train on every token except media tokens.
            mask_history: train only the last assistant answer.
            num_images: when given, the number of ``<image>`` placeholders must equal it.
            num_videos: when given, the number of ``<video>`` placeholders must equal it.

        Returns:
            ``(input_ids, labels, media_end)``: labels equal the ids on trained tokens (answers
            with their turn-end string) and ``-100`` elsewhere; media tokens are never trained.

        Raises:
            MmzooError: malformed messages, or placeholder counts that do not match the media.
        """
        if train_on_prompt and mask_history:
            raise MmzooError("train_on_prompt and mask_history cannot both be set; choose one")
        turns = self._turns(messages)
        if mask_history:
            last = max((i for i, (_, answer) in enumerate(turns) if answer), default=-1)
            turns = [(text, answer and i == last) for i, (text, answer) in enumerate(turns)]
        if train_on_prompt:
            turns = [(text, True) for text, _ in turns]
        encoder = _Encoder(self, tokenizer, expand_media)
        for text, trained in turns:
            encoder.add(text, trained)
        ids, labels = encoder.finish()
        for kind, expected in (("image", num_images), ("video", num_videos)):
            if expected is not None and encoder.seen[kind] != expected:
                placeholder = self.image_placeholder if kind == "image" else self.video_placeholder
                raise MmzooError(
                    f"the messages have {encoder.seen[kind]} {placeholder} placeholder(s) but the sample "
                    f"has {expected} {kind}(s); put one {placeholder} in the text per {kind}"
                )
        return Encoded(ids, labels, encoder.media_end)

    def _turns(self, messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, bool]]:
        """Rendered turns as ``(text, is_answer)``, after checking roles and their order."""
        if not messages:
            raise MmzooError("a conversation needs at least one message")
        out: list[tuple[str, bool]] = []
        rest = list(messages)
        # An explicit system message is rendered even when empty; the default only when set.
        system = _content(rest.pop(0), 0) if _role(rest[0], 0) == "system" else self.default_system or None
        if system is not None:
            out.append((_fill(self.system_format, system), False))
        offset = len(messages) - len(rest)
        for i, message in enumerate(rest):
            role = _role(message, offset + i)
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise MmzooError(
                    f"message {offset + i} has role '{role}' where '{expected}' was expected; "
                    "use an optional system message first, then user and assistant alternating"
                )
            fmt = self.user_format if role == "user" else self.assistant_format
            out.append((_fill(fmt, _content(message, offset + i)), role == "assistant"))
        return out


class _Encoder:
    """Token ids and labels of rendered turns, built piece by piece.

    Text is split at the tokenizer's added tokens and at media placeholders; the text runs between
    them are tokenised whole (:func:`_encode_run`), placeholders become ``expand_media``'s ids.
    """

    def __init__(self, template: ChatTemplate, tokenizer: Any, expand_media: ExpandMedia) -> None:
        self.tokenizer, self.expand_media = tokenizer, expand_media
        self.added = tokenizer.get_added_vocab()
        self.placeholders = {template.image_placeholder: "image", template.video_placeholder: "video"}
        # Longest first so a token that is a prefix of another never wins.
        alternatives = sorted([*self.added, *self.placeholders], key=len, reverse=True)
        self.splitter = re.compile("(" + "|".join(re.escape(a) for a in alternatives) + ")")
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.run: list[tuple[str, bool]] = []  # consecutive text pieces, tokenised together
        self.seen = {"image": 0, "video": 0}
        self.media_end = 0

    def add(self, text: str, trained: bool) -> None:
        """Append one rendered turn; ``trained`` marks its tokens as targets (media never are)."""
        for piece in self.splitter.split(text):
            if piece in self.placeholders:
                self._flush()
                kind = self.placeholders[piece]
                media_ids = self._expand(kind, self.seen[kind])
                self.seen[kind] += 1
                self._append(media_ids, False)
                self.media_end = len(self.ids)
            elif piece in self.added:
                self._flush()
                self._append([self.added[piece]], trained)
            elif piece:
                self.run.append((piece, trained))

    def finish(self) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of everything added."""
        self._flush()
        return self.ids, self.labels

    def _append(self, ids: list[int], trained: bool) -> None:
        self.ids.extend(ids)
        self.labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))

    def _flush(self) -> None:
        for token, trained in _encode_run(self.run, self.tokenizer):
            self._append([token], trained)
        self.run.clear()

    def _expand(self, kind: str, index: int) -> list[int]:
        try:
            return list(self.expand_media(kind, index))
        except (IndexError, KeyError) as exc:
            raise MmzooError(
                f"the messages have more {kind} placeholders than the sample has {kind}s "
                f"(no {kind} {index}); put one placeholder in the text per {kind}"
            ) from exc


def _role(message: Mapping[str, Any], index: int) -> str:
    role = message.get("role") if isinstance(message, Mapping) else None
    if role not in _ROLES:
        raise MmzooError(f"message {index} has role {role!r}; roles are {', '.join(_ROLES)}")
    return role


def _content(message: Mapping[str, Any], index: int) -> str:
    content = message.get("content")
    if not isinstance(content, str):
        raise MmzooError(f"message {index} content must be a string, got {type(content).__name__}")
    return content


def _fill(fmt: str, content: str) -> str:
    # str.replace, not str.format: message text may contain braces.
    return fmt.replace("{content}", content)


def _encode_run(parts: list[tuple[str, bool]], tokenizer: Any) -> list[tuple[int, bool]]:
    """Tokenise text pieces as one string and give each token its piece's ``trained`` flag.

    Tokenising the pieces separately could split differently (``"\\n" + "\\n"`` is not
    ``"\\n\\n"``), so the run is tokenised whole and a piece's first token is found as the end of
    the common prefix of ``encode(text before the piece)`` and ``encode(run)``. A token spanning a
    boundary goes to the later piece (an answer keeps the characters it starts with).
    """
    merged: list[tuple[str, bool]] = []
    for piece, trained in parts:  # only flag changes need a boundary search
        if merged and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + piece, trained)
        else:
            merged.append((piece, trained))
    if not merged:
        return []
    text = "".join(piece for piece, _ in merged)
    ids = tokenizer.encode(text, add_special_tokens=False)
    flags = [merged[0][1]] * len(ids)
    position = len(merged[0][0])
    for piece, trained in merged[1:]:
        prefix = tokenizer.encode(text[:position], add_special_tokens=False)
        common = (j for j, (a, b) in enumerate(zip(prefix, ids, strict=False)) if a != b)
        start = next(common, min(len(prefix), len(ids)))
        flags[start:] = [trained] * (len(ids) - start)
        position += len(piece)
    return list(zip(ids, flags, strict=True))
