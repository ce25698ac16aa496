"""Kernel registry and dispatch: one entry per (op, backend), chosen at run time per device.

Implementations come from a collector that mmzoo's plugin manager installs
(:func:`set_collector`): every plugin's ``mmzoo_register_kernels`` hook, the built-in ones
included. Without mmzoo, the built-ins alone are registered. ``auto`` takes the first backend
in ``AUTO_ORDER`` (then any other registered one, by name) that runs on the tensors' device type
and is usable in this process. This package imports nothing from mmzoo.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable

from mmzoo_kernels.impl import OPS, KernelError, KernelImpl

# Preference for ``auto``: fastest first; ``reference`` (pure PyTorch) always works.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "attention": ("flash", "npu", "sdpa", "reference"),
    "rotary": ("npu", "triton", "reference"),
    "rms_norm": ("npu", "triton", "reference"),
    "swiglu": ("npu", "reference"),
    "cross_entropy": ("chunked", "reference"),
}


def _nearest(name: str, choices: Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


Register = Callable[[KernelImpl, str], None]  # (implementation, who registers it)

_impls: dict[tuple[str, str], tuple[KernelImpl, str]] | None = None
_chosen: dict[tuple[str, str], KernelImpl] = {}
_requested: dict[str, str] = {}
_collector: Callable[[Register], None] | None = None


def reset() -> None:
    """Forget registered implementations and choices."""
    global _impls
    _impls = None
    _chosen.clear()
    _requested.clear()


def set_collector(collect: Callable[[Register], None] | None) -> None:
    """Install what registers every implementation (mmzoo's plugin manager, through its hook).

    ``collect(register)`` calls ``register(impl, source)`` once per implementation; ``None``
    goes back to the built-ins alone.
    """
    global _collector
    _collector = collect
    reset()


def _builtins(register: Register) -> None:
    from mmzoo_kernels.builtin import register_builtins

    register_builtins(lambda impl: register(impl, "mmzoo_kernels"))


def _collect() -> dict[tuple[str, str], tuple[KernelImpl, str]]:
    global _impls
    if _impls is not None:
        return _impls
    impls: dict[tuple[str, str], tuple[KernelImpl, str]] = {}

    def register(impl: KernelImpl, source: str) -> None:
        if impl.op not in OPS:
            raise KernelError(f"plugin {source} registered a kernel for unknown op '{impl.op}'; ops: {OPS}")
        key = (impl.op, impl.backend)
        if key in impls:
            raise KernelError(
                f"kernel {impl.op}/{impl.backend} is registered by two plugins: {impls[key][1]} and {source}"
            )
        impls[key] = (impl, source)

    (_collector or _builtins)(register)
    _impls = impls
    return impls


def implementations(op: str) -> dict[str, KernelImpl]:
    """Backend name -> implementation of ``op``, in ``auto`` preference order."""
    impls = _collect()
    names = [b for b in AUTO_ORDER[op] if (op, b) in impls]
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
    if op not in OPS:
        raise KernelError(f"unknown kernel op '{op}'{_nearest(op, OPS)}; ops: {', '.join(OPS)}")
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
        **choices: op -> backend; ops not named keep their earlier choice (``auto`` at first).

    Returns:
        op -> chosen backend on ``device``, for every op.

    Raises:
        KernelError: unknown op or backend, or a requested backend that cannot run here (why).
    """
    device = device or default_device()
    for op in choices:
        if op not in OPS:
            raise KernelError(f"unknown kernel op '{op}'{_nearest(op, OPS)}; ops: {', '.join(OPS)}")
    picked = {op: _pick(op, backend, device) for op, backend in choices.items()}  # all or nothing
    for op, backend in choices.items():
        _requested[op] = backend
        for key in [key for key in _chosen if key[0] == op]:
            del _chosen[key]
        _chosen[(op, device)] = picked[op]
    return {op: get(op, device).backend for op in OPS}


def get(op: str, device: str = "cpu") -> KernelImpl:
    """The implementation in use for ``op`` on ``device`` (chosen on first use)."""
    impl = _chosen.get((op, device))
    if impl is None:
        impl = select(op, _requested.get(op, "auto"), device)
    return impl
