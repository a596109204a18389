"""N:M keep-mask in Triton: in every group of ``m`` consecutive columns of a row, prune the ``n`` lowest.

Semantics are those of ``sparsekit.ops.reference.nm_mask_reference`` (a stable ascending sort of each group,
the first ``n`` pruned), computed without sorting: an element's position in that sort is

    rank_j = #{k : s_k < s_j} + #{k < j : s_k == s_j}      (k, j inside one group; NaN is largest)

and it is kept iff ``rank_j >= n``. The tile is (BLOCK_R rows, BLOCK_G groups, M_P2 >= m lanes), so a group
sits in one thread's registers and picking its k-th member (``tl.sum`` over a one-hot ``tl.where``) folds
to a register move: O(m) integer operations per element, no extra memory traffic. A thread's loads are one
group wide (16 bytes for 4:8 bf16 or 2:4 float32, only 4-8 bytes for 2:4 bf16): loading a flat row tile and
reshaping it into groups made Triton convert layouts through shared memory without widening the loads.

Scores are compared as integer order keys built from their bits (``order_key``), not as floats, so the
ranking is exact whatever the float mode: flush-to-zero cannot merge distinct denormals, -0.0 ties with
+0.0 as in ``torch.sort``, and every NaN ties with every other NaN above +inf.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["order_key", "nm_mask_kernel"]


@triton.jit
def order_key(v):
    """Integer key with the order of ``torch.sort`` on floats: key(a) < key(b) iff a sorts before b.

    v: float16/bfloat16/float32 (int32 keys) or float64 (int64 keys), as loaded. Sign-magnitude bits become
    two's complement (-0.0 and +0.0 both map to 0); every NaN, whatever its sign or payload, maps to
    key(+inf) + 1, which leaves room for the ``key + 1`` of the tie-break below without overflow. Keys come
    from the bits alone: no float compare or conversion can flush a denormal (the interpreter's
    bf16 -> float32 conversion does), and 16-bit keys are the same map on their own bits.
    """
    if v.dtype == tl.float64:
        bits = v.to(tl.int64, bitcast=True)
        mag = bits & 0x7FFFFFFFFFFFFFFF
        inf_bits = 0x7FF0000000000000
    elif v.dtype == tl.float32:
        bits = v.to(tl.int32, bitcast=True)
        mag = bits & 0x7FFFFFFF
        inf_bits = 0x7F800000
    else:
        bits = v.to(tl.int16, bitcast=True).to(tl.int32)  # sign-extended: bits < 0 iff the sign bit is set
        mag = bits & 0x7FFF
        if v.dtype == tl.float16:
            inf_bits = 0x7C00
        else:
            inf_bits = 0x7F80
    key = tl.where(bits < 0, -mag, mag)
    return tl.where(mag > inf_bits, inf_bits + 1, key)


@triton.jit
def nm_mask_kernel(
    score_ptr,
    keep_ptr,  # uint8 view of the bool output, (rows, cols) contiguous
    rows,
    num_groups,  # cols // M
    stride_r,
    stride_c,
    n,
    M: tl.constexpr,
    M_P2: tl.constexpr,  # next power of two >= M; lanes >= M are padding
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, M_P2)
    col = g[:, None] * M + j[None, :]  # (BLOCK_G, M_P2)
    inside = (r < rows)[:, None, None] & ((g < num_groups)[:, None] & (j < M)[None, :])[None, :, :]

    ptrs = score_ptr + r.to(tl.int64)[:, None, None] * stride_r + col.to(tl.int64)[None, :, :] * stride_c
    key = order_key(tl.load(ptrs, mask=inside, other=0.0))

    lane = j[None, None, :]
    rank = tl.zeros((BLOCK_R, BLOCK_G, M_P2), dtype=tl.int32)
    for k in tl.static_range(M):
        other = tl.sum(tl.where(lane == k, key, 0), axis=2)[:, :, None]  # member k of each group
        # Member k sorts before lane j iff other < key, or other == key and k < j (stable): other < key + (j > k).
        rank += (other < key + (lane > k).to(key.dtype)).to(tl.int32)
    keep = rank >= n

    out = keep_ptr + r.to(tl.int64)[:, None, None] * (num_groups * M) + col[None, :, :]
    tl.store(out, keep.to(tl.uint8), mask=inside)
