"""Plain-PyTorch reference implementations of sparsekit's ops.

These run on any device and are the oracle every compiled kernel is tested against. They are also
registered as the ops' default (CompositeExplicitAutograd) implementation, used wherever no CPU C++,
Triton or CUDA kernel is live.

Mask convention everywhere in sparsekit: a mask is a ``torch.bool`` tensor of the weight's shape,
``True`` where the weight is KEPT.

Tie-breaking is pinned: scores are ranked with a *stable* ascending sort, and the lowest-ranked entries are
pruned, so among equal scores the one with the lower column index is pruned first. This is the Wanda
reference's rule for unstructured masks (``torch.sort(..., stable=True)``); sparsekit applies the same rule
to N:M groups so that every backend agrees bit for bit.
"""

from __future__ import annotations

import torch

__all__ = [
    "nm_mask_reference",
    "rowwise_prune_mask_reference",
    "wanda_score_reference",
    "channel_sqnorm_accumulate_reference_",
    "channel_stats_accumulate_reference_",
    "xtx_lower_blocks",
    "xtx_lower_accumulate_reference_",
]


def nm_mask_reference(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep-mask: in every group of ``m`` consecutive columns of each row, prune the ``n`` lowest.

    score: (rows, cols) floating, cols divisible by m; 0 <= n < m.
    Returns (rows, cols) bool, exactly ``m - n`` True per group. "N:M" follows the Wanda and SparseGPT
    references: N is the number of zeros in every M (2:4 and 4:8 read the same either way).
    """
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=-1, stable=True).indices
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], False)
    return keep.reshape(rows, cols)


def rowwise_prune_mask_reference(score: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """Per-row top-k keep-mask: prune the ``num_pruned`` lowest scores of each row (stable ranking).

    score: (rows, cols) floating; 0 <= num_pruned <= cols. Returns (rows, cols) bool with exactly
    ``cols - num_pruned`` True in each row. With a (1, numel) view this is one threshold per matrix.
    """
    rows, cols = score.shape
    keep = torch.ones_like(score, dtype=torch.bool)
    if num_pruned == 0:
        return keep
    order = torch.sort(score, dim=-1, stable=True).indices
    keep.scatter_(-1, order[:, :num_pruned], False)
    return keep


def wanda_score_reference(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda importance |W_ij| * ||X_j||_2 (Sun et al. 2023, eq. 1).

    weight: (out_features, in_features), any floating dtype. sq_norm: (in_features,) float32, the sum over
    all calibration tokens of x_j^2 (see ``channel_sqnorm_accumulate_``). Returns float32 (out, in).
    The norm is the square root of the accumulated squares: the score uses ||X_j||, not ||X_j||^2.
    The square root is correctly rounded (taken in float64, then rounded once): torch's vectorised float32
    sqrt can be one ulp off, and the compiled kernels (std::sqrt, __fsqrt_rn, tl.sqrt_rn) round correctly,
    so this makes every backend agree to the bit.
    """
    norm = sq_norm.double().sqrt().float()
    return weight.abs().float() * norm.unsqueeze(0)


def _tokens_by_channels(x: torch.Tensor) -> torch.Tensor:
    """x: (..., C) as (tokens, C); a 1-D x is one token. (reshape(-1, C) is ambiguous when C = 0.)"""
    return x.unsqueeze(0) if x.dim() == 1 else x.flatten(0, -2)


def channel_sqnorm_accumulate_reference_(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += sum over all leading dims of x.float()**2, per channel (last dim).

    acc: (C,) float32, updated in place. x: (..., C) float32/float16/bfloat16.
    """
    acc.add_(_tokens_by_channels(x).float().pow(2).sum(dim=0))


def channel_stats_accumulate_reference_(sq_acc: torch.Tensor, abs_acc: torch.Tensor, x: torch.Tensor) -> None:
    """sq_acc += sum of x.float()**2 and abs_acc += sum of |x.float()| over all leading dims, per channel.

    sq_acc, abs_acc: (C,) float32, updated in place. x: (..., C) float32/float16/bfloat16. This oracle reads x
    twice (and makes a float32 copy); the kernels read it once.
    """
    xf = _tokens_by_channels(x).float()
    sq_acc.add_(xf.pow(2).sum(dim=0))
    abs_acc.add_(xf.abs().sum(dim=0))


# X^T X is symmetric, so the reference accumulates only the block rows on and below the diagonal:
# (k + 1) / 2k of the full product's FLOPs (0.56 at k = 8); calibrate.mirror_lower_ fills the rest once per
# layer. This is what runs on GPUs (cuBLAS) and on CPUs without AVX-512; csrc/cpu/xtx.cpp is the CPU kernel.
XTX_MAX_BLOCKS = 8
XTX_MIN_BLOCK = 32  # narrower blocks only add GEMM calls; tiny widths still get >= 2 blocks (and tests)


def xtx_lower_blocks(channels: int, blocks: int | None = None) -> list[tuple[int, int]]:
    """Column ranges [start, end) cutting ``channels`` into ``blocks`` near-equal blocks (default:
    min(XTX_MAX_BLOCKS, channels // XTX_MIN_BLOCK), at least 1), widths rounded up to a multiple of 8."""
    if blocks is None:
        blocks = min(XTX_MAX_BLOCKS, channels // XTX_MIN_BLOCK)
    blocks = max(1, blocks)
    step = -(-channels // blocks)
    step = -(-step // 8) * 8
    return [(s, min(s + step, channels)) for s in range(0, channels, max(step, 1))]


def xtx_lower_accumulate_reference_(xtx: torch.Tensor, x: torch.Tensor, blocks: int | None = None) -> None:
    """xtx += x^T x (in float32) on and below the diagonal, x's leading dims flattened into rows.

    xtx: (C, C) float32, updated in place; x: (..., C) float32/float16/bfloat16. For each column block
    [s, e) of ``xtx_lower_blocks(C, blocks)``: ``xtx[s:e, :e] += x[:, s:e]^T x[:, :e]``, one addmm_ per block
    row, through views. Blocks above the diagonal are not written; the strict upper triangle holds partial
    sums inside the diagonal blocks and is valid only after ``calibrate.mirror_lower_``.
    """
    xf = _tokens_by_channels(x).float()
    for s, e in xtx_lower_blocks(xtx.shape[0], blocks):
        xtx[s:e, :e].addmm_(xf[:, s:e].t(), xf[:, :e])


# ----------------------------------------------------------------------------------------------------
# Sparse linear layers on packed weights (formats in sparsekit/formats): unpack, then a dense F.linear.
# ----------------------------------------------------------------------------------------------------
import torch.nn.functional as F  # noqa: E402

from ..formats.bitmap import BitmapPacked, unpack_bitmap  # noqa: E402
from ..formats.sparse24 import NMPacked, nm_indices_from_codes, unpack_nm  # noqa: E402

__all__ += ["nm_linear_reference", "bitmap_linear_reference", "nm_unpack_reference", "bitmap_unpack_reference",
            "nm_unpack_linear_reference", "bitmap_unpack_linear_reference"]


def nm_unpack_reference(values, index_codes, n, m, in_features):
    """The dense (out, in_features) weight of an N:M packed W (``sparsekit.formats.sparse24``), values' dtype.

    values: (out, in_features / m * (m - n)); index_codes: uint8 codes (``nm_index_codes``).
    ``unpack_nm`` after ``nm_indices_from_codes``.
    """
    indices = nm_indices_from_codes(index_codes, m, values.shape[1])
    return unpack_nm(NMPacked(values, indices, (values.shape[0], in_features), n, m))


def bitmap_unpack_reference(bitmask, values, row_offsets, in_features):
    """The dense (out, in_features) weight of a bitmap packed W (``sparsekit.formats.bitmap``), values' dtype.

    bitmask: (out, ceil(in_features / 64)) int64; values: (nnz,); row_offsets: (out + 1,) int64 (not read:
    the values follow the bitmask in row-major order). ``unpack_bitmap``.
    """
    return unpack_bitmap(BitmapPacked(bitmask, values, row_offsets, (bitmask.shape[0], in_features)))


def nm_linear_reference(x, values, index_codes, n, m, in_features, bias=None):
    """x @ W^T (+ bias) for an N:M packed W (``sparsekit.formats.sparse24``).

    x: (..., in_features); values: (out, in_features / m * (m - n)) x's dtype; index_codes: uint8 codes
    (``nm_index_codes``); bias: (out,) or None. Returns (..., out) in x's dtype, computed by
    ``F.linear`` in that dtype on the unpacked weight.
    """
    return F.linear(x, nm_unpack_reference(values, index_codes, n, m, in_features), bias)


def bitmap_linear_reference(x, bitmask, values, row_offsets, in_features, bias=None):
    """x @ W^T (+ bias) for a bitmap packed W (``sparsekit.formats.bitmap``).

    x: (..., in_features); bitmask: (out, ceil(in_features / 64)) int64; values: (nnz,) x's dtype;
    row_offsets: (out + 1,) int64; bias: (out,) or None. Returns (..., out) in x's dtype via ``F.linear``.
    """
    return F.linear(x, bitmap_unpack_reference(bitmask, values, row_offsets, in_features), bias)


# nm_unpack_linear / bitmap_unpack_linear compute the same product as nm_linear / bitmap_linear; they differ in
# how their kernels do it (a dense GEMM on decoded blocks), not in what they return.
nm_unpack_linear_reference = nm_linear_reference
bitmap_unpack_linear_reference = bitmap_linear_reference
