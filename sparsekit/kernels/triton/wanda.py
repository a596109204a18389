"""Wanda importance (Sun et al. 2023, eq. 1) in Triton: score_ij = |W_ij| * sqrt(sq_norm_j), float32.

The result is the correctly rounded float32 product of |W_ij| and the correctly rounded float32 root:
|W| is exact in any float dtype (fp16/bf16/float64 are converted to float32 first, as the reference's
``.float()`` does), ``tl.sqrt_rn`` rounds correctly (``tl.sqrt`` may lower to an approximation on GPU),
and the product is one rounding. ``wanda_score_reference`` agrees wherever torch's float32 sqrt is
correctly rounded; torch's CPU sqrt is sometimes one ulp off. Each program reads its columns' norms once and
reuses them for BLOCK_R rows.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["wanda_score_kernel"]


@triton.jit
def wanda_score_kernel(
    weight_ptr,
    sq_norm_ptr,  # (cols,) float32
    out_ptr,  # (rows, cols) float32, contiguous
    rows,
    cols,
    stride_r,
    stride_c,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < cols
    inside = (r < rows)[:, None] & c_in[None, :]

    norm = tl.sqrt_rn(tl.load(sq_norm_ptr + c, mask=c_in, other=0.0))
    w_ptrs = weight_ptr + r.to(tl.int64)[:, None] * stride_r + c.to(tl.int64)[None, :] * stride_c
    # Weights are read exactly once: keep them out of L2's way.
    w = tl.load(w_ptrs, mask=inside, other=0.0, eviction_policy="evict_first").to(tl.float32)
    score = tl.abs(w) * norm[None, :]
    tl.store(out_ptr + r.to(tl.int64)[:, None] * cols + c[None, :], score, mask=inside)
