"""Model directories named by Hugging Face Hub id: ``org/name`` or ``org/name@revision``.

:func:`resolve_model_dir` turns such an id into the local snapshot directory of the Hub cache
(``huggingface_hub.snapshot_download``), fetching only the files mmzoo reads: config, safetensors
weights and their index, tokenizer, processor and generation files. huggingface_hub's own
settings apply (``HF_HOME``/``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``, ``HF_TOKEN``)
and its progress bars show. An existing local path always wins over an id it looks like.
"""

from __future__ import annotations

import re
from pathlib import Path

from mmzoo.checkpoint.hf_export import TEMPLATE_FILES
from mmzoo.errors import MmzooError

# The files an HF checkpoint directory holds that mmzoo reads or copies (top level only).
HUB_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json", *TEMPLATE_FILES)
_HUB_ID = re.compile(r"(?P<repo>[^/@\s]+/[^/@\s]+)(?:@(?P<revision>[^@\s]+))?")


def parse_hub_id(value: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``value`` is shaped like a Hub model id, else ``None``.

    An id has one slash between two names of letters, digits, ``-``, ``_`` and ``.`` (as the
    Hub allows them), optionally followed by ``@revision`` (a branch, tag or commit hash).
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    match = _HUB_ID.fullmatch(value)
    if match is None:
        return None
    try:
        validate_repo_id(match["repo"])
    except HFValidationError:
        return None
    return match["repo"], match["revision"]


def resolve_model_dir(value: str | Path) -> Path:
    """The local directory ``value`` names: an existing path as it is, else a Hub id's snapshot.

    A string shaped like ``org/name[@revision]`` that is not an existing path is fetched into
    (or found in) the Hub cache; anything else is returned as a path for the caller's own
    "not found" error.

    Raises:
        MmzooError: the repository or revision does not exist or is gated, or the Hub cannot be
            reached (or is switched off) and the cache does not hold the snapshot.
    """
    path = Path(value)
    hub_id = None if isinstance(value, Path) or path.exists() else parse_hub_id(value)
    if hub_id is None:
        return path
    return _download(*hub_id)


def _download(repo_id: str, revision: str | None) -> Path:
    import httpx2
    from huggingface_hub import constants, snapshot_download

    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=list(HUB_FILES), ignore_patterns=["*/*"]
        )
    except (OSError, httpx2.TransportError) as exc:  # huggingface_hub's HTTP errors are OSErrors
        where = f"{repo_id}@{revision or 'main'} (Hub cache {constants.HF_HUB_CACHE})"
        raise MmzooError(f"{where}: {_advice(exc)}") from exc
    return Path(folder)


def _advice(exc: Exception) -> str:
    """What went wrong fetching a snapshot, and what to do, from huggingface_hub's error."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return "the repository is gated; accept its terms on the Hub, then log in with `hf auth login`"
    if isinstance(exc, RepositoryNotFoundError):
        return (
            "no such repository on the Hub and no such local directory; check the id, or log in "
            "with `hf auth login` if it is private"
        )
    if isinstance(exc, RevisionNotFoundError):
        return "the repository has no such revision; give an existing branch, tag or commit hash"
    if isinstance(exc, IncompleteSnapshotError):
        return "the cached snapshot is incomplete and the Hub cannot be reached; download it again online"
    if isinstance(exc, LocalEntryNotFoundError) and constants.HF_HUB_OFFLINE:
        return "not in the cache and HF_HUB_OFFLINE is set; download it online first, or unset HF_HUB_OFFLINE"
    if isinstance(exc, LocalEntryNotFoundError) or not isinstance(exc, OSError):
        return "not in the cache and the Hub cannot be reached; check the network (or HF_ENDPOINT) and retry"
    if isinstance(exc, HfHubHTTPError):
        return f"the Hub refused the download ({_first_line(exc)}); retry later or check HF_ENDPOINT"
    return f"cannot write the cache ({exc}); set HF_HOME or HF_HUB_CACHE to a writable directory"


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
