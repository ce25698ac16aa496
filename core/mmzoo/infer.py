"""Generation with a KV cache, and chat requests (prompt + images/videos) -> answers.

Family-agnostic: the chat template, media processor, placeholder expansion, position ids and
default tokenizer come from the model's :class:`mmzoo.ModelSpec`. Prompts are prefilled as one
packed sequence (the training forward); each decode step feeds one token per row at position
``tokens so far + rope delta`` on every position row, where the delta is
``max(prompt positions) + 1 - prompt length`` (zero for text-only 1-D positions).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmzoo.data.collate import collate_left_padded
from mmzoo.errors import MmzooError
from mmzoo.model import VLModel
from mmzoo.registry import ModelSpec, get_model

OnStep = Callable[[list[int | None]], None]


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
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

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
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    sampling: SamplingConfig | None = None,
    stop_token_ids: Sequence[int] = (),
    on_step: OnStep | None = None,
    record_logits: list[torch.Tensor] | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per row of a padded batch (any padding side).

    Args:
        model: the model (put it in eval mode).
        input_ids: ``(B, S)`` prompts with media placeholders expanded.
        attention_mask: ``(B, S)``, 0 on padding.
        pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, second_per_grid_ts:
            media inputs as for :meth:`VLModel.forward`.
        sampling: decoding settings (default: greedy, 256 tokens).
        stop_token_ids: a row ends after generating one of these (it is kept in the output).
        on_step: called after each step with the new token of every row (``None`` once a row ended).
        record_logits: when given, each step's raw logits ``(B, V)`` are appended to it.

    Returns:
        The generated token ids of each row.
    """
    sampling = sampling or SamplingConfig()
    batch = input_ids.shape[0]
    keep = (
        attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    )
    embeds = model.embed_inputs(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
    positions = model.position_ids_fn(
        model.config,
        input_ids,
        attention_mask=keep,
        image_grid_thw=image_grid_thw,
        video_grid_thw=video_grid_thw,
        second_per_grid_ts=second_per_grid_ts,
    ).to(input_ids.device)  # (rows, B, S); padding is 0, real positions are >= 0
    lengths = keep.sum(dim=1)
    if int(lengths.min()) == 0:
        raise MmzooError("generate: a prompt in the batch is empty")
    deltas = positions.amax(dim=(0, 2)) + 1 - lengths  # (B,)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))

    decoder = model.text_decoder
    cache = decoder.new_cache(batch, int(lengths.max()) + sampling.max_new_tokens)
    hidden = decoder(embeds[keep], positions[:, keep], cu_seqlens, cache=cache)  # (T, H)
    logits = decoder.logits(hidden[cu_seqlens[1:].long() - 1])  # (B, V)

    seen = torch.zeros(batch, logits.shape[-1], dtype=torch.bool, device=logits.device)
    if sampling.repetition_penalty != 1.0:
        rows = torch.arange(batch, device=input_ids.device)[:, None].expand_as(input_ids)
        seen[rows[keep], input_ids[keep].clamp(max=logits.shape[-1] - 1)] = True
    generator = None
    if sampling.seed is not None and sampling.temperature > 0:
        generator = torch.Generator(device=logits.device).manual_seed(sampling.seed)
    stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=logits.device)
    done = torch.zeros(batch, dtype=torch.bool, device=logits.device)
    out: list[list[int]] = [[] for _ in range(batch)]
    step_cu = torch.arange(batch + 1, dtype=torch.int32, device=input_ids.device)
    rows_of_positions = positions.shape[0]
    for step in range(sampling.max_new_tokens):
        if record_logits is not None:
            record_logits.append(logits)
        tokens = _process_logits(logits, seen, sampling, generator)
        new: list[int | None] = []
        for row, token in enumerate(tokens.tolist()):
            new.append(None if done[row] else token)
            if not done[row]:
                out[row].append(token)
        if on_step is not None:
            on_step(new)
        seen[torch.arange(batch), tokens] = True
        done |= torch.isin(tokens, stops)
        if bool(done.all()) or step == sampling.max_new_tokens - 1:
            break
        pos = (cache.lengths + deltas).expand(rows_of_positions, -1)  # (rows, B)
        hidden = decoder(decoder.embed(tokens), pos, step_cu, cache=cache)
        logits = decoder.logits(hidden)
    return out


@dataclass
class Request:
    """One chat turn: a prompt with its media.

    ``<image>``/``<video>`` in the prompt place the media; without them, the images and then the
    videos come before the text (as the Qwen chat template's processor does).
    """

    prompt: str
    images: Sequence[Any] = field(default_factory=list)  # paths or PIL images
    videos: Sequence[Any] = field(default_factory=list)  # paths
    system: str | None = None


class Chat:
    """Answers :class:`Request` s with a model, its tokenizer and its family's template and media.

    Args:
        model: a loaded model.
        tokenizer: a transformers tokenizer (default: the family's own).
        media: media processor options (``min_pixels``, ``max_pixels``, ``fps``, ...).
    """

    def __init__(self, model: VLModel, tokenizer: Any = None, **media: Any) -> None:
        self.model = model.eval()
        self.spec: ModelSpec = get_model(model.name)
        for part in ("template", "media_processor", "expand_media"):
            if getattr(self.spec, part) is None:
                raise MmzooError(f"model '{self.spec.name}' provides no {part}, so it cannot chat")
        if tokenizer is None:
            if self.spec.default_tokenizer is None:
                raise MmzooError(f"model '{self.spec.name}' has no built-in tokenizer; pass one")
            tokenizer = self.spec.default_tokenizer()
        self.tokenizer = tokenizer
        try:
            self.processor = self.spec.media_processor(model.config, **media)
        except TypeError as exc:
            raise MmzooError(f"media options: {exc}") from exc
        self.template = self.spec.template
        stops = set(self.template.stop_token_ids(tokenizer))
        if getattr(tokenizer, "eos_token_id", None) is not None:
            stops.add(tokenizer.eos_token_id)
        self.stop_token_ids = sorted(stops)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, request: Request) -> dict[str, Any]:
        """Token ids (list) and media tensors of one request."""
        images = [self.processor.prepare_image(_media_path(x)) for x in request.images]
        videos, seconds = [], []
        for video in request.videos:
            frames, second = self.processor.prepare_video(_media_path(video))
            videos.append(frames)
            seconds.append(second)
        t = self.template
        text = request.prompt
        if t.image_placeholder not in text and t.video_placeholder not in text:
            text = t.image_placeholder * len(images) + t.video_placeholder * len(videos) + text
        messages = [] if request.system is None else [{"role": "system", "content": request.system}]
        messages.append({"role": "user", "content": text})
        grids = {
            "image": [self.processor.grid_thw(f)[0].tolist() for f in images],
            "video": [self.processor.grid_thw(f)[0].tolist() for f in videos],
        }
        merge = self.model.config.vision.spatial_merge_size
        expand = self.spec.expand_media(self.tokenizer, grids["image"], grids["video"], merge)
        ids, _ = t.encode(messages, self.tokenizer, expand, num_images=len(images), num_videos=len(videos))
        sample: dict[str, Any] = {"input_ids": ids}
        if images:
            sample["pixel_values"] = torch.cat([self.processor.pixel_values(f) for f in images])
            sample["image_grid_thw"] = torch.tensor(grids["image"])
        if videos:
            sample["pixel_values_videos"] = torch.cat([self.processor.pixel_values(f) for f in videos])
            sample["video_grid_thw"] = torch.tensor(grids["video"])
            sample["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
        return sample

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Left-padded ``input_ids``/``attention_mask`` and the media of all samples, in order."""
        batch = collate_left_padded(samples, self.tokenizer.pad_token_id or 0)
        return {k: v.to(self.device) for k, v in batch.items()}

    def answer(
        self,
        requests: Sequence[Request],
        sampling: SamplingConfig | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> list[str]:
        """Answer a batch of requests; ``on_text`` streams the first answer's text as it grows."""
        batch: dict[str, Any] = self.collate([self.encode(r) for r in requests])
        streamer = _Streamer(self.tokenizer, on_text) if on_text is not None else None
        ids = generate(
            self.model,
            **batch,
            sampling=sampling,
            stop_token_ids=self.stop_token_ids,
            on_step=streamer.step if streamer is not None else None,
        )
        return [self.decode(row) for row in ids]

    def decode(self, ids: Sequence[int]) -> str:
        """Answer text: stops at the first stop token, special tokens dropped."""
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

    def step(self, tokens: list[int | None]) -> None:
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
