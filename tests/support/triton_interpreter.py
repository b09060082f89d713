"""Two fixes to Triton 3.6's CPU interpreter, which the tests use to run kernels without a GPU.

1. It keeps scalars as 1-element arrays and converts them with ``int(array)``, which NumPy >= 2.3
   rejects for arrays with a dimension, breaking any ``range(lo, hi)`` whose bounds come from memory:
   ``__index__`` now takes the single element explicitly.
2. Its ``dot`` multiplies bfloat16 operands as their raw uint16 bit patterns: bfloat16 operands are now
   converted to float32 first (exact), as the GPU's matrix units do.

Test-only; compiled (GPU) kernels are unaffected.
"""

from __future__ import annotations


def patch_interpreter_scalars() -> None:
    try:
        import triton.runtime.interpreter as interpreter
    except ImportError:
        return
    original = interpreter._patch_lang_tensor
    if getattr(original, "_pdserve_patched", False):
        return

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._pdserve_patched = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched

    import numpy as np
    import triton.language as tl

    builder_cls = interpreter.InterpreterBuilder
    original_dot = builder_cls.create_dot

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # type: ignore[no-untyped-def]
        def upcast(x):  # type: ignore[no-untyped-def]
            if x.dtype.scalar != tl.bfloat16:
                return x
            data = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)

        return original_dot(self, upcast(a), upcast(b), d, input_precision, max_num_imprecise_acc)

    builder_cls.create_dot = dot
