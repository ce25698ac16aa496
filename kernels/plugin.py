"""Built-in kernels, registered through the same hook as any third-party backend."""

from __future__ import annotations

from mmzoo.plugins import hookimpl
from mmzoo_kernels import reference, sdpa
from mmzoo_kernels.registry import KernelImpl


@hookimpl
def mmzoo_register_kernels(register):
    register(KernelImpl("attention", "reference", reference.attention))
    register(KernelImpl("attention", "sdpa", sdpa.attention))
    register(KernelImpl("rms_norm", "reference", reference.rms_norm))
    register(KernelImpl("rotary", "reference", reference.rotary))
    register(KernelImpl("swiglu", "reference", reference.swiglu))
