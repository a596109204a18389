"""Sparse linear layers on packed weights in Triton: y = x @ W^T (+ bias) for M = 1..64 rows of x, with W in
the formats of ``sparsekit.formats`` (``nm_linear_reference`` / ``bitmap_linear_reference`` are the oracles).

Both kernels decode a tile of W into a dense register tile and multiply it with ``tl.dot`` (tensor cores on
a GPU for bf16/fp16, float32 accumulation; ``input_precision="ieee"`` for float32 inputs, so no TF32).
A program owns BLOCK_N output features and loops over the input features; every compressed byte of its rows
is read once per call and serves all M rows of x (BLOCK_M >= M, padded to 16 for the dot).

* ``nm_linear_kernel`` (N:M, any M <= 16 the format allows; 2-bit codes for M <= 4, 4-bit for M <= 16):
  per step it loads the kept values of BLOCK_G groups as a (BLOCK_N, BLOCK_G, K_P2) tile (K = M - N kept
  per group, padded to a power of two) and their index codes, and places them with a one-hot compare into
  a (BLOCK_N, BLOCK_G, M_P2) tile. x is loaded in the same padded (group, lane) order, lanes >= M masked to
  zero, so the padding columns meet zeros on both sides. The input features can be split over programs
  (``split_k``): partial sums then go to a float32 workspace with atomics and are rounded once at the end.
* ``bitmap_linear_kernel`` (64-column tiles): per step it loads BLOCK_T mask words per row, finds each
  non-zero's index with two prefix sums (tiles within the row, bits within the tile), starting from
  ``row_offsets[r]``, and loads the values it names (masked loads: pruned positions read nothing). A program
  walks its rows' tiles in order, so the input features are not split.

Not done: a persistent or stream-K grid, mma.sp (the 2:4 sparse tensor-core instruction); the CUDA C++
kernels (csrc/cuda/kernels/sparse_gemv.cuh) are the ones written for speed. Under ``TRITON_INTERPRET=1``
(CPU tensors) values and x are upcast to float32 right after loading: the interpreter's bf16 arithmetic is
wrong.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "nm_linear_kernel",
    "bitmap_linear_kernel",
    "launch_nm_linear",
    "launch_bitmap_linear",
    "MAX_ROWS",
]

# Rows of x the kernels take in one call; the dispatch sends more to the reference (decode + dense matmul).
MAX_ROWS = 64


# do_not_specialize: Triton would otherwise compile a variant for rows == 1 and for rows % 16 == 0, so a decode
# loop whose batch size changes would stall on compiles (and a CUDA graph capture would need each of them warm).
@triton.jit(do_not_specialize=["rows"])
def nm_linear_kernel(
    x_ptr,  # (rows, in_features), unit stride along in_features
    values_ptr,  # (out_features, kept_per_row) contiguous
    codes_ptr,  # (out_features, code_width) uint8 contiguous
    bias_ptr,  # (out_features,) or a dummy when HAS_BIAS is false
    out_ptr,  # (rows, out_features) x's dtype contiguous, or float32 workspace when ATOMIC
    rows,
    out_features,
    num_groups,  # in_features // M
    kept_per_row,
    code_width,
    stride_xm,
    groups_per_split,  # a multiple of BLOCK_G
    M: tl.constexpr,
    K: tl.constexpr,  # kept per group, M - N
    K_P2: tl.constexpr,
    M_P2: tl.constexpr,
    BITS: tl.constexpr,  # index code width: 2 or 4
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr,
    UPCAST: tl.constexpr,  # float32 operands for the dot: the interpreter, or float32 inputs
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = n < out_features
    n64 = n.to(tl.int64)
    mrow = tl.arange(0, BLOCK_M)
    m_in = mrow < rows
    gl = tl.arange(0, BLOCK_G)
    kk = tl.arange(0, K_P2)
    e = tl.arange(0, M_P2)

    g_begin = pid_k * groups_per_split
    g_end = tl.minimum(g_begin + groups_per_split, num_groups)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g0 in range(g_begin, g_end, BLOCK_G):
        g = g0 + gl
        g_in = g < g_end
        j = g[:, None] * K + kk[None, :]  # (BLOCK_G, K_P2): index of the kept value in its row
        slot_in = n_in[:, None, None] & (g_in[:, None] & (kk < K)[None, :])[None, :, :]
        # Values and codes are read exactly once: keep them out of L2's way.
        v = tl.load(values_ptr + n64[:, None, None] * kept_per_row + j[None, :, :], mask=slot_in, other=0.0,
                    eviction_policy="evict_first")
        if UPCAST:
            v = v.to(tl.float32)
        bit = j * BITS
        byte = tl.load(codes_ptr + n64[:, None, None] * code_width + (bit // 8)[None, :, :], mask=slot_in,
                       other=0, eviction_policy="evict_first")
        code = (byte.to(tl.int32) >> (bit % 8)[None, :, :]) & ((1 << BITS) - 1)
        # One-hot placement: lane e of a group takes the kept value whose code is e (codes in a group differ).
        hit = (code[:, :, :, None] == e[None, None, None, :]) & slot_in[:, :, :, None]
        w = tl.sum(tl.where(hit, v[:, :, :, None], 0.0), axis=2).to(v.dtype)  # one non-zero term: exact
        w = tl.reshape(w, (BLOCK_N, BLOCK_G * M_P2))

        col = g[:, None] * M + e[None, :]  # (BLOCK_G, M_P2), the same padded order as w
        x_in = m_in[:, None, None] & (g_in[:, None] & (e < M)[None, :])[None, :, :]
        xv = tl.load(x_ptr + mrow[:, None, None].to(tl.int64) * stride_xm + col[None, :, :], mask=x_in, other=0.0)
        if UPCAST:
            xv = xv.to(tl.float32)
        xv = tl.reshape(xv, (BLOCK_M, BLOCK_G * M_P2))
        if UPCAST:
            acc += tl.dot(xv, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(xv, tl.trans(w))

    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    out_offs = mrow[:, None].to(tl.int64) * out_features + n[None, :]
    inside = m_in[:, None] & n_in[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptr + out_offs, acc, mask=inside, sem="relaxed")
    else:
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["rows", "nnz"])
def bitmap_linear_kernel(
    x_ptr,  # (rows, in_features), unit stride along in_features
    bitmask_ptr,  # (out_features, num_tiles) int64 contiguous
    values_ptr,  # (nnz,)
    row_offsets_ptr,  # (out_features + 1,) int64
    bias_ptr,
    out_ptr,  # (rows, out_features) x's dtype contiguous
    rows,
    out_features,
    in_features,
    num_tiles,
    nnz,  # values.numel()
    stride_xm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,  # 64-column tiles per step
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = n < out_features
    n64 = n.to(tl.int64)
    mrow = tl.arange(0, BLOCK_M)
    m_in = mrow < rows
    t_lane = tl.arange(0, BLOCK_T)
    b = tl.arange(0, 64)

    # row_offsets is checked per row, not trusted: a row reads values only inside its span
    # [row_offsets[r], row_offsets[r + 1]) (memory safe for any row_offsets), and a row whose span is out of
    # [0, nnz], not 0 at row 0 or nnz at the last row, or not its popcount gets NaN outputs (a device assert
    # would need TRITON_DEBUG, and a host-visible error a sync).
    row_start = tl.load(row_offsets_ptr + n, mask=n_in, other=0)  # int64: the row's first non-zero
    row_end = tl.load(row_offsets_ptr + n + 1, mask=n_in, other=0)
    span_ok = (row_start >= 0) & (row_start <= row_end) & (row_end <= nnz)
    span_ok = span_ok & ((n != 0) | (row_start == 0)) & ((n != out_features - 1) | (row_end == nnz))
    base = tl.where(span_ok, row_start, 0)
    limit = tl.where(span_ok, row_end, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, num_tiles, BLOCK_T):
        t = t0 + t_lane
        tile_in = n_in[:, None] & (t < num_tiles)[None, :]
        mask = tl.load(bitmask_ptr + n64[:, None] * num_tiles + t[None, :], mask=tile_in, other=0,
                       eviction_policy="evict_first")
        # Bit b of the int64 word (bit 63 is the sign: the arithmetic shift still leaves it in bit 0).
        bits = ((mask[:, :, None] >> b[None, None, :]) & 1).to(tl.int32)  # (BLOCK_N, BLOCK_T, 64)
        # bits past in_features name no column and take no value (the reference ignores them)
        bits = tl.where((t[:, None] * 64 + b[None, :] < in_features)[None, :, :], bits, 0)
        count = tl.sum(bits, axis=2)  # popcount per tile
        tile_start = base[:, None] + (tl.cumsum(count, axis=1) - count).to(tl.int64)
        index = tile_start[:, :, None] + (tl.cumsum(bits, axis=2) - bits).to(tl.int64)
        w = tl.load(values_ptr + index, mask=(bits != 0) & (index < limit[:, None, None]), other=0.0,
                    eviction_policy="evict_first")
        if UPCAST:
            w = w.to(tl.float32)
        w = tl.reshape(w, (BLOCK_N, BLOCK_T * 64))
        base += tl.sum(count, axis=1).to(tl.int64)

        col = t[:, None] * 64 + b[None, :]
        x_in = m_in[:, None, None] & (col < in_features)[None, :, :]
        xv = tl.load(x_ptr + mrow[:, None, None].to(tl.int64) * stride_xm + col[None, :, :], mask=x_in, other=0.0)
        if UPCAST:
            xv = xv.to(tl.float32)
        xv = tl.reshape(xv, (BLOCK_M, BLOCK_T * 64))
        if UPCAST:
            acc += tl.dot(xv, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(xv, tl.trans(w))

    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    row_ok = span_ok & (base == row_end)  # the row's bits took exactly its span's values
    tl.device_assert(row_ok | ~n_in, "sparsekit::bitmap_linear: row_offsets does not match the bitmask")
    acc = tl.where(row_ok[None, :], acc, float("nan"))
    out_offs = mrow[:, None].to(tl.int64) * out_features + n[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


# ----------------------------------------------------------------------------------------------------
# Launchers: tensors already checked (sparsekit.kernels.triton.dispatch checks them), x 2-D with
# rows <= MAX_ROWS. Block sizes are arguments so the tests can cover every path on small shapes.
# ----------------------------------------------------------------------------------------------------
def _block_m(rows: int) -> int:
    return max(16, triton.next_power_of_2(rows))  # tl.dot needs >= 16 along every dimension


def launch_nm_linear(x2d, values, index_codes, n: int, m: int, in_features: int, bias, *, block_n: int,
                     block_g: int, split_k: int, num_warps: int = 4) -> torch.Tensor:
    """y = x2d @ W^T (+ bias), W N:M packed. x2d: (rows, in_features), rows <= MAX_ROWS, unit column stride.

    block_g groups per step (a power of two; block_g * next_pow2(m) >= 16); split_k > 1 splits the groups
    over programs and sums in a float32 workspace (atomics: the last bits may vary from run to run).
    """
    if block_g < 1 or block_g & (block_g - 1) or block_g * triton.next_power_of_2(m) < 16:
        raise ValueError(f"launch_nm_linear: block_g must be a power of two with block_g * next_pow2(m) >= 16 "
                         f"(tl.dot's minimum on a GPU), got block_g={block_g} for m={m}")
    rows = x2d.shape[0]
    out_features, kept_per_row = values.shape
    y = torch.empty((rows, out_features), dtype=x2d.dtype, device=x2d.device)
    if rows == 0 or out_features == 0:
        return y
    if in_features == 0:
        return y.copy_(bias.expand(rows, -1)) if bias is not None else y.zero_()
    num_groups = in_features // m
    kept = m - n
    split_k = max(1, min(split_k, triton.cdiv(num_groups, block_g)))
    groups_per_split = triton.cdiv(triton.cdiv(num_groups, split_k), block_g) * block_g
    split_k = triton.cdiv(num_groups, groups_per_split)
    atomic = split_k > 1
    out = torch.zeros((rows, out_features), dtype=torch.float32, device=x2d.device) if atomic else y
    grid = (triton.cdiv(out_features, block_n), split_k)
    nm_linear_kernel[grid](
        x2d, values, index_codes, bias if bias is not None else values, out,
        rows, out_features, num_groups, kept_per_row, index_codes.shape[1], x2d.stride(0), groups_per_split,
        M=m, K=kept, K_P2=triton.next_power_of_2(kept), M_P2=triton.next_power_of_2(m),
        BITS=2 if m <= 4 else 4,
        BLOCK_M=_block_m(rows), BLOCK_N=block_n, BLOCK_G=block_g,
        HAS_BIAS=bias is not None, ATOMIC=atomic, UPCAST=x2d.device.type != "cuda" or x2d.dtype == torch.float32,
        num_warps=num_warps,
    )
    return y.copy_(out) if atomic else y


def launch_bitmap_linear(x2d, bitmask, values, row_offsets, in_features: int, bias, *, block_n: int,
                         block_t: int, num_warps: int = 4) -> torch.Tensor:
    """y = x2d @ W^T (+ bias), W bitmap packed. x2d: (rows, in_features), rows <= MAX_ROWS, unit column
    stride. block_t tiles of 64 columns per step (a power of two)."""
    rows = x2d.shape[0]
    out_features, num_tiles = bitmask.shape
    y = torch.empty((rows, out_features), dtype=x2d.dtype, device=x2d.device)
    if rows == 0 or out_features == 0:
        return y
    grid = (triton.cdiv(out_features, block_n),)
    bitmap_linear_kernel[grid](
        x2d, bitmask, values, row_offsets, bias if bias is not None else values, y,
        rows, out_features, in_features, num_tiles, values.numel(), x2d.stride(0),
        BLOCK_M=_block_m(rows), BLOCK_N=block_n, BLOCK_T=block_t,
        HAS_BIAS=bias is not None, UPCAST=x2d.device.type != "cuda" or x2d.dtype == torch.float32,
        num_warps=num_warps,
    )
    return y
