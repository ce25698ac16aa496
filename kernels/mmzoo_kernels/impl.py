"""What a kernel op is (a name and its reference) and what one implementation of it is."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


class KernelError(ValueError):
    """A kernel choice that cannot work (unknown op or backend, or not usable here), said in one line."""


def _always() -> str | None:
    return None


@dataclass(frozen=True)
class KernelOp:
    """One op: its name, its pure-PyTorch reference and the backends ``auto`` prefers.

    Registering an op registers its reference as the backend ``reference``; other backends
    register as :class:`KernelImpl` under the op's name.

    Attributes:
        name: the op's name (``kernels.<name>`` in configs), e.g. ``"layer_norm"``.
        reference: the numerical truth every backend is tested against; runs everywhere.
        auto_order: backends ``auto`` tries before ``reference``, fastest first; any other
            backend is used only when named.
    """

    name: str
    reference: Callable
    auto_order: tuple[str, ...] = ()


@dataclass(frozen=True)
class KernelImpl:
    """One implementation of one op.

    Attributes:
        op: the op's name (a registered :class:`KernelOp`).
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
