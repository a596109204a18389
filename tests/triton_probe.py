"""Whether Triton's CPU interpreter can run sparsekit's kernels on this machine (TRITON_INTERPRET=1)."""
from __future__ import annotations

import functools
import os

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a test dependency
    triton = None

if triton is not None:

    @triton.jit
    def _probe_kernel(x_ptr, n):
        acc = tl.load(x_ptr) * 0
        for i in range(n):  # a loop bound known only at run time, as the kernels' block loops
            acc += tl.load(x_ptr + i)
        tl.store(x_ptr, acc)


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> str | None:
    """Why the interpreter cannot run sparsekit's kernels here, or None (interpreter off, or it works).

    Triton 3.6's interpreter passes a scalar argument as a one-element array and calls int() on it, which
    numpy >= 2.5 refuses ("only 0-dimensional arrays can be converted to Python scalars"): every kernel with a
    runtime loop bound then fails, whatever the kernel. Triton 3.6 asks for numpy < 2.4 (the GPU machines'
    image has 2.5); compiled kernels on a GPU are not affected.
    """
    if triton is None or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return None
    import numpy
    import torch

    x = torch.ones(3)
    try:
        _probe_kernel[(1,)](x, 3)
    except Exception as e:  # noqa: BLE001
        # only the known failure is a reason to skip; anything else is left for the tests to show, loudly
        if "0-dimensional arrays" in str(e) and tuple(int(v) for v in numpy.__version__.split(".")[:2]) >= (2, 4):
            return (f"Triton {triton.__version__}'s interpreter cannot run a kernel with a runtime loop bound "
                    f"under numpy {numpy.__version__} (Triton 3.6 needs numpy < 2.4): {type(e).__name__}: "
                    f"{str(e)[:160]}")
    return None
