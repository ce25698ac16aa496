"""VLModel: image encoder (vision encoder -> projector) -> scatter into text embeddings -> text decoder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmzoo.errors import MmzooError
from mmzoo.loss import LossReduction
from mmzoo.nn import TextDecoder


def real_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tokens of a padded batch ``(B, S)`` are real, and the ``cu_seqlens`` of the rows packed.

    Returns:
        ``keep`` ``(B, S)`` bool (all true without a mask) and ``cu_seqlens`` ``(B + 1,)`` int32.
    """
    if attention_mask is None:
        keep = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        keep = attention_mask.bool()
    return keep, F.pad(keep.sum(dim=1).cumsum(0, dtype=torch.int32), (1, 0))


@dataclass
class VLOutput:
    """``logits`` ``(B, S, V)`` (zeros at padded positions; None when not asked for) and ``loss``
    when labels were given."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None


class ImageEncoder(nn.Module):
    """The vision encoder and the projector, held as ``encoder`` and ``projector`` so that their
    parameter names are MindSpeed-MM's (``image_encoder.encoder.*``, ``image_encoder.projector.*``)."""

    def __init__(self, *, encoder: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        dtype = next(self.encoder.parameters()).dtype
        return self.projector(self.encoder(pixel_values.to(dtype), grid_thw))


class VLModel(nn.Module):
    """A vision-language model composed of ready-built parts (keyword-only).

    The vision encoder and projector are held together as ``image_encoder`` (an
    :class:`ImageEncoder`), so ``state_dict()`` names are the mm checkpoint names.

    Args:
        vision_encoder: ``(pixel_values, grid_thw) -> (patches, C)`` in input patch order.
        projector: ``(patches, C) -> (tokens, hidden)``; ``patches / tokens`` patches per token.
        text_decoder: a :class:`mmzoo.nn.TextDecoder`-like module.
        position_ids: the family's position-id function (see ``ModelSpec.position_ids``), kept as
            ``compute_position_ids``.
        loss: ``(hidden (T, H), output_weight (V, H), labels (T,), cu_seqlens, reduction) -> loss``.
        image_token_id, video_token_id: placeholder ids that receive media features.
        config: the family config the parts were built from.
        name: registry name of the family.
    """

    def __init__(
        self,
        *,
        vision_encoder: nn.Module,
        projector: nn.Module,
        text_decoder: TextDecoder,
        position_ids: Callable[..., torch.Tensor],
        loss: Callable[..., torch.Tensor],
        image_token_id: int,
        video_token_id: int,
        config: Any,
        name: str,
    ) -> None:
        super().__init__()
        self.image_encoder = ImageEncoder(encoder=vision_encoder, projector=projector)
        self.text_decoder = text_decoder
        self.compute_position_ids = position_ids
        self.loss_fn = loss
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.config = config
        self.name = name

    def encode_media(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Vision encoder + projector: patches ``(N, patch_dim)`` -> LLM tokens ``(N / merge, hidden)``."""
        return self.image_encoder(pixel_values, grid_thw)

    def _scatter(self, embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int, features, kind: str):
        mask = input_ids == token_id
        count = int(mask.sum())
        if count != features.shape[0]:
            raise MmzooError(
                f"{kind} tokens and {kind} features differ: the input ids hold {count} {kind} tokens "
                f"(id {token_id}) but the {kind}s give {features.shape[0]} features; check that each "
                f"placeholder was expanded for its {kind}'s grid_thw"
            )
        return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings ``(B, S, H)`` with media features scattered into their placeholders.

        Images and videos go through the vision encoder in one call: under FSDP every rank must
        run it the same number of times per micro-batch, whatever media its batch holds.
        """
        embeds = self.text_decoder.embed(input_ids)
        media: list[tuple[torch.Tensor, torch.Tensor, int, str]] = []
        for pixels, grid, token_id, kind in (
            (pixel_values, image_grid_thw, self.image_token_id, "image"),
            (pixel_values_videos, video_grid_thw, self.video_token_id, "video"),
        ):
            if pixels is not None:
                if grid is None:
                    raise MmzooError(f"{kind} pixels were given without their {kind}_grid_thw")
                media.append((pixels, grid, token_id, kind))
        if not media:
            return embeds
        features = self.encode_media(torch.cat([m[0] for m in media]), torch.cat([m[1] for m in media]))
        patches = [m[0].shape[0] for m in media]
        sizes = [n * features.shape[0] // sum(patches) for n in patches]  # the encoder merges evenly
        for (_, _, token_id, kind), part in zip(media, features.split(sizes), strict=True):
            embeds = self._scatter(embeds, input_ids, token_id, part, kind)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        loss_reduction: LossReduction | None = None,
        return_logits: bool = True,
    ) -> VLOutput:
        """Run the model on a padded batch ``(B, S)`` or on one packed row with ``cu_seqlens``.

        Arguments match transformers' Qwen2.5-VL. ``cu_seqlens`` (packed input, ``B == 1``)
        marks sample boundaries; ``position_ids`` ``(rows, B, S)`` skips the family's
        position-id function (the packed path computes them per sample in the collator).
        ``loss_reduction`` scales the loss for gradient accumulation (see :mod:`mmzoo.loss`);
        training passes ``return_logits=False``: the loss then needs logits of answer tokens only.
        """
        embeds = self.embed_inputs(
            input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
        )
        if cu_seqlens is None:
            keep, cu_seqlens = real_tokens(input_ids, attention_mask)
        elif len(input_ids) != 1:
            raise MmzooError(f"a packed batch (cu_seqlens given) must be one row, got {len(input_ids)} rows")
        else:
            keep = torch.ones_like(input_ids, dtype=torch.bool)
        if position_ids is None:
            position_ids = self.compute_position_ids(
                self.config,
                input_ids,
                attention_mask=None if attention_mask is None else keep,
                image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw,
                second_per_grid_ts=second_per_grid_ts,
            )

        hidden = self.text_decoder(embeds[keep], position_ids[:, keep], cu_seqlens)  # (T, H)
        loss = None
        if labels is not None:
            weight = self.text_decoder.output_weight
            loss = self.loss_fn(hidden, weight, labels[keep], cu_seqlens, loss_reduction)
        if not return_logits:
            return VLOutput(logits=None, loss=loss)
        logits = self.text_decoder.logits(hidden)  # (T, V)
        if bool(keep.all()):
            return VLOutput(logits=logits.view(*keep.shape, -1), loss=loss)
        padded = logits.new_zeros(*keep.shape, logits.shape[-1])  # (B, S, V)
        padded[keep] = logits
        return VLOutput(logits=padded, loss=loss)
