"""The Python API's loading: an mmzoo model from a Hugging Face directory or an mm checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from mmzoo.checkpoint.dcp import dcp_iteration, open_dcp_weights
from mmzoo.checkpoint.hf import open_hf_weights
from mmzoo.checkpoint.hub import resolve_model_dir
from mmzoo.checkpoint.mm import is_mm_checkpoint, open_mm_weights
from mmzoo.checkpoint.weights import Weights, load_weights
from mmzoo.lora.checkpoint import is_lora_checkpoint, load_lora_model
from mmzoo.model import VLModel


def open_weights(path: str | Path, dtype: torch.dtype | str | None = None) -> Weights:
    """The weights of a Hugging Face directory, an mm checkpoint or a DCP training checkpoint,
    read one tensor at a time; a Hub id (``org/name[@revision]``) names a Hugging Face directory."""
    path = resolve_model_dir(path)
    if dcp_iteration(path) is not None:
        return open_dcp_weights(path, dtype)
    return open_mm_weights(path, dtype) if is_mm_checkpoint(path) else open_hf_weights(path, dtype)


def load_model(path: str | Path, dtype: torch.dtype | str | None = None) -> VLModel:
    """Load a Hugging Face or mm checkpoint directory into an mmzoo model.

    A Hugging Face directory: the family is chosen from ``architectures`` in config.json and
    both key layouts transformers has written are read. An mm checkpoint (a root holding
    ``latest_checkpointed_iteration.txt``, an ``iter_*``/``release`` directory, or its
    ``mp_rank_00`` shard) of any tensor/pipeline split; the DCP checkpoint of a run on many
    ranks (its run directory or ``iter_*`` directory); a LoRA run's checkpoint: the base model it
    records (``model.load``'s path, which must still exist) with its adapters. Either way the
    model is built once and tensors are streamed from the checkpoint files straight into its
    parameters.

    Args:
        path: checkpoint directory (HF: config.json + safetensors, sharded or not; or mm), or
            a Hugging Face Hub id ``org/name[@revision]`` (a string that is no existing path),
            fetched into the Hub cache (:func:`mmzoo.checkpoint.hub.resolve_model_dir`).
        dtype: parameter dtype; ``None`` means float32, ``"auto"`` the checkpoint's own dtype.
    """
    if is_lora_checkpoint(path):
        return load_lora_model(path, dtype, load_model)
    return load_weights(open_weights(path, dtype))
