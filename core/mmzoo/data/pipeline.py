"""Records -> prepared samples (token ids, labels, positions, resized media) -> training samples.

Chat prompts (:class:`mmzoo.infer.Chat`) go through the same steps as training records, so a
model is asked the way it was trained.

Family-specific work goes through the plugin's parts: the chat template, the media processor
(decode + resize, then normalise + patchify) and the position-id function. Prepared samples
keep media as resized uint8 frames: small enough to cache, and turned into pixel patches
only when a batch is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mmzoo.config import DataConfig
from mmzoo.data.collate import Sample
from mmzoo.data.records import Record, SkipReport
from mmzoo.data.template import Encoded
from mmzoo.errors import MmzooError
from mmzoo.loss import IGNORE_INDEX
from mmzoo.protocols import MediaItem, MediaProcessor
from mmzoo.registry import ModelSpec


@dataclass
class Prepared:
    """A tokenised sample with its media as the family prepared them (uint8 frames)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    media: list[MediaItem] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class BadRecord(MmzooError):
    """A record that cannot become a sample; ``reason`` is one of :data:`mmzoo.data.records.REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Preprocessor:
    """Turns records into :class:`Prepared` samples for one model family.

    Args:
        spec: the family (template, media processor, position ids, token expansion).
        model_config: the model's config (token ids, merge size, tokens per second).
        tokenizer: a transformers tokenizer with the family's special tokens.
        data: the data config (seq_length, train_on_prompt, mask_history, media options).
    """

    def __init__(self, spec: ModelSpec, model_config: Any, tokenizer: Any, data: DataConfig) -> None:
        for part in ("template", "media_processor"):
            if getattr(spec, part) is None:
                raise MmzooError(f"model '{spec.name}' provides no {part}, so it cannot prepare samples")
        self.spec = spec
        self.config = model_config
        self.tokenizer = tokenizer
        self.data = data
        try:
            self.processor: MediaProcessor = spec.media_processor(model_config, **data.media)
        except TypeError as exc:
            raise MmzooError(f"media options: {exc}") from exc

    def prepare(self, record: Record, report: SkipReport) -> Prepared | None:
        """One record -> a prepared sample, or ``None`` (counted in ``report``) when it is bad."""
        try:
            return self._prepare(record, truncate=True)
        except BadRecord as exc:
            report.add(exc.reason, record.source, str(exc))
            return None

    def prepare_prompt(self, record: Record) -> Prepared:
        """A generation prompt (messages ending in a user turn) -> a prepared sample.

        Prepared as :meth:`prepare` prepares training records, so a model is asked the way it was
        trained; never truncated.

        Raises:
            BadRecord: what would make :meth:`prepare` skip a record (an :class:`MmzooError`).
        """
        return self._prepare(record, truncate=False)

    def _prepare(self, record: Record, truncate: bool) -> Prepared:
        images, videos = self._read_media(record)
        ids, labels, media_end = self._encode(record, images, videos)
        if truncate:
            ids, labels = self._truncate(ids, labels, media_end)
        media = images + videos
        return self._prepared(torch.tensor(ids), torch.tensor(labels), media, record.source)

    def _prepared(
        self, input_ids: torch.Tensor, labels: torch.Tensor, media: list[MediaItem], source: str
    ) -> Prepared:
        info = self.processor.info_tensors(media) if media else None
        positions = self.spec.position_ids(self.config, input_ids[None], media=info)[:, 0]
        return Prepared(input_ids, labels, positions, media, source)

    def _read_media(self, record: Record) -> tuple[list[MediaItem], list[MediaItem]]:
        """The record's images and videos, decoded and prepared by the family's processor."""
        try:
            images = [self.processor.prepare_image(path) for path in record.images]
        except MmzooError as exc:
            raise BadRecord("corrupt_image", str(exc)) from exc
        try:
            videos = [self.processor.prepare_video(path) for path in record.videos]
        except MmzooError as exc:
            raise BadRecord("unreadable_video", str(exc)) from exc
        return images, videos

    def _encode(self, record: Record, images: list[MediaItem], videos: list[MediaItem]) -> Encoded:
        """Token ids and labels, each placeholder expanded by the family's processor."""
        items = {"image": images, "video": videos}

        def expand(kind: str, index: int) -> list[int]:
            return self.processor.expand(items[kind][index])

        try:
            encoded = self.spec.template.encode(
                record.messages,
                self.tokenizer,
                expand,
                train_on_prompt=self.data.train_on_prompt,
                mask_history=self.data.mask_history,
                num_images=len(images),
                num_videos=len(videos),
            )
        except MmzooError as exc:
            raise BadRecord("bad_structure", str(exc)) from exc
        # A special token typed into the text (a literal "<|image_pad|>") adds a placeholder with no
        # features: reject the record here, not fail later in position ids or in a training batch.
        slots = self.processor.feature_token_ids
        want = sum(self.processor.num_tokens(item) for item in images + videos)
        got = sum(1 for token in encoded.input_ids if token in slots)
        if got != want:
            detail = f"{got} media feature tokens for {want} media features (a special token in the text?)"
            raise BadRecord("bad_structure", detail)
        return encoded

    def _truncate(self, ids: list[int], labels: list[int], media_end: int) -> tuple[list[int], list[int]]:
        limit = self.data.seq_length
        if len(ids) <= limit:
            return ids, labels
        if media_end > limit:
            raise BadRecord("too_long", f"{len(ids)} tokens with media beyond seq_length {limit}")
        ids, labels = ids[:limit], labels[:limit]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            raise BadRecord("too_long", f"{len(ids)} tokens; nothing left to train after truncation")
        return ids, labels

    def to_sample(self, prepared: Prepared) -> Sample:
        """A prepared sample with its media batch (normalised pixels): what the collator takes."""
        media = self.processor.tensors(prepared.media) if prepared.media else {}
        return Sample(prepared.input_ids, prepared.labels, prepared.position_ids, media, prepared.source)

    def dummy(self) -> Prepared:
        """The family's smallest image in its own sample, with no loss.

        Appended to batches without media so that every rank runs the vision encoder.
        """
        item = self.processor.dummy()
        input_ids = torch.tensor(self.processor.expand(item))
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        return self._prepared(input_ids, labels, [item], "<dummy image>")
