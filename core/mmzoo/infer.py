"""Generation with a KV cache, and chat requests (prompt + images/videos) -> answers.

Family-agnostic: prompts are prepared by the data pipeline (:class:`mmzoo.data.pipeline.Preprocessor`,
through the family's template, media processor, placeholder expansion and position ids) and the
default tokenizer comes from the model's :class:`mmzoo.ModelSpec`. Prompts are prefilled as one
packed sequence (the training forward); each decode step feeds one token per row at position
``tokens so far + rope delta`` on every position row, where the delta is
``max(prompt positions) + 1 - prompt length`` (zero for text-only 1-D positions).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mmzoo.config import DataConfig
from mmzoo.data.collate import Sample, batch_to, collate_left_padded
from mmzoo.data.pipeline import Preprocessor
from mmzoo.data.records import Record
from mmzoo.errors import MmzooError
from mmzoo.model import VLModel, real_tokens
from mmzoo.registry import ModelSpec, get_model

OnStep = Callable[[list[int | None], torch.Tensor], None]


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings. ``temperature == 0`` is greedy; ``top_p``/``top_k`` apply when sampling.

    Attributes:
        max_new_tokens: most tokens generated per prompt.
        temperature: softmax temperature; 0 picks the most likely token.
        top_p: nucleus sampling mass (1.0: off).
        top_k: keep the k most likely tokens (0: off).
        repetition_penalty: CTRL-style penalty on tokens already in the sequence (1.0: off).
        seed: seed of the sampling generator (``None``: torch's global RNG).
        stop_token_ids: a row ends after generating one of these (it is kept in the output).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        checks = (
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("temperature", self.temperature >= 0, "0 (greedy) or positive"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= 0, "0 (off) or positive"),
            ("repetition_penalty", self.repetition_penalty > 0, "positive"),
        )
        for name, ok, want in checks:
            if not ok:
                raise MmzooError(f"{name}={getattr(self, name)} must be {want}")


def _process_logits(
    logits: torch.Tensor, seen: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row from logits ``(B, V)``; ``seen`` ``(B, V)`` marks tokens in each sequence."""
    logits = logits.float()
    if sampling.repetition_penalty != 1.0:
        p = sampling.repetition_penalty
        logits = torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > sampling.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model: VLModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    media: Mapping[str, torch.Tensor] | None = None,
    position_ids: torch.Tensor | None = None,
    sampling: SamplingConfig | None = None,
    on_step: OnStep | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per row of a padded batch (any padding side).

    Args:
        model: the model (put it in eval mode).
        input_ids: ``(B, S)`` prompts with media placeholders expanded.
        attention_mask: ``(B, S)``, 0 on padding.
        media: the family's media batch, as for :meth:`VLModel.forward`.
        position_ids: ``(rows, B, S)``, 0 on padding (default: the family's, computed here).
        sampling: decoding settings (default: greedy, 256 tokens, no stop tokens).
        on_step: called after each step with the new token of every row (``None`` once a row
            ended) and the logits ``(B, V)`` they were chosen from.

    Returns:
        The generated token ids of each row (a stop token that ended a row included).
    """
    sampling = sampling or SamplingConfig()
    keep, cu_seqlens = real_tokens(input_ids, attention_mask)
    lengths = keep.sum(dim=1)
    if int(lengths.min()) == 0:
        raise MmzooError("generate: a prompt in the batch is empty")
    if position_ids is None:
        position_ids = model.compute_position_ids(model.config, input_ids, attention_mask=keep, media=media)
    positions = position_ids.to(input_ids.device)  # (rows, B, S); padding is 0, real positions >= 0
    deltas = positions.amax(dim=(0, 2)) + 1 - lengths  # (B,)

    decoder = model.text_decoder
    cache = decoder.new_cache(len(input_ids), int(lengths.max()) + sampling.max_new_tokens)
    embeds = model.embed_inputs(input_ids, media)
    hidden = decoder(embeds[keep], positions[:, keep], cu_seqlens, cache=cache)  # (T, H)
    logits = decoder.logits(hidden[cu_seqlens[1:].long() - 1])  # (B, V)
    rows = _Rows(sampling, input_ids, keep, logits)
    step_cu = torch.arange(len(input_ids) + 1, dtype=torch.int32, device=input_ids.device)
    for step in range(sampling.max_new_tokens):
        tokens, new = rows.step(logits)
        if on_step is not None:
            on_step(new, logits)
        if rows.finished or step == sampling.max_new_tokens - 1:
            break
        pos = (cache.lengths + deltas).expand(positions.shape[0], -1)  # (rows, B)
        logits = decoder.logits(decoder(decoder.embed(tokens), pos, step_cu, cache=cache))
    return rows.out


class _Rows:
    """Decoding state of a batch: each row's output, whether it ended, the tokens it holds."""

    def __init__(
        self, sampling: SamplingConfig, input_ids: torch.Tensor, keep: torch.Tensor, logits: torch.Tensor
    ) -> None:
        batch, vocab, device = logits.shape[0], logits.shape[-1], logits.device
        self.sampling = sampling
        self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        if sampling.repetition_penalty != 1.0:  # the prompt counts as seen
            rows = torch.arange(batch, device=input_ids.device)[:, None].expand_as(input_ids)
            self.seen[rows[keep], input_ids[keep].clamp(max=vocab - 1)] = True
        self.generator = None
        if sampling.seed is not None and sampling.temperature > 0:
            self.generator = torch.Generator(device=device).manual_seed(sampling.seed)
        self.stops = torch.tensor(sorted(set(sampling.stop_token_ids)), dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.out: list[list[int]] = [[] for _ in range(batch)]

    @property
    def finished(self) -> bool:
        return bool(self.done.all())

    def step(self, logits: torch.Tensor) -> tuple[torch.Tensor, list[int | None]]:
        """Each row's next token, and per row the token it keeps (``None`` once the row ended)."""
        tokens = _process_logits(logits, self.seen, self.sampling, self.generator)
        new: list[int | None] = []
        for row, token in enumerate(tokens.tolist()):
            new.append(None if self.done[row] else token)
            if not self.done[row]:
                self.out[row].append(token)
        self.seen[torch.arange(len(new)), tokens] = True
        self.done |= torch.isin(tokens, self.stops)
        return tokens, new


@dataclass
class Request:
    """One chat turn: a prompt with its media.

    ``<image>``/``<video>`` in the prompt place the media; without them, the family's template
    places them (:meth:`mmzoo.protocols.Template.place_media`).
    """

    prompt: str
    images: Sequence[Any] = field(default_factory=list)  # paths or PIL images
    videos: Sequence[Any] = field(default_factory=list)  # paths
    system: str | None = None


class Chat:
    """Answers :class:`Request` s with a model, its tokenizer and its family's template and media.

    Prompts become samples the way training records do (:class:`mmzoo.data.pipeline.Preprocessor`:
    the same template, media sizing, vision tokens and position ids), ending in the template's
    generation prompt.

    Args:
        model: a loaded model.
        tokenizer: a transformers tokenizer (default: the family's own).
        media: media processor options (``min_pixels``, ``max_pixels``, ``fps``, ...).
    """

    def __init__(self, model: VLModel, tokenizer: Any = None, **media: Any) -> None:
        self.model = model.eval()
        spec: ModelSpec = get_model(model.name)
        if tokenizer is None:
            if spec.default_tokenizer is None:
                raise MmzooError(f"model '{spec.name}' has no built-in tokenizer; pass one")
            tokenizer = spec.default_tokenizer()
        self.tokenizer = tokenizer
        self.preprocessor = Preprocessor(spec, model.config, tokenizer, DataConfig(media=media))
        self.template = spec.template
        stops = set(self.template.stop_token_ids(tokenizer))
        if getattr(tokenizer, "eos_token_id", None) is not None:
            stops.add(tokenizer.eos_token_id)
        self.stop_token_ids = sorted(stops)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, request: Request) -> Sample:
        """One request as a sample: its prompt, up to the template's generation prompt, and media."""
        t, text = self.template, request.prompt
        if t.image_placeholder not in text and t.video_placeholder not in text:
            text = t.place_media(text, len(request.images), len(request.videos))
        messages = [] if request.system is None else [{"role": "system", "content": request.system}]
        messages.append({"role": "user", "content": text})
        images = [_media_path(x) for x in request.images]
        record = Record(messages, images, [_media_path(x) for x in request.videos])
        return self.preprocessor.to_sample(self.preprocessor.prepare_prompt(record))

    def collate(self, samples: Sequence[Sample]) -> dict[str, Any]:
        """Left-padded ``input_ids``, ``attention_mask``, ``position_ids`` and the samples' media."""
        rows = [{"input_ids": s.input_ids, "position_ids": s.position_ids, "media": s.media} for s in samples]
        return batch_to(collate_left_padded(rows, self.tokenizer.pad_token_id or 0), self.device)

    def answer(
        self,
        requests: Sequence[Request],
        sampling: SamplingConfig | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> list[str]:
        """Answer a batch of requests; ``on_text`` streams the first answer's text as it grows.

        Generation stops at the template's end-of-turn tokens and at ``sampling.stop_token_ids``.
        """
        batch = self.collate([self.encode(r) for r in requests])
        sampling = sampling or SamplingConfig()
        stops = tuple(sorted({*sampling.stop_token_ids, *self.stop_token_ids}))
        streamer = _Streamer(self.tokenizer, on_text) if on_text is not None else None
        ids = generate(
            self.model,
            batch["input_ids"],
            batch["attention_mask"],
            position_ids=batch["position_ids"],
            media=batch["media"],
            sampling=replace(sampling, stop_token_ids=stops),
            on_step=streamer.step if streamer is not None else None,
        )
        return [self.decode(row) for row in ids]

    def decode(self, ids: Sequence[int]) -> str:
        """Answer text: stops at the first end-of-turn token, special tokens dropped."""
        ids = list(ids)
        for i, token in enumerate(ids):
            if token in self.stop_token_ids:
                ids = ids[:i]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class _Streamer:
    """Decodes row 0 incrementally and emits the new text (never half a UTF-8 character)."""

    def __init__(self, tokenizer: Any, emit: Callable[[str], None]) -> None:
        self.tokenizer, self.emit = tokenizer, emit
        self.ids: list[int] = []
        self.printed = 0

    def step(self, tokens: list[int | None], logits: torch.Tensor) -> None:
        token = tokens[0]
        if token is None:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character
            return
        if len(text) > self.printed:
            self.emit(text[self.printed :])
            self.printed = len(text)


def _media_path(item: Any) -> Any:
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise MmzooError(f"{path}: no such media file")
        return path
    return item
