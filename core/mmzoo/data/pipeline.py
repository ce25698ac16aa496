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

import numpy as np
import torch

from mmzoo.config import DataConfig
from mmzoo.data.collate import Sample
from mmzoo.data.records import Record, SkipReport
from mmzoo.errors import MmzooError
from mmzoo.loss import IGNORE_INDEX
from mmzoo.registry import ModelSpec


@dataclass
class Prepared:
    """A tokenised sample with media as resized uint8 frames ``(T, H, W, 3)``."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    images: list[np.ndarray] = field(default_factory=list)
    videos: list[np.ndarray] = field(default_factory=list)
    second_per_grid_ts: list[float] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class BadRecord(MmzooError):
    """A record that cannot become a sample; ``reason`` is one of :data:`mmzoo.data.records.REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    # torch.cat copies even a single tensor: ~7 ms for one large image's patches.
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


class Preprocessor:
    """Turns records into :class:`Prepared` samples for one model family.

    Args:
        spec: the family (template, media processor, position ids, token expansion).
        model_config: the model's config (token ids, merge size, tokens per second).
        tokenizer: a transformers tokenizer with the family's special tokens.
        data: the data config (seq_length, train_on_prompt, mask_history, media options).
    """

    def __init__(self, spec: ModelSpec, model_config: Any, tokenizer: Any, data: DataConfig) -> None:
        for part in ("template", "media_processor", "expand_media"):
            if getattr(spec, part) is None:
                raise MmzooError(f"model '{spec.name}' provides no {part}, so it cannot prepare samples")
        self.spec = spec
        self.config = model_config
        self.tokenizer = tokenizer
        self.data = data
        try:
            self.processor = spec.media_processor(model_config, **data.media)
        except TypeError as exc:
            raise MmzooError(f"media options: {exc}") from exc
        self.merge = model_config.vision.spatial_merge_size

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
        images, videos, seconds = self._read_media(record)
        image_grids = [self.processor.grid_thw(f)[0].tolist() for f in images]
        video_grids = [self.processor.grid_thw(f)[0].tolist() for f in videos]
        ids, labels = self._encode(record, image_grids, video_grids)
        if truncate:
            ids, labels = self._truncate(ids, labels)
        input_ids = torch.tensor(ids)
        positions = self.spec.position_ids(
            self.config,
            input_ids[None],
            image_grid_thw=torch.tensor(image_grids) if image_grids else None,
            video_grid_thw=torch.tensor(video_grids) if video_grids else None,
            second_per_grid_ts=torch.tensor(seconds) if seconds else None,
        )[:, 0]
        return Prepared(input_ids, torch.tensor(labels), positions, images, videos, seconds, record.source)

    def _read_media(self, record: Record) -> tuple[list[np.ndarray], list[np.ndarray], list[float]]:
        """Decoded and resized images, videos, and each video's seconds per grid step."""
        try:
            images = [self.processor.prepare_image(path) for path in record.images]
        except MmzooError as exc:
            raise BadRecord("corrupt_image", str(exc)) from exc
        videos, seconds = [], []
        try:
            for path in record.videos:
                frames, second_per_grid_t = self.processor.prepare_video(path)
                videos.append(frames)
                seconds.append(second_per_grid_t)
        except MmzooError as exc:
            raise BadRecord("unreadable_video", str(exc)) from exc
        return images, videos, seconds

    def _encode(
        self, record: Record, image_grids: list[list[int]], video_grids: list[list[int]]
    ) -> tuple[list[int], list[int]]:
        """Token ids and labels, each placeholder expanded for its media's grid."""
        expand = self.spec.expand_media(self.tokenizer, image_grids, video_grids, self.merge)
        try:
            ids, labels = self.spec.template.encode(
                record.messages,
                self.tokenizer,
                expand,
                train_on_prompt=self.data.train_on_prompt,
                mask_history=self.data.mask_history,
                num_images=len(image_grids),
                num_videos=len(video_grids),
            )
        except MmzooError as exc:
            raise BadRecord("bad_structure", str(exc)) from exc
        # A special token typed into the text (a literal "<|image_pad|>") adds a placeholder with no
        # features: reject the record here, not fail later in position ids or in a training batch.
        for kind, token, grids in (
            ("image", self.config.image_token_id, image_grids),
            ("video", self.config.video_token_id, video_grids),
        ):
            want, got = sum(t * h * w for t, h, w in grids) // self.merge**2, ids.count(token)
            if got != want:
                detail = f"{got} {kind} tokens for {want} {kind} features (a special token in the text?)"
                raise BadRecord("bad_structure", detail)
        return ids, labels

    def _truncate(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        limit = self.data.seq_length
        if len(ids) <= limit:
            return ids, labels
        media_ids = {self.config.image_token_id, self.config.video_token_id, self.config.vision_end_token_id}
        last_media = max((i for i, t in enumerate(ids) if t in media_ids), default=-1)
        if last_media >= limit:
            raise BadRecord("too_long", f"{len(ids)} tokens with media beyond seq_length {limit}")
        ids, labels = ids[:limit], labels[:limit]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            raise BadRecord("too_long", f"{len(ids)} tokens; nothing left to train after truncation")
        return ids, labels

    def to_sample(self, prepared: Prepared) -> Sample:
        """Normalise and patchify the media: the :class:`Sample` the collator takes."""
        media: dict[str, torch.Tensor] = {}
        if prepared.images:
            media["pixel_values"] = _cat([self.processor.pixel_values(f) for f in prepared.images])
            media["image_grid_thw"] = torch.cat([self.processor.grid_thw(f) for f in prepared.images])
        if prepared.videos:
            media["pixel_values_videos"] = _cat([self.processor.pixel_values(f) for f in prepared.videos])
            media["video_grid_thw"] = torch.cat([self.processor.grid_thw(f) for f in prepared.videos])
            media["second_per_grid_ts"] = torch.tensor(prepared.second_per_grid_ts)
        return Sample(prepared.input_ids, prepared.labels, prepared.position_ids, media, prepared.source)

    def dummy(self) -> Prepared:
        """The smallest image (one LLM token) in its own sample, with no loss.

        Appended to batches without media so that every rank runs the vision encoder.
        """
        size = self.processor.patch_size * self.merge
        frames = np.zeros((1, size, size, 3), dtype=np.uint8)
        grid = self.processor.grid_thw(frames)[0].tolist()
        ids = self.spec.expand_media(self.tokenizer, [grid], [], self.merge)("image", 0)
        input_ids = torch.tensor(ids)
        positions = self.spec.position_ids(self.config, input_ids[None], image_grid_thw=torch.tensor([grid]))[
            :, 0
        ]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        return Prepared(input_ids, labels, positions, [frames], source="<dummy image>")
