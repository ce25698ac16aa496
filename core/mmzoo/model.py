"""VLModel: image encoder (vision encoder -> projector) -> scatter into text embeddings -> text decoder."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mmzoo.errors import MmzooError
from mmzoo.loss import LossReduction, loss_targets, weighted_cross_entropy
from mmzoo.nn import TextDecoder

if TYPE_CHECKING:
    from mmzoo.distributed.context_parallel import ContextParallel


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

    def forward(self, media: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.projector(self.encoder(media))


class VLModel(nn.Module):
    """A vision-language model composed of ready-built parts (keyword-only).

    The vision encoder and projector are held together as ``image_encoder`` (an
    :class:`ImageEncoder`), so ``state_dict()`` names are the mm checkpoint names. Media come as
    one family-defined batch (a mapping of tensors the family's media processor made); the core
    only passes it to the family's parts.

    Args:
        vision_encoder: ``media batch -> (N, C)`` features.
        projector: ``(N, C) -> (tokens, hidden)``.
        text_decoder: a :class:`mmzoo.nn.TextDecoder`-like module.
        position_ids: the family's position-id function (see ``ModelSpec.position_ids``), kept as
            ``compute_position_ids``.
        feature_slots: ``(config, media) -> [(token_id, count), ...]``: how the projector's rows
            split over placeholder ids, in order (see ``ModelSpec.feature_slots``).
        loss: ``(hidden (T, H), output_weight (V, H), labels (T,), cu_seqlens, reduction) -> loss``.
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
        feature_slots: Callable[[Any, Mapping[str, torch.Tensor]], list[tuple[int, int]]],
        loss: Callable[..., torch.Tensor],
        config: Any,
        name: str,
    ) -> None:
        super().__init__()
        self.image_encoder = ImageEncoder(encoder=vision_encoder, projector=projector)
        self.text_decoder = text_decoder
        self.compute_position_ids = position_ids
        self.feature_slots = feature_slots
        self.loss_fn = loss
        self.config = config
        self.name = name
        # Set by mmzoo.distributed.context_parallel: the decoder then runs on this rank's tokens.
        self.context_parallel: ContextParallel | None = None

    def embed_inputs(
        self, input_ids: torch.Tensor, media: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Token embeddings ``(B, S, H)`` with media features scattered into their placeholders.

        All media of the batch go through the vision encoder in one call: under FSDP every rank
        must run it the same number of times per micro-batch, whatever media its batch holds.
        """
        embeds = self.text_decoder.embed(input_ids)
        if not media:
            return embeds
        features = self.image_encoder(media)
        slots = self.feature_slots(self.config, media)
        total = sum(count for _, count in slots)
        if total != features.shape[0]:
            raise MmzooError(
                f"the media batch gives {features.shape[0]} features but {self.name} expects {total} "
                f"for its placeholders; check the media tensors ({', '.join(media)})"
            )
        for token_id, part in zip([t for t, _ in slots], features.split([c for _, c in slots]), strict=True):
            embeds = _scatter(embeds, input_ids, token_id, part)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        media: Mapping[str, torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        loss_reduction: LossReduction | None = None,
        return_logits: bool = True,
    ) -> VLOutput:
        """Run the model on a padded batch ``(B, S)`` or on one packed row with ``cu_seqlens``.

        ``media`` is the family's media batch (see its media processor's ``tensors``).
        ``cu_seqlens`` (packed input, ``B == 1``) marks sample boundaries; ``position_ids``
        ``(rows, B, S)`` skips the family's position-id function (the packed path computes them
        per sample in the collator). ``loss_reduction`` scales the loss for gradient accumulation
        (see :mod:`mmzoo.loss`); training passes ``return_logits=False``: the loss then needs
        logits of answer tokens only.
        """
        embeds = self.embed_inputs(input_ids, media)
        if cu_seqlens is None:
            keep, cu_seqlens = real_tokens(input_ids, attention_mask)
        elif len(input_ids) != 1:
            raise MmzooError(f"a packed batch (cu_seqlens given) must be one row, got {len(input_ids)} rows")
        else:
            keep = torch.ones_like(input_ids, dtype=torch.bool)
        if position_ids is None:
            mask = None if attention_mask is None else keep
            position_ids = self.compute_position_ids(self.config, input_ids, attention_mask=mask, media=media)

        if self.context_parallel is not None:
            return self._context_parallel_loss(
                embeds[keep], position_ids[:, keep], cu_seqlens, labels, keep, loss_reduction, return_logits
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

    def _context_parallel_loss(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        labels: torch.Tensor | None,
        keep: torch.Tensor,
        reduction: LossReduction | None,
        return_logits: bool,
    ) -> VLOutput:
        """This rank's slice of the packed tokens through the decoder, and its part of the loss:
        targets and weights come from the whole sequences, so the ranks' parts add up to it."""
        assert self.context_parallel is not None
        if labels is None or return_logits:
            raise MmzooError(
                "context parallel (parallel.cp > 1) computes the training loss only: "
                "pass labels and return_logits=False"
            )
        target, weight = loss_targets(labels[keep], cu_seqlens, reduction)
        part = self.context_parallel.shard(embeds, position_ids, cu_seqlens, target, weight)
        hidden = self.text_decoder(part.embeds, part.position_ids, part.cu_seqlens)  # (T/cp, H)
        output_weight = self.text_decoder.output_weight
        return VLOutput(
            logits=None, loss=weighted_cross_entropy(hidden, output_weight, part.target, part.weight)
        )


def _scatter(
    embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int, features: torch.Tensor
) -> torch.Tensor:
    mask = input_ids == token_id
    count = int(mask.sum())
    if count != features.shape[0]:
        raise MmzooError(
            f"placeholders and media features differ: the input ids hold {count} tokens of id {token_id} "
            f"but the media give {features.shape[0]} features for them; check that each placeholder was "
            "expanded by the family's media processor"
        )
    return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))
