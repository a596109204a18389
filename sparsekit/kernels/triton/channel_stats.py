"""Per-channel calibration statistics in Triton, reading x once (float32 sums):

* ``sq_acc_j += sum_t x_tj^2``: Wanda's ||X_j||^2 (``channel_sqnorm_accumulate_``);
* with ``WITH_ABS``, also ``abs_acc_j += sum_t |x_tj|``: the mean |activation| of contextual pruning
  (``channel_stats_accumulate_``).

References: ``sparsekit.ops.reference.channel_sqnorm_accumulate_reference_`` and
``channel_stats_accumulate_reference_``.

x: (T, C) with unit stride along C, float32/float16/bfloat16. The grid is (channel blocks, row slabs):
each program sums an (iters * BLOCK_T, BLOCK_C) slab into float32 register tiles, reduces them over rows
once at the end, and adds BLOCK_C partials per statistic into the accumulators with atomics (one atomic per
channel, statistic and program). x is read exactly once, coalesced along C, with ``evict_first`` since
nothing reads it again. The atomic order makes the last bits of the accumulators vary between runs; the
sums themselves are float32 throughout, like the reference's.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["channel_stats_kernel"]


@triton.jit
def channel_stats_kernel(
    x_ptr,
    sq_ptr,  # (C,) float32, updated in place
    abs_ptr,  # (C,) float32, updated in place when WITH_ABS (otherwise not touched)
    T,
    C,
    stride_t,
    iters,  # row blocks per program: a program reads rows [pid_t * iters * BLOCK_T, ...) below T
    WITH_ABS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < C
    row_start = pid_t * iters * BLOCK_T

    sq = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    ab = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for i in range(iters):
        t = row_start + i * BLOCK_T + tl.arange(0, BLOCK_T)
        inside = (t < T)[:, None] & c_in[None, :]
        ptrs = x_ptr + t.to(tl.int64)[:, None] * stride_t + c[None, :]
        # Upcast right after the load (the interpreter's bf16 arithmetic is wrong; on GPU it is free).
        v = tl.load(ptrs, mask=inside, other=0.0, eviction_policy="evict_first").to(tl.float32)
        sq += v * v
        if WITH_ABS:
            ab += tl.abs(v)
    tl.atomic_add(sq_ptr + c, tl.sum(sq, axis=0), mask=c_in, sem="relaxed")
    if WITH_ABS:
        tl.atomic_add(abs_ptr + c, tl.sum(ab, axis=0), mask=c_in, sem="relaxed")
