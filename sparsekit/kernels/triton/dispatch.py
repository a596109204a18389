"""Entry points of the Triton backend: ``sparsekit._backends`` registers these on the CUDA dispatch key.

Each function takes exactly the op's arguments (see ``sparsekit.ops``), checks them with the same checks
as the public wrappers (``torch.ops.sparsekit.*`` is reachable without the wrapper, and a kernel given a
bad shape writes out of bounds), allocates the output, picks block sizes and launches one kernel.

They run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the test suite's way to check
them without a GPU). Block sizes differ between the two: a GPU wants many small programs to fill its SMs,
the interpreter few large ones (its cost is per program and per operation).
"""

from __future__ import annotations

import functools
import math

import torch
import triton

from ...ops import (
    _check_bitmap_linear,
    _check_channel_stats,
    _check_nm,
    _check_nm_linear,
    _check_sqnorm,
    _check_wanda,
)
from ...ops.reference import bitmap_linear_reference, nm_linear_reference, nm_mask_reference
from .channel_stats import channel_stats_kernel
from .masks import nm_mask_kernel
from .sparse_gemv import MAX_ROWS as SPARSE_GEMV_MAX_ROWS
from .sparse_gemv import launch_bitmap_linear, launch_nm_linear
from .wanda import wanda_score_kernel

__all__ = [
    "nm_mask",
    "wanda_score",
    "channel_sqnorm_accumulate_",
    "channel_stats_accumulate_",
    "nm_linear",
    "bitmap_linear",
    "NM_MAX_M",
]

# Groups wider than this go to the plain-PyTorch reference: the kernel unrolls a loop over the group, and
# every N:M pattern with hardware or paper support (2:4, 4:8, 8:16) is far below it.
NM_MAX_M = 32

# channel statistics: programs launched per SM. More than the resident count, so that the last wave is short.
_PROGRAMS_PER_SM = 8


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: few programs


def _on_gpu(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


# ----------------------------------------------------------------------------------------------------
# Block sizes: (block along rows or outputs, block along columns, num_warps) per kernel, on a GPU or under
# the interpreter. Pure functions, so .ci/triton_sm90_check.py compiles exactly the configurations a GPU
# run launches.
# ----------------------------------------------------------------------------------------------------
def nm_mask_blocks(m: int, num_groups: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_G, num_warps) of nm_mask_kernel."""
    m_p2 = triton.next_power_of_2(m)
    block_r, block_g = (4, max(1, 256 // m_p2)) if on_gpu else (16, max(1, 1024 // m_p2))
    return block_r, min(block_g, triton.next_power_of_2(max(1, num_groups))), 4


def wanda_blocks(cols: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) of wanda_score_kernel."""
    return (8 if on_gpu else 64), min(256, triton.next_power_of_2(max(1, cols))), 4


def channel_stats_blocks(channels: int, element_size: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_C, num_warps) of channel_stats_kernel."""
    if on_gpu:
        # (32, 256) bf16 is 16 KB per iteration per program: 8 bf16 (16 bytes) per thread per load.
        block_t, block_c, num_warps = (32 if element_size == 2 else 16), 256, 8
    else:
        block_t, block_c, num_warps = 32, 256, 4
    return block_t, min(block_c, max(16, triton.next_power_of_2(channels))), num_warps


def nm_linear_blocks(rows: int, m: int, num_groups: int, on_gpu: bool,
                     element_size: int = 2) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_G, num_warps) of nm_linear_kernel; BLOCK_G * next_pow2(m) >= 16 (tl.dot's minimum).

    On a GPU, groups of 8 or 16 (4:8, 8:16) and float32 x (its dot runs on FMA units, in registers) take
    BLOCK_N = 32 and half the columns per step: the kernel's one-hot tile is (BLOCK_N, BLOCK_G, K_P2, M_P2),
    and with the bf16 2:4 sizes ptxas spilled 0.3-2.8 KB per thread for 4:8 and 8:16 and 40 KB for float32 at
    64 rows on sm_90 (.ci/triton_sm90_check.py)."""
    m_p2 = triton.next_power_of_2(m)
    if on_gpu:
        narrow = m_p2 >= 8 or element_size == 4
        block_n = 32 if rows <= 16 or narrow else 64
        cols = 128 if not narrow else (32 if m_p2 >= 8 and element_size == 4 else 64)
    else:
        block_n, cols = 32, 256
    block_g = max(max(1, 16 // m_p2), min(max(1, cols // m_p2), triton.next_power_of_2(max(1, num_groups))))
    return block_n, block_g, 4


def bitmap_linear_blocks(num_tiles: int, on_gpu: bool, element_size: int = 2) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_T, num_warps) of bitmap_linear_kernel. float32 on a GPU takes one tile per step (its
    FMA dot at 64 rows spilled with two on sm_90)."""
    block_n, block_t = (16, 1 if element_size == 4 else 2) if on_gpu else (32, 4)
    return block_n, min(block_t, triton.next_power_of_2(max(1, num_tiles))), 4


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask (bool, True = keep) pruning the ``n`` lowest of every ``m`` consecutive columns per row.

    score: (rows, cols) float16/bfloat16/float32/float64, any strides; cols % m == 0; 0 <= n < m.
    Bit-identical to ``nm_mask_reference`` (stable ranking, NaN largest). m > NM_MAX_M uses the reference.
    """
    _check_nm(score, n, m)
    if m > NM_MAX_M:
        return nm_mask_reference(score, n, m)
    rows, cols = score.shape
    keep = torch.empty((rows, cols), dtype=torch.bool, device=score.device)
    if keep.numel() == 0:
        return keep
    m_p2 = triton.next_power_of_2(m)
    num_groups = cols // m
    block_r, block_g, num_warps = nm_mask_blocks(m, num_groups, _on_gpu(score))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(num_groups, block_g))
    nm_mask_kernel[grid](
        score, keep.view(torch.uint8), rows, num_groups, score.stride(0), score.stride(1), n,
        M=m, M_P2=m_p2,
        BLOCK_R=block_r, BLOCK_G=block_g, num_warps=num_warps,
    )
    return keep


def wanda_score(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * sqrt(sq_norm_j) as float32 (rows, cols), correctly rounded (see ``wanda.py``).

    weight: (rows, cols) any float dtype, any strides; sq_norm: (cols,) float32.
    """
    _check_wanda(weight, sq_norm)
    rows, cols = weight.shape
    out = torch.empty((rows, cols), dtype=torch.float32, device=weight.device)
    if out.numel() == 0:
        return out
    sq_norm = sq_norm.contiguous()
    block_r, block_c, num_warps = wanda_blocks(cols, _on_gpu(weight))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    wanda_score_kernel[grid](
        weight, sq_norm, out, rows, cols, weight.stride(0), weight.stride(1),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )
    return out


def _launch_channel_stats(sq_acc: torch.Tensor, abs_acc: torch.Tensor | None, x: torch.Tensor) -> None:
    """sq_acc += sum_t x^2 and, unless abs_acc is None, abs_acc += sum_t |x|, from one read of x."""
    channels = x.shape[-1]
    x2d = x.reshape(-1, channels)
    if x2d.numel() == 0:
        return
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    tokens = x2d.shape[0]
    block_t, block_c, num_warps = channel_stats_blocks(channels, x2d.element_size(), _on_gpu(x2d))
    channel_blocks = triton.cdiv(channels, block_c)
    slabs = triton.cdiv(_num_sms(x2d.device) * _PROGRAMS_PER_SM, channel_blocks)
    slabs = max(1, min(slabs, triton.cdiv(tokens, block_t)))
    iters = triton.cdiv(triton.cdiv(tokens, slabs), block_t)  # row blocks per program
    grid = (channel_blocks, triton.cdiv(tokens, iters * block_t))
    with_abs = abs_acc is not None
    channel_stats_kernel[grid](
        x2d, sq_acc, abs_acc if with_abs else sq_acc, tokens, channels, x2d.stride(0), iters,
        WITH_ABS=with_abs, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps,
    )


def channel_sqnorm_accumulate_(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += sum over all leading dims of x.float()**2, per channel (in place).

    acc: (C,) float32 contiguous; x: (..., C) float32/float16/bfloat16. Reads x once. The float32 sums are
    added to acc with atomics, so the last bits may differ from run to run.
    """
    _check_sqnorm(acc, x)
    _launch_channel_stats(acc, None, x)
    return None


def channel_stats_accumulate_(sq_acc: torch.Tensor, abs_acc: torch.Tensor, x: torch.Tensor) -> None:
    """sq_acc += sum of x.float()**2 and abs_acc += sum of |x.float()| over all leading dims, per channel.

    sq_acc, abs_acc: (C,) float32 contiguous, not overlapping; x: (..., C) float32/float16/bfloat16. Reads x
    once. The float32 sums are added with atomics, so the last bits may differ from run to run.
    """
    _check_channel_stats(sq_acc, abs_acc, x)
    _launch_channel_stats(sq_acc, abs_acc, x)
    return None


# ----------------------------------------------------------------------------------------------------
# Sparse linear layers (sparse_gemv.py): decode for M = 1..SPARSE_GEMV_MAX_ROWS rows of x; more rows go to
# the reference (unpack once, then a dense matmul: the weight is no longer the main cost there).
# ----------------------------------------------------------------------------------------------------
# nm_linear on a GPU: programs per SM wanted before the input features are split over programs.
_GEMV_PROGRAMS_PER_SM = 2


def _rows_2d(x: torch.Tensor, in_features: int) -> torch.Tensor:
    x2d = x.reshape(math.prod(x.shape[:-1]), in_features)  # not (-1, in_features): that fails for in_features == 0
    return x2d if x2d.stride(-1) == 1 or x2d.shape[1] <= 1 else x2d.contiguous()


def nm_linear(x, values, index_codes, n: int, m: int, in_features: int, bias=None) -> torch.Tensor:
    """x @ W^T (+ bias) with W N:M packed (``sparsekit.formats``), float32 accumulation, x's dtype out.

    x: (..., in_features) float32/bfloat16/float16; values: (out, in_features / m * (m - n)); index_codes:
    uint8 (out, code width); bias: (out,) or None. More than 64 rows of x: the reference.
    """
    _check_nm_linear(x, values, index_codes, n, m, in_features, bias)
    out_features = values.shape[0]
    x2d = _rows_2d(x, in_features)
    rows = x2d.shape[0]
    if rows > SPARSE_GEMV_MAX_ROWS or in_features == 0:  # in_features == 0: y = bias, from the reference
        return nm_linear_reference(x, values, index_codes, n, m, in_features, bias)
    num_groups = in_features // m
    block_n, block_g, num_warps = nm_linear_blocks(rows, m, num_groups, _on_gpu(x2d), x2d.element_size())
    split_k = 1
    if _on_gpu(x2d):
        programs = triton.cdiv(out_features, block_n)
        split_k = triton.cdiv(_num_sms(x2d.device) * _GEMV_PROGRAMS_PER_SM, programs)
    y = launch_nm_linear(x2d, values.contiguous(), index_codes.contiguous(), n, m, in_features,
                         None if bias is None else bias.contiguous(), block_n=block_n, block_g=block_g,
                         split_k=split_k, num_warps=num_warps)
    return y.reshape(*x.shape[:-1], out_features)


def bitmap_linear(x, bitmask, values, row_offsets, in_features: int, bias=None) -> torch.Tensor:
    """x @ W^T (+ bias) with W bitmap packed (``sparsekit.formats``), float32 accumulation, x's dtype out.

    x: (..., in_features); bitmask: (out, ceil(in / 64)) int64; values: (nnz,); row_offsets: (out + 1,)
    int64, checked per row against the bitmask's popcounts (a broken row's outputs are NaN, and it reads no
    value outside its span); bias: (out,) or None. More than 64 rows: the reference, which does not read
    row_offsets (the values follow the bitmask in order).
    """
    _check_bitmap_linear(x, bitmask, values, row_offsets, in_features, bias)
    out_features, num_tiles = bitmask.shape
    x2d = _rows_2d(x, in_features)
    rows = x2d.shape[0]
    if rows > SPARSE_GEMV_MAX_ROWS or in_features == 0:  # in_features == 0: y = bias, from the reference
        return bitmap_linear_reference(x, bitmask, values, row_offsets, in_features, bias)
    block_n, block_t, num_warps = bitmap_linear_blocks(num_tiles, _on_gpu(x2d), x2d.element_size())
    y = launch_bitmap_linear(x2d, bitmask.contiguous(), values.contiguous(), row_offsets.contiguous(), in_features,
                             None if bias is None else bias.contiguous(), block_n=block_n, block_t=block_t,
                             num_warps=num_warps)
    return y.reshape(*x.shape[:-1], out_features)
