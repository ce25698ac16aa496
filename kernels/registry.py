"""Kernel registry and dispatch: one entry per (op, backend), chosen at run time.

Implementations come from plugins through the ``mmzoo_register_kernels`` hook (the built-in
ones included). ``auto`` takes the first usable backend in ``AUTO_ORDER``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

OPS = ("attention", "rms_norm", "rotary", "swiglu")

# Preference for ``auto``: fastest first; ``reference`` (pure PyTorch) always works.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "attention": ("flash", "npu", "sdpa", "reference"),
    "rms_norm": ("npu", "triton", "reference"),
    "rotary": ("npu", "triton", "reference"),
    "swiglu": ("npu", "reference"),
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
        unavailable: returns ``None`` when usable here, else the reason it is not.
    """

    op: str
    backend: str
    fn: Callable
    unavailable: Callable[[], str | None] = field(default=_always)


_impls: dict[tuple[str, str], tuple[KernelImpl, str]] | None = None
_chosen: dict[str, KernelImpl] = {}
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


def backends(op: str) -> dict[str, str | None]:
    """Backend name -> ``None`` if usable here, else why not."""
    return {backend: impl.unavailable() for (o, backend), (impl, _) in _collect().items() if o == op}


def select(op: str, backend: str = "auto") -> KernelImpl:
    """Choose the implementation of ``op``; an unusable requested backend is an error saying why."""
    from mmzoo.errors import MmzooError, nearest

    impls = _collect()
    if backend == "auto":
        for name in AUTO_ORDER[op] + tuple(sorted(b for (o, b) in impls if o == op)):
            entry = impls.get((op, name))
            if entry is not None and entry[0].unavailable() is None:
                _chosen[op] = entry[0]
                return entry[0]
        raise MmzooError(f"no usable implementation of kernel '{op}'")
    entry = impls.get((op, backend))
    if entry is None:
        names = [b for (o, b) in impls if o == op]
        raise MmzooError(
            f"kernels.{op}: no backend '{backend}'{nearest(backend, names)}; registered: {', '.join(names)}"
        )
    reason = entry[0].unavailable()
    if reason is not None:
        raise MmzooError(f"kernels.{op}: backend '{backend}' is unavailable here: {reason}")
    _chosen[op] = entry[0]
    return entry[0]


def configure(**choices: str) -> dict[str, str]:
    """Set the backend per op (``auto`` or a name); returns op -> chosen backend."""
    for op, backend in choices.items():
        if op not in OPS:
            from mmzoo.errors import MmzooError, nearest

            raise MmzooError(f"unknown kernel op '{op}'{nearest(op, OPS)}; ops: {', '.join(OPS)}")
        _requested[op] = backend
        _chosen.pop(op, None)
    return {op: get(op).backend for op in OPS}


def get(op: str) -> KernelImpl:
    """The implementation in use for ``op`` (chosen on first use)."""
    impl = _chosen.get(op)
    if impl is None:
        impl = select(op, _requested.get(op, "auto"))
    return impl
