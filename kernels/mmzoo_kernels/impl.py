"""What one kernel implementation is: its op, backend name, function and where it runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

OPS = ("attention", "rotary", "rms_norm", "swiglu", "cross_entropy")


class KernelError(ValueError):
    """A kernel choice that cannot work (unknown op or backend, or not usable here), said in one line."""


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
