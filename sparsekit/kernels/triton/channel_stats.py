"""Per-channel sum of squares in Triton: acc_j += sum_t x_tj^2 (float32), the calibration statistic
Wanda needs (``sparsekit.ops.reference.channel_sqnorm_accumulate_reference_``).

x: (T, C) with unit stride along C, float32/float16/bfloat16. The grid is (channel blocks, row slabs):
each program sums an (iters * BLOCK_T, BLOCK_C) slab into a float32 register tile, reduces it over rows once
at the end, and adds BLOCK_C partials into ``acc`` with atomics (one atomic per channel per program).
x is read exactly once, coalesced along C, with ``evict_first`` since nothing reads it again. The atomic
order makes the last bits of ``acc`` vary between runs; the sum itself is float32 throughout, like the
reference's.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["channel_sqnorm_kernel"]


@triton.jit
def channel_sqnorm_kernel(
    x_ptr,
    acc_ptr,  # (C,) float32, updated in place
    T,
    C,
    stride_t,
    iters,  # row blocks per program: a program reads rows [pid_t * iters * BLOCK_T, ...) below T
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < C
    row_start = pid_t * iters * BLOCK_T

    part = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for i in range(iters):
        t = row_start + i * BLOCK_T + tl.arange(0, BLOCK_T)
        inside = (t < T)[:, None] & c_in[None, :]
        ptrs = x_ptr + t.to(tl.int64)[:, None] * stride_t + c[None, :]
        # Upcast right after the load (the interpreter's bf16 arithmetic is wrong; on GPU it is free).
        v = tl.load(ptrs, mask=inside, other=0.0, eviction_policy="evict_first").to(tl.float32)
        part += v * v
    tl.atomic_add(acc_ptr + c, tl.sum(part, axis=0), mask=c_in, sem="relaxed")
