"""The built-in ops and their implementations, as one registration function."""

from __future__ import annotations

from collections.abc import Callable

from mmzoo_kernels import chunked, flash, native, npu, reference, sdpa, triton_ops
from mmzoo_kernels.impl import KernelImpl, KernelOp

# ``auto`` tries these backends first (fastest first), then ``reference``, which always works.
BUILTIN_OPS = (
    KernelOp("attention", reference.attention, ("flash", "npu", "sdpa")),
    KernelOp("rotary", reference.rotary, ("npu", "triton")),
    KernelOp("rms_norm", reference.rms_norm, ("npu", "triton")),
    KernelOp("layer_norm", reference.layer_norm, ("native",)),
    KernelOp("swiglu", reference.swiglu, ("npu",)),
    KernelOp("gelu", reference.gelu),
    KernelOp("cross_entropy", reference.cross_entropy, ("chunked",)),
)


def register_builtins(register: Callable[[KernelOp | KernelImpl], None]) -> None:
    """Register the built-in ops (with their references) and the SDPA, chunked, native,
    flash-attn, Triton and NPU implementations."""
    for op in BUILTIN_OPS:
        register(op)
    register(KernelImpl("attention", "sdpa", sdpa.attention))
    register(KernelImpl("cross_entropy", "chunked", chunked.cross_entropy))
    register(KernelImpl("layer_norm", "native", native.layer_norm))
    register(KernelImpl("attention", "flash", flash.attention, flash.unavailable, devices=("cuda",)))
    for name in ("rotary", "rms_norm"):
        register(
            KernelImpl(
                name,
                "triton",
                getattr(triton_ops, name),
                triton_ops.unavailable,
                devices=triton_ops.devices(),
            )
        )
    for name in ("attention", "rotary", "rms_norm", "swiglu"):
        register(KernelImpl(name, "npu", getattr(npu, name), npu.unavailable, devices=("npu",)))
