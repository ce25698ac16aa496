"""``load_model``: an mmzoo model from a Hugging Face directory or an mm checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from mmzoo.checkpoint.hf import load_hf_model
from mmzoo.checkpoint.mm import is_mm_checkpoint, load_mm_model
from mmzoo.model import VLModel


def load_model(path: str | Path, dtype: torch.dtype | str | None = None) -> VLModel:
    """Load a Hugging Face or mm checkpoint directory into an mmzoo model.

    A Hugging Face directory: the family is chosen from ``architectures`` in config.json and
    both key layouts transformers has written are read. An mm checkpoint (a root holding
    ``latest_checkpointed_iteration.txt``, an ``iter_*``/``release`` directory, or its
    ``mp_rank_00`` shard) goes to :func:`mmzoo.checkpoint.mm.load_mm_model`. Either
    way tensors are streamed from the checkpoint files straight into the model's parameters
    (never a second full copy).

    Args:
        path: checkpoint directory (HF: config.json + safetensors, sharded or not; or mm).
        dtype: parameter dtype; ``None`` means float32, ``"auto"`` the checkpoint's own dtype.
    """
    if is_mm_checkpoint(path):
        return load_mm_model(path, dtype)
    return load_hf_model(path, dtype)
