"""The glue that registers the built-in kernels through mmzoo's hook, like any third-party backend.

The only module of this package that imports mmzoo.
"""

from __future__ import annotations

from mmzoo.plugins import hookimpl
from mmzoo_kernels.builtin import register_builtins


@hookimpl
def mmzoo_register_kernels(register):
    register_builtins(register)
