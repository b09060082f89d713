"""Triton kernels for the GPU path. Each has a torch reference it is tested against.

Importing this package never fails for lack of Triton; use :func:`triton_available` before calling
a kernel. Kernels run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests use
that to check them on machines without a GPU).
"""

from __future__ import annotations

import functools
import os


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
