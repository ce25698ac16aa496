"""mmzoo kernels: accelerator ops with run-time backend dispatch (import name ``mmzoo_kernels``).

Models call :mod:`mmzoo_kernels.ops`; :mod:`mmzoo_kernels.registry` picks the implementation.
"""

from mmzoo_kernels.ops import attention, cross_entropy, pad, rms_norm, rotary, swiglu, unpad
from mmzoo_kernels.registry import KernelError, configure

__all__ = [
    "KernelError",
    "attention",
    "configure",
    "cross_entropy",
    "pad",
    "rms_norm",
    "rotary",
    "swiglu",
    "unpad",
]
