"""The built-in implementations of every op, as one registration function."""

from __future__ import annotations

from collections.abc import Callable

from mmzoo_kernels import chunked, flash, npu, reference, sdpa, triton_ops
from mmzoo_kernels.impl import OPS, KernelImpl


def register_builtins(register: Callable[[KernelImpl], None]) -> None:
    """Register the reference, SDPA, chunked, flash-attn, Triton and NPU implementations."""
    for op in OPS:
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
