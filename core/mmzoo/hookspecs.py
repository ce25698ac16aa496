"""Every hook mmzoo calls. Plugins implement them with ``@mmzoo.hookimpl``.

Registration hooks receive a ``register`` callback instead of returning values, so the
core can validate each entry and record which plugin supplied it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from mmzoo.registry import ModelSpec
    from mmzoo_kernels.registry import KernelImpl, KernelOp

hookspec = pluggy.HookspecMarker("mmzoo")


@hookspec
def mmzoo_register_models(register: Callable[[ModelSpec], None]) -> None:
    """Register model families.

    Called once, the first time the model registry is used. Call ``register(spec)`` once
    per :class:`mmzoo.registry.ModelSpec`. Every implementation runs; a model name that two
    plugins register is an error naming both.
    """


@hookspec
def mmzoo_register_kernels(register: Callable[[KernelOp | KernelImpl], None]) -> None:
    """Register kernel ops and implementations (attention, rotary, RMSNorm, LayerNorm, ...).

    Called once, the first time a kernel is dispatched. Call ``register(op)`` once per new
    :class:`mmzoo_kernels.registry.KernelOp` (its name and reference implementation) and
    ``register(impl)`` once per :class:`mmzoo_kernels.registry.KernelImpl` (a backend of any
    registered op, another plugin's too). Every implementation runs; an op, or an (op, backend)
    pair, registered twice is an error naming both plugins.
    """
