"""mmzoo kernels: accelerator ops with run-time backend dispatch (import name ``mmzoo_kernels``).

Models call :mod:`mmzoo_kernels.ops` (:func:`call` for an op a plugin registered);
:mod:`mmzoo_kernels.registry` picks the implementation.
"""

from mmzoo_kernels.ops import (
    attention,
    call,
    cross_entropy,
    gelu,
    layer_norm,
    pad,
    rms_norm,
    rotary,
    swiglu,
    unpad,
)
from mmzoo_kernels.registry import KernelError, KernelImpl, KernelOp, configure

__all__ = [
    "KernelError",
    "KernelImpl",
    "KernelOp",
    "attention",
    "call",
    "configure",
    "cross_entropy",
    "gelu",
    "layer_norm",
    "pad",
    "rms_norm",
    "rotary",
    "swiglu",
    "unpad",
]
