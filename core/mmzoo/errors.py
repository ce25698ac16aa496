"""User-facing errors: one line that says what is wrong and what to do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from mmzoo_kernels import KernelError


class MmzooError(Exception):
    """An error caused by input (files, config, arguments, plugins) rather than a bug.

    The CLI prints it as one line and exits non-zero; ``--debug`` shows the traceback.
    """


# What the CLI prints as one line (exit 2) instead of a traceback.
USER_ERRORS = (MmzooError, KernelError)


def nearest(name: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or an empty string."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
