"""MindSpeed-MM's shard file: ``mp_rank_*/model_optim_rng.pt``, a ``torch.save`` of
``{'model': state_dict, 'checkpoint_version': 3.0}``.

Reading uses ``torch.load(weights_only=True, mmap=True)``: nothing but tensors and plain
containers is unpickled, and tensor data stays in the file until it is used, so memory is
bounded by what is read, not by the file. ``torch.save`` cannot append, so a shard is written
from a state dict held in memory: peak memory is about one shard (one tensor-parallel rank of
one pipeline stage).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from mmzoo.errors import MmzooError

MEGATRON_WEIGHTS = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0  # what MindSpeed-MM writes; Megatron checks it on load


def _more_than_a_model(file: Path, extra: str = "") -> MmzooError:
    return MmzooError(
        f"{file}: holds more than a model state dict{extra} (a training checkpoint with args or "
        "optimizer state?), which mmzoo does not read; save {'model': state_dict, "
        "'checkpoint_version': 3.0} from a copy you trust and read that"
    )


def _load(file: Path) -> Any:
    """``torch.load`` weights-only and memory-mapped, its failures as one-line MmzooErrors."""
    if not zipfile.is_zipfile(file):
        raise MmzooError(
            f"{file}: not a torch.save zip archive (empty, truncated, corrupt, or saved in torch's "
            "legacy format); convert or copy the checkpoint again"
        )
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise _more_than_a_model(file) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MmzooError(f"{file}: cannot be read ({reason}); it is truncated or corrupt") from None


def read_model_state(file: Path) -> dict[str, torch.Tensor]:
    """The ``'model'`` state dict of a ``model_optim_rng.pt`` file, its tensors memory-mapped.

    ``None`` values (Megatron's empty ``_extra_state``) are left out. Anything else than one
    state dict of tensors is a one-line MmzooError naming the file.
    """
    obj = _load(file)
    keys = [str(k) for k in obj] if isinstance(obj, dict) else []
    if "model" not in keys and any(k.startswith("model") for k in keys):
        chunks = ", ".join(sorted(k for k in keys if k.startswith("model")))
        raise MmzooError(
            f"{file}: holds virtual-pipeline chunks ({chunks}); mmzoo reads one model per pipeline "
            "stage: resplit it without virtual pipeline stages first"
        )
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        found = ", ".join(keys) if isinstance(obj, dict) else type(obj).__name__
        raise MmzooError(
            f"{file}: expected {{'model': state_dict, 'checkpoint_version': ...}}, found {found}"
        )
    # Whether unpickling args failed in _load depends on the safe globals other code registered
    # (megatron-core adds argparse.Namespace): the keys decide.
    extra = sorted(k for k in keys if k not in ("model", "checkpoint_version"))
    if extra:
        raise _more_than_a_model(file, f" ({', '.join(extra)})")
    state = {k: v for k, v in obj["model"].items() if v is not None}
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise MmzooError(f"{file}: 'model' holds non-tensor values under {', '.join(bad[:8])}")
    return state


def compact(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` if it owns exactly its storage, else a contiguous copy that does.

    ``torch.save`` writes whole storages: a slice would drag its full tensor (e.g. the whole
    embedding behind one tensor-parallel slice) into the file.
    """
    tensor = tensor.detach().cpu()
    whole = tensor.is_contiguous() and tensor.storage_offset() == 0
    if whole and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def write_model_state(file: Path, state: dict[str, torch.Tensor]) -> int:
    """``torch.save`` ``state`` as MindSpeed-MM does; returns the bytes of tensor data written."""
    compacted = {name: compact(t) for name, t in state.items()}
    torch.save({"model": compacted, "checkpoint_version": CHECKPOINT_VERSION}, file)
    return sum(t.numel() * t.element_size() for t in compacted.values())
