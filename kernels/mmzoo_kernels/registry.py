"""Kernel registry and dispatch: one entry per (op, backend), chosen at run time per device.

Implementations come from plugins through the ``mmzoo_register_kernels`` hook (the built-in
ones included). ``auto`` takes the first backend in ``AUTO_ORDER`` (then any other registered
one, by name) that runs on the tensors' device type and is usable in this process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

OPS = ("attention", "rotary", "rms_norm", "swiglu", "cross_entropy")

# Preference for ``auto``: fastest first; ``reference`` (pure PyTorch) always works.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "attention": ("flash", "npu", "sdpa", "reference"),
    "rotary": ("npu", "triton", "reference"),
    "rms_norm": ("npu", "triton", "reference"),
    "swiglu": ("npu", "reference"),
    "cross_entropy": ("chunked", "reference"),
}


def _always() -> str | None:
    return None


@dataclass(frozen=True)
class KernelImpl:
    """One implementation of one op.

    Attributes:
        op: one of ``OPS``.
        backend: implementation name, e.g. ``"reference"``, ``"sdpa"``.
        fn: the function (signature fixed per op, see ``mmzoo_kernels.ops``).
        unavailable: returns ``None`` when usable in this process, else the reason it is not
            (package missing, device missing).
        devices: device types (``torch.device.type``) it runs on; ``None``: any.
    """

    op: str
    backend: str
    fn: Callable
    unavailable: Callable[[], str | None] = field(default=_always)
    devices: tuple[str, ...] | None = None

    def runs_on(self, device: str) -> bool:
        return self.devices is None or device in self.devices


_impls: dict[tuple[str, str], tuple[KernelImpl, str]] | None = None
_chosen: dict[tuple[str, str], KernelImpl] = {}
_requested: dict[str, str] = {}


def reset() -> None:
    """Forget registered implementations and choices."""
    global _impls
    _impls = None
    _chosen.clear()
    _requested.clear()


def _collect() -> dict[tuple[str, str], tuple[KernelImpl, str]]:
    global _impls
    if _impls is not None:
        return _impls
    from mmzoo.errors import MmzooError
    from mmzoo.plugins import get_manager

    impls: dict[tuple[str, str], tuple[KernelImpl, str]] = {}
    for plugin, hook in get_manager().hookimpls("mmzoo_register_kernels"):

        def register(impl: KernelImpl, _label: str = plugin.label) -> None:
            if impl.op not in OPS:
                raise MmzooError(
                    f"plugin {_label} registered a kernel for unknown op '{impl.op}'; ops: {OPS}"
                )
            key = (impl.op, impl.backend)
            if key in impls:
                raise MmzooError(
                    f"kernel {impl.op}/{impl.backend} is registered by two plugins: "
                    f"{impls[key][1]} and {_label}"
                )
            impls[key] = (impl, _label)

        hook(register=register)
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
    from mmzoo.errors import MmzooError, nearest

    if op not in OPS:
        raise MmzooError(f"unknown kernel op '{op}'{nearest(op, OPS)}; ops: {', '.join(OPS)}")
    impls = implementations(op)
    if backend == "auto":
        reasons = []
        for name, candidate in impls.items():
            reason = why_not(candidate, device)
            if reason is None:
                return candidate
            reasons.append(f"{name}: {reason}")
        raise MmzooError(f"no usable implementation of kernel '{op}' on {device} ({'; '.join(reasons)})")
    impl = impls.get(backend)
    if impl is None:
        raise MmzooError(
            f"kernels.{op}: no backend '{backend}'{nearest(backend, impls)}; registered: {', '.join(impls)}"
        )
    reason = why_not(impl, device)
    if reason is not None:
        raise MmzooError(f"kernels.{op}: backend '{backend}' is unavailable on {device}: {reason}")
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
        MmzooError: unknown op or backend, or a requested backend that cannot run here (why).
    """
    from mmzoo.errors import MmzooError, nearest

    device = device or default_device()
    for op in choices:
        if op not in OPS:
            raise MmzooError(f"unknown kernel op '{op}'{nearest(op, OPS)}; ops: {', '.join(OPS)}")
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
