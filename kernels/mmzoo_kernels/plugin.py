"""Built-in kernels, registered through the same hook as any third-party backend."""

from __future__ import annotations

from mmzoo.plugins import hookimpl
from mmzoo_kernels import chunked, flash, npu, reference, sdpa, triton_ops
from mmzoo_kernels.registry import KernelImpl


@hookimpl
def mmzoo_register_kernels(register):
    for op in ("attention", "rotary", "rms_norm", "swiglu", "cross_entropy"):
        register(KernelImpl(op, "reference", getattr(reference, op)))
    register(KernelImpl("attention", "sdpa", sdpa.attention))
    register(KernelImpl("cross_entropy", "chunked", chunked.cross_entropy))
    register(KernelImpl("attention", "flash", flash.attention, flash.unavailable, devices=("cuda",)))
    for op in ("rotary", "rms_norm"):
        register(
            KernelImpl(
                op, "triton", getattr(triton_ops, op), triton_ops.unavailable, devices=triton_ops.devices()
            )
        )
    for op in ("attention", "rotary", "rms_norm", "swiglu"):
        register(KernelImpl(op, "npu", getattr(npu, op), npu.unavailable, devices=("npu",)))
