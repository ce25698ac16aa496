"""Kernel registry and dispatch: ops, and one entry per (op, backend), chosen at run time per device.

Ops (:class:`KernelOp`: a name and its reference) and implementations (:class:`KernelImpl`)
come from a collector that mmzoo's plugin manager installs (:func:`set_collector`): every
plugin's ``mmzoo_register_kernels`` hook, the built-in ones included, so a plugin can add an op
as well as backends for any op. Without mmzoo, the built-ins alone are registered. ``auto``
takes the first backend in the op's ``auto_order``, then ``reference``, that runs on the
tensors' device type and is usable in this process. This package imports nothing from mmzoo.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mmzoo_kernels.impl import KernelError, KernelImpl, KernelOp


def _nearest(name: str, choices: Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


Register = Callable[[KernelOp | KernelImpl, str], None]  # (op or implementation, who registers it)


@dataclass
class _Table:
    """Everything registered: op name -> (op, source), (op, backend) -> (impl, source)."""

    ops: dict[str, tuple[KernelOp, str]] = field(default_factory=dict)
    impls: dict[tuple[str, str], tuple[KernelImpl, str]] = field(default_factory=dict)

    def add(self, entry: KernelOp | KernelImpl, source: str) -> None:
        if isinstance(entry, KernelOp):
            if entry.name in self.ops:
                raise KernelError(
                    f"kernel op '{entry.name}' is registered by two plugins: "
                    f"{self.ops[entry.name][1]} and {source}"
                )
            self.ops[entry.name] = (entry, source)
            entry = KernelImpl(entry.name, "reference", entry.reference)
        elif not isinstance(entry, KernelImpl):
            raise KernelError(f"plugin {source} registered {entry!r}; expected a KernelOp or a KernelImpl")
        key = (entry.op, entry.backend)
        if key in self.impls:
            first = self.impls[key][1]
            raise KernelError(
                f"kernel {entry.op}/{entry.backend} is registered by two plugins: {first} and {source}"
            )
        self.impls[key] = (entry, source)

    def check(self) -> None:
        """Every implementation is of a registered op (plugins register in any order)."""
        for (op, backend), (_, source) in self.impls.items():
            if op not in self.ops:
                raise KernelError(
                    f"plugin {source} registered kernel {op}/{backend} for unknown op '{op}'"
                    f"{_nearest(op, self.ops)}; ops: {', '.join(self.ops)}"
                )


_table: _Table | None = None
_chosen: dict[tuple[str, str], KernelImpl] = {}
_requested: dict[str, str] = {}
_collector: Callable[[Register], None] | None = None


def reset() -> None:
    """Forget registered ops, implementations and choices."""
    global _table
    _table = None
    _chosen.clear()
    _requested.clear()


def set_collector(collect: Callable[[Register], None] | None) -> None:
    """Install what registers every op and implementation (mmzoo's plugin manager, through its hook).

    ``collect(register)`` calls ``register(entry, source)`` once per :class:`KernelOp` or
    :class:`KernelImpl`; ``None`` goes back to the built-ins alone.
    """
    global _collector
    _collector = collect
    reset()


def _builtins(register: Register) -> None:
    from mmzoo_kernels.builtin import register_builtins

    register_builtins(lambda entry: register(entry, "mmzoo_kernels"))


def _collect() -> _Table:
    global _table
    if _table is None:
        table = _Table()
        (_collector or _builtins)(table.add)
        table.check()
        _table = table
    return _table


def ops() -> tuple[str, ...]:
    """The names of every registered op, in registration order."""
    return tuple(_collect().ops)


def _op(name: str) -> KernelOp:
    registered = _collect().ops
    if name not in registered:
        raise KernelError(
            f"unknown kernel op '{name}'{_nearest(name, registered)}; ops: {', '.join(registered)}"
        )
    return registered[name][0]


def implementations(op: str) -> dict[str, KernelImpl]:
    """Backend name -> implementation of ``op``: its ``auto_order``, ``reference``, then the rest by name."""
    impls = _collect().impls
    names = [b for b in (*_op(op).auto_order, "reference") if (op, b) in impls]
    names += sorted(b for (o, b) in impls if o == op and b not in names)
    return {b: impls[(op, b)][0] for b in names}


def why_not(impl: KernelImpl, device: str) -> str | None:
    """``None`` when ``impl`` can run on ``device`` here, else the reason it cannot."""
    if not impl.runs_on(device):
        return f"runs on {', '.join(impl.devices or ())}, not {device}"
    return impl.unavailable()


def backends(op: str, device: str | None = None) -> dict[str, str | None]:
    """Backend name -> ``None`` if usable here (on ``device`` when given), else why not."""
    return {
        b: (impl.unavailable() if device is None else why_not(impl, device))
        for b, impl in implementations(op).items()
    }


def select(op: str, backend: str = "auto", device: str = "cpu") -> KernelImpl:
    """Choose the implementation of ``op`` on ``device`` and use it from now on.

    A requested backend that is not registered, or cannot run here, is an error saying why.
    """
    impl = _pick(op, backend, device)
    _chosen[(op, device)] = impl
    return impl


def _pick(op: str, backend: str, device: str) -> KernelImpl:
    """:func:`select` without recording the choice."""
    impls = implementations(op)
    if backend == "auto":
        reasons = []
        for name, candidate in impls.items():
            reason = why_not(candidate, device)
            if reason is None:
                return candidate
            reasons.append(f"{name}: {reason}")
        raise KernelError(f"no usable implementation of kernel '{op}' on {device} ({'; '.join(reasons)})")
    impl = impls.get(backend)
    if impl is None:
        raise KernelError(
            f"kernels.{op}: no backend '{backend}'{_nearest(backend, impls)}; registered: {', '.join(impls)}"
        )
    reason = why_not(impl, device)
    if reason is not None:
        raise KernelError(f"kernels.{op}: backend '{backend}' is unavailable on {device}: {reason}")
    return impl


def default_device() -> str:
    """The accelerator of this process if any (``npu``, ``cuda``), else ``cpu``."""
    import torch

    npu = getattr(torch, "npu", None)
    if npu is not None and npu.is_available():
        return "npu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def configure(*, device: str | None = None, **choices: str) -> dict[str, str]:
    """Set the backend per op (``auto`` or a name) and check it can run.

    Args:
        device: device type to choose for (default: this process's accelerator, else cpu);
            ops called on tensors of another device choose for that device on first use.
        **choices: op -> backend, for any registered op (a plugin's too); ops not named keep
            their earlier choice (``auto`` at first).

    Returns:
        op -> chosen backend on ``device``, for every registered op.

    Raises:
        KernelError: unknown op or backend, or a requested backend that cannot run here (why).
    """
    device = device or default_device()
    for op in choices:
        _op(op)
    picked = {op: _pick(op, backend, device) for op, backend in choices.items()}  # all or nothing
    for op, backend in choices.items():
        _requested[op] = backend
        for key in [key for key in _chosen if key[0] == op]:
            del _chosen[key]
        _chosen[(op, device)] = picked[op]
    return {op: get(op, device).backend for op in ops()}


def get(op: str, device: str = "cpu") -> KernelImpl:
    """The implementation in use for ``op`` on ``device`` (chosen on first use)."""
    impl = _chosen.get((op, device))
    if impl is None:
        impl = select(op, _requested.get(op, "auto"), device)
    return impl
