"""sparsekit's ops, each declared once with ``torch.library``.

Every op has exactly one schema (below), one fake (meta) implementation next to it, and a plain-PyTorch
default (``sparsekit.ops.reference``) registered as CompositeExplicitAutograd. Faster implementations
register per dispatch key on top of it:

* CPU C++   ``csrc/cpu/*.cpp``  -> ``TORCH_LIBRARY_IMPL(sparsekit, CPU, m)`` (extension ``sparsekit._C``)
* CUDA C++  ``csrc/cuda/*.cu``  -> ``TORCH_LIBRARY_IMPL(sparsekit, CUDA, m)`` (extension ``sparsekit._C_cuda``)
* Triton    ``sparsekit/kernels/triton`` -> the CUDA key, only where the CUDA extension is not loaded

Because everything goes through the dispatcher, the ops work under ``torch.compile``, fake tensors and
CUDA graphs. Call them through the checked Python wrappers (``nm_mask`` ...) which validate their
arguments and raise a ``ValueError`` naming the problem; ``torch.ops.sparsekit.*`` is the raw entry.
"""

from __future__ import annotations

import torch

from .._checks import as_int
from . import reference
from .reference import (
    channel_sqnorm_accumulate_reference_,
    channel_stats_accumulate_reference_,
    nm_mask_reference,
    rowwise_prune_mask_reference,
    wanda_score_reference,
    xtx_lower_accumulate_reference_,
)

__all__ = [
    "nm_mask",
    "rowwise_prune_mask",
    "matrix_prune_mask",
    "wanda_score",
    "channel_sqnorm_accumulate_",
    "channel_stats_accumulate_",
    "xtx_lower_accumulate_",
    "OP_NAMES",
    "reference",
]

_lib = torch.library.Library("sparsekit", "DEF")

_SCHEMAS = {
    "nm_mask": "nm_mask(Tensor score, int n, int m) -> Tensor",
    "rowwise_prune_mask": "rowwise_prune_mask(Tensor score, int num_pruned) -> Tensor",
    "wanda_score": "wanda_score(Tensor weight, Tensor sq_norm) -> Tensor",
    "channel_sqnorm_accumulate_": "channel_sqnorm_accumulate_(Tensor(a!) acc, Tensor x) -> ()",
    "channel_stats_accumulate_": "channel_stats_accumulate_(Tensor(a!) sq_acc, Tensor(b!) abs_acc, Tensor x) -> ()",
    "xtx_lower_accumulate_": "xtx_lower_accumulate_(Tensor(a!) xtx, Tensor x) -> ()",
}
OP_NAMES = tuple(_SCHEMAS)

_DEFAULTS = {
    "nm_mask": nm_mask_reference,
    "rowwise_prune_mask": rowwise_prune_mask_reference,
    "wanda_score": wanda_score_reference,
    "channel_sqnorm_accumulate_": channel_sqnorm_accumulate_reference_,
    "channel_stats_accumulate_": channel_stats_accumulate_reference_,
    "xtx_lower_accumulate_": xtx_lower_accumulate_reference_,
}

for _name, _schema in _SCHEMAS.items():
    _lib.define(_schema)
    _lib.impl(_name, _DEFAULTS[_name], "CompositeExplicitAutograd")


# ----------------------------------------------------------------------------------------------------
# Argument checks, shared by the public wrappers, the fake implementations (so torch.compile traces
# raise the same errors as eager calls) and the Triton dispatch (sparsekit/kernels/triton/dispatch.py).
# ----------------------------------------------------------------------------------------------------
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_score(score: torch.Tensor, what: str = "score") -> None:
    if score.dim() != 2:
        raise ValueError(f"{what} must be 2-D (rows, cols), got shape {tuple(score.shape)}")
    if score.dtype not in _FLOATS:
        raise ValueError(f"{what} must be a floating tensor, got dtype {score.dtype}")


def _check_int_args(**args) -> None:
    """ValueError naming an argument that is not a Python int (a numpy integer, a float): the ops take ints."""
    for name, v in args.items():
        if not isinstance(v, int):
            raise ValueError(f"{name} must be a Python int, got {v!r} ({type(v).__name__}); pass int({name})")


def _check_nm(score: torch.Tensor, n: int, m: int) -> None:
    _check_score(score)
    _check_int_args(n=n, m=m)
    if m < 1:
        raise ValueError(f"N:M pattern needs M >= 1, got M={m}")
    if not (0 <= n < m):
        raise ValueError(f"N:M pattern needs 0 <= N < M, got {n}:{m}")
    if score.shape[1] % m != 0:
        raise ValueError(
            f"N:M pattern {n}:{m}: M={m} does not divide the width {score.shape[1]} (shape {tuple(score.shape)})"
        )


def _check_rowwise(score: torch.Tensor, num_pruned: int) -> None:
    _check_score(score)
    num_pruned = as_int(num_pruned, "num_pruned")
    if not (0 <= num_pruned <= score.shape[1]):
        raise ValueError(f"num_pruned must be in [0, {score.shape[1]}], got {num_pruned}")


def _check_wanda(weight: torch.Tensor, sq_norm: torch.Tensor) -> None:
    _check_score(weight, "weight")
    if sq_norm.dim() != 1 or sq_norm.shape[0] != weight.shape[1]:
        raise ValueError(
            f"sq_norm must have shape ({weight.shape[1]},) to match weight {tuple(weight.shape)}, "
            f"got {tuple(sq_norm.shape)}"
        )
    if sq_norm.dtype != torch.float32:
        raise ValueError(f"sq_norm must be float32 (an accumulator), got {sq_norm.dtype}")
    if sq_norm.device != weight.device:
        raise ValueError(f"weight is on {weight.device} but sq_norm is on {sq_norm.device}")


def _check_stats_input(x: torch.Tensor, acc: torch.Tensor, what: str) -> None:
    """The activations x of a statistics op: (..., C) with C = acc.shape[0], a float dtype, on acc's device."""
    if x.dim() < 1 or x.shape[-1] != acc.shape[0]:
        raise ValueError(f"x must have {acc.shape[0]} channels in its last dim, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.device != acc.device:
        raise ValueError(f"{what} is on {acc.device} but x is on {x.device}")


def _check_sqnorm(acc: torch.Tensor, x: torch.Tensor) -> None:
    if acc.dim() != 1 or acc.dtype != torch.float32:
        raise ValueError(f"acc must be a 1-D float32 accumulator, got shape {tuple(acc.shape)} dtype {acc.dtype}")
    if not acc.is_contiguous():
        raise ValueError("acc must be contiguous")
    _check_stats_input(x, acc, "acc")


def _check_channel_stats(sq_acc: torch.Tensor, abs_acc: torch.Tensor, x: torch.Tensor) -> None:
    for what, acc in (("sq_acc", sq_acc), ("abs_acc", abs_acc)):
        if acc.dim() != 1 or acc.dtype != torch.float32:
            raise ValueError(
                f"{what} must be a 1-D float32 accumulator, got shape {tuple(acc.shape)} dtype {acc.dtype}"
            )
        if not acc.is_contiguous():
            raise ValueError(f"{what} must be contiguous")
    if abs_acc.shape != sq_acc.shape:
        raise ValueError(f"sq_acc and abs_acc must have the same shape, got {tuple(sq_acc.shape)} and "
                         f"{tuple(abs_acc.shape)}")
    if abs_acc.device != sq_acc.device:
        raise ValueError(f"sq_acc is on {sq_acc.device} but abs_acc is on {abs_acc.device}")
    # Both are contiguous 1-D: they overlap iff they share a storage and their element ranges intersect.
    # (Disjoint views of one buffer are fine.) Storage identity works on fake tensors too.
    n = sq_acc.numel()
    if n and torch._C._is_alias_of(sq_acc, abs_acc):
        a, b = sq_acc.storage_offset(), abs_acc.storage_offset()
        if a < b + n and b < a + n:
            raise ValueError("sq_acc and abs_acc overlap in memory: they must be two separate accumulators")
    _check_stats_input(x, sq_acc, "sq_acc")


def _check_xtx(xtx: torch.Tensor, x: torch.Tensor) -> None:
    if xtx.dim() != 2 or xtx.shape[0] != xtx.shape[1] or xtx.dtype != torch.float32:
        raise ValueError(f"xtx must be a square 2-D float32 accumulator, got shape {tuple(xtx.shape)} "
                         f"dtype {xtx.dtype}")
    if not xtx.is_contiguous():
        raise ValueError("xtx must be contiguous")
    _check_stats_input(x, xtx, "xtx")
    # Dynamo cannot trace _is_alias_of (it returns a bool) in the wrapper; under torch.compile the fake
    # implementation runs this check on the fake tensors instead (and the C++ kernel checks overlap too).
    if not torch.compiler.is_dynamo_compiling() and xtx.numel() and x.numel() and torch._C._is_alias_of(xtx, x):
        raise ValueError("x shares memory with xtx: the accumulator must be a separate tensor")


# ----------------------------------------------------------------------------------------------------
# Fake implementations: shapes and dtypes only.
# ----------------------------------------------------------------------------------------------------
@torch.library.register_fake("sparsekit::nm_mask")
def _nm_mask_fake(score, n, m):
    _check_nm(score, n, m)
    return score.new_empty(score.shape, dtype=torch.bool)


@torch.library.register_fake("sparsekit::rowwise_prune_mask")
def _rowwise_prune_mask_fake(score, num_pruned):
    _check_rowwise(score, num_pruned)
    return score.new_empty(score.shape, dtype=torch.bool)


@torch.library.register_fake("sparsekit::wanda_score")
def _wanda_score_fake(weight, sq_norm):
    _check_wanda(weight, sq_norm)
    return weight.new_empty(weight.shape, dtype=torch.float32)


@torch.library.register_fake("sparsekit::channel_sqnorm_accumulate_")
def _channel_sqnorm_accumulate_fake(acc, x):
    _check_sqnorm(acc, x)
    return None


@torch.library.register_fake("sparsekit::channel_stats_accumulate_")
def _channel_stats_accumulate_fake(sq_acc, abs_acc, x):
    _check_channel_stats(sq_acc, abs_acc, x)
    return None


@torch.library.register_fake("sparsekit::xtx_lower_accumulate_")
def _xtx_lower_accumulate_fake(xtx, x):
    _check_xtx(xtx, x)
    return None


# ----------------------------------------------------------------------------------------------------
# Public, checked entry points.
# ----------------------------------------------------------------------------------------------------
def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask (bool, True = keep) pruning the ``n`` lowest of every ``m`` consecutive columns per row.

    score: (rows, cols) float, cols % m == 0, 0 <= n < m. Ties: the lower column index is pruned first.
    """
    _check_nm(score, n, m)
    return torch.ops.sparsekit.nm_mask(score, n, m)


def rowwise_prune_mask(score: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """Keep-mask pruning the ``num_pruned`` lowest scores of each row (stable: lower index first on ties).

    score: (rows, cols) float. For one threshold per matrix, pass ``score.reshape(1, -1)``.
    """
    _check_rowwise(score, num_pruned)
    return torch.ops.sparsekit.rowwise_prune_mask(score, as_int(num_pruned, "num_pruned"))


def matrix_prune_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask pruning the ``int(numel * sparsity)`` lowest scores of the whole matrix: one threshold per
    matrix, ties broken in row-major order (the per-row rule applied to the flattened matrix)."""
    if not (0.0 <= sparsity < 1.0):  # NaN fails too
        raise ValueError(f"matrix_prune_mask: sparsity must be in [0, 1), got {sparsity}")
    flat = score.reshape(1, -1)
    return rowwise_prune_mask(flat, int(flat.shape[1] * sparsity)).reshape(score.shape)


def wanda_score(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * sqrt(sq_norm_j) as float32. weight: (out, in); sq_norm: (in,) float32 sum of x_j^2."""
    _check_wanda(weight, sq_norm)
    return torch.ops.sparsekit.wanda_score(weight, sq_norm)


def channel_sqnorm_accumulate_(acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """acc += sum over tokens of x**2 per channel, in float32. acc: (C,) float32; x: (..., C). Returns acc."""
    _check_sqnorm(acc, x)
    torch.ops.sparsekit.channel_sqnorm_accumulate_(acc, x)
    return acc


def channel_stats_accumulate_(sq_acc: torch.Tensor, abs_acc: torch.Tensor, x: torch.Tensor) -> None:
    """sq_acc += sum over tokens of x**2 and abs_acc += sum over tokens of |x|, per channel, in float32,
    reading x once (the Wanda norm and the contextual-pruning mean |activation| in one pass).

    sq_acc, abs_acc: (C,) float32, contiguous, not overlapping; x: (..., C) float32/float16/bfloat16, any
    strides. Returns None. Sums are not ordered like the reference's: the last bits may differ (see the
    kernels' notes); on CUDA they may also differ from run to run (atomics).
    """
    _check_channel_stats(sq_acc, abs_acc, x)
    torch.ops.sparsekit.channel_stats_accumulate_(sq_acc, abs_acc, x)


def xtx_lower_accumulate_(xtx: torch.Tensor, x: torch.Tensor) -> None:
    """xtx += x^T x in float32, on and below the diagonal (SparseGPT's Hessian, before its 2/n scale).

    xtx: (C, C) float32, contiguous, not sharing memory with x; x: (..., C) float32/float16/bfloat16, any
    strides, leading dims flattened into rows. Returns None. Entries above the diagonal are unspecified (some
    get partial sums): ``sparsekit.calibrate.mirror_lower_`` makes the matrix whole. CPU with AVX-512:
    ``csrc/cpu/xtx.cpp`` (one pass over x, AVX-512 FMAs on the triangle's tiles); elsewhere the reference's
    lower-block ``addmm_`` calls (cuBLAS on a GPU). Sums are ordered differently between the two: the last
    bits differ, within float32 GEMM error. One exception: bfloat16 x on a CPU with AVX512-BF16 goes through
    ``vdpbf16ps``, which flushes subnormal inputs and products to zero (only |x| below about 1e-19 is affected,
    which activations do not reach).
    """
    _check_xtx(xtx, x)
    torch.ops.sparsekit.xtx_lower_accumulate_(xtx, x)


# ----------------------------------------------------------------------------------------------------
# Sparse linear layers on packed weights (sparsekit/formats), and decoding them to dense. Kernels:
# csrc/cpu/sparse24_gemv.cpp, bitmap_gemv.cpp, sparse24_unpack.cpp and bitmap_unpack.cpp.
# ----------------------------------------------------------------------------------------------------
from ..formats.bitmap import BITMAP_TILE as _BITMAP_TILE  # noqa: E402
from ..formats.sparse24 import MAX_GROUP_SIZE as _NM_MAX_GROUP, nm_index_bits as _nm_index_bits  # noqa: E402
from .reference import (  # noqa: E402
    bitmap_linear_reference,
    bitmap_unpack_linear_reference,
    bitmap_unpack_reference,
    nm_linear_reference,
    nm_unpack_linear_reference,
    nm_unpack_reference,
)

_LINEAR_SCHEMAS = {
    "nm_linear": "nm_linear(Tensor x, Tensor values, Tensor index_codes, int n, int m, int in_features, "
    "Tensor? bias) -> Tensor",
    "bitmap_linear": "bitmap_linear(Tensor x, Tensor bitmask, Tensor values, Tensor row_offsets, int in_features, "
    "Tensor? bias) -> Tensor",
    "nm_unpack": "nm_unpack(Tensor values, Tensor index_codes, int n, int m, int in_features) -> Tensor",
    "bitmap_unpack": "bitmap_unpack(Tensor bitmask, Tensor values, Tensor row_offsets, int in_features) -> Tensor",
    "nm_unpack_linear": "nm_unpack_linear(Tensor x, Tensor values, Tensor index_codes, int n, int m, "
    "int in_features, Tensor? bias) -> Tensor",
    "bitmap_unpack_linear": "bitmap_unpack_linear(Tensor x, Tensor bitmask, Tensor values, Tensor row_offsets, "
    "int in_features, Tensor? bias) -> Tensor",
}
_LINEAR_DEFAULTS = {
    "nm_linear": nm_linear_reference,
    "bitmap_linear": bitmap_linear_reference,
    "nm_unpack": nm_unpack_reference,
    "bitmap_unpack": bitmap_unpack_reference,
    "nm_unpack_linear": nm_unpack_linear_reference,
    "bitmap_unpack_linear": bitmap_unpack_linear_reference,
}
for _name, _schema in _LINEAR_SCHEMAS.items():
    _lib.define(_schema)
    _lib.impl(_name, _LINEAR_DEFAULTS[_name], "CompositeExplicitAutograd")
OP_NAMES = OP_NAMES + tuple(_LINEAR_SCHEMAS)
__all__ += ["nm_linear", "bitmap_linear", "nm_unpack", "bitmap_unpack", "nm_unpack_linear", "bitmap_unpack_linear"]

_LINEAR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_linear_common(x, out_features, in_features, bias, weight_dtype, device) -> None:
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have in_features={in_features} in its last dim, got shape {tuple(x.shape)}")
    if x.dtype not in _LINEAR_DTYPES:
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if weight_dtype != x.dtype:
        raise ValueError(f"values must have x's dtype {x.dtype}, got {weight_dtype}")
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the packed weight is on {device}")
    if bias is not None:
        if bias.shape != (out_features,) or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(
                f"bias must be ({out_features},) {x.dtype} on {x.device}, got {tuple(bias.shape)} {bias.dtype} "
                f"on {bias.device}"
            )


def _check_nm_packed(values, index_codes, n, m, in_features) -> None:
    _check_int_args(n=n, m=m, in_features=in_features)
    if not (1 <= m <= _NM_MAX_GROUP):
        raise ValueError(f"N:M needs 1 <= M <= {_NM_MAX_GROUP}, got M={m}")
    if not (0 <= n < m):
        raise ValueError(f"N:M needs 0 <= N < M, got {n}:{m}")
    if in_features < 0 or in_features % m != 0:
        raise ValueError(f"N:M pattern {n}:{m}: M={m} does not divide in_features={in_features}")
    kept = in_features // m * (m - n)
    if values.dim() != 2 or values.shape[1] != kept:
        raise ValueError(
            f"values must be (out_features, {kept}) for {n}:{m} with in_features={in_features}, "
            f"got {tuple(values.shape)}"
        )
    width = -(-kept * _nm_index_bits(m) // 8)
    if index_codes.dtype != torch.uint8 or tuple(index_codes.shape) != (values.shape[0], width):
        raise ValueError(
            f"index_codes must be uint8 ({values.shape[0]}, {width}) (sparsekit.formats.nm_index_codes), got "
            f"{index_codes.dtype} {tuple(index_codes.shape)}"
        )
    if index_codes.device != values.device:
        raise ValueError(f"values are on {values.device} but index_codes on {index_codes.device}")


def _check_nm_linear(x, values, index_codes, n, m, in_features, bias) -> None:
    _check_nm_packed(values, index_codes, n, m, in_features)
    _check_linear_common(x, values.shape[0], in_features, bias, values.dtype, values.device)


def _check_nm_unpack(values, index_codes, n, m, in_features) -> None:
    _check_nm_packed(values, index_codes, n, m, in_features)
    if values.dtype not in _LINEAR_DTYPES:
        raise ValueError(f"values must be float32, bfloat16 or float16, got {values.dtype}")


def _check_bitmap_packed(bitmask, values, row_offsets, in_features) -> None:
    _check_int_args(in_features=in_features)
    if in_features < 0:
        raise ValueError(f"in_features must be >= 0, got {in_features}")
    tiles = -(-in_features // _BITMAP_TILE)
    if bitmask.dim() != 2 or bitmask.dtype != torch.int64 or bitmask.shape[1] != tiles:
        raise ValueError(
            f"bitmask must be int64 (out_features, {tiles}) for in_features={in_features}, got {bitmask.dtype} "
            f"{tuple(bitmask.shape)}"
        )
    out_features = bitmask.shape[0]
    if row_offsets.dtype != torch.int64 or tuple(row_offsets.shape) != (out_features + 1,):
        raise ValueError(
            f"row_offsets must be int64 ({out_features + 1},), got {row_offsets.dtype} {tuple(row_offsets.shape)}"
        )
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D (nnz,), got shape {tuple(values.shape)}")
    if bitmask.device != values.device or row_offsets.device != values.device:
        raise ValueError(
            f"bitmask ({bitmask.device}), values ({values.device}) and row_offsets ({row_offsets.device}) must "
            "share a device"
        )


def _check_bitmap_linear(x, bitmask, values, row_offsets, in_features, bias) -> None:
    _check_bitmap_packed(bitmask, values, row_offsets, in_features)
    _check_linear_common(x, bitmask.shape[0], in_features, bias, values.dtype, values.device)


def _check_bitmap_unpack(bitmask, values, row_offsets, in_features) -> None:
    _check_bitmap_packed(bitmask, values, row_offsets, in_features)
    if values.dtype not in _LINEAR_DTYPES:
        raise ValueError(f"values must be float32, bfloat16 or float16, got {values.dtype}")


@torch.library.register_fake("sparsekit::nm_linear")
def _nm_linear_fake(x, values, index_codes, n, m, in_features, bias):
    _check_nm_linear(x, values, index_codes, n, m, in_features, bias)
    return x.new_empty((*x.shape[:-1], values.shape[0]))


@torch.library.register_fake("sparsekit::bitmap_linear")
def _bitmap_linear_fake(x, bitmask, values, row_offsets, in_features, bias):
    _check_bitmap_linear(x, bitmask, values, row_offsets, in_features, bias)
    return x.new_empty((*x.shape[:-1], bitmask.shape[0]))


@torch.library.register_fake("sparsekit::nm_unpack")
def _nm_unpack_fake(values, index_codes, n, m, in_features):
    _check_nm_unpack(values, index_codes, n, m, in_features)
    return values.new_empty((values.shape[0], in_features))


@torch.library.register_fake("sparsekit::bitmap_unpack")
def _bitmap_unpack_fake(bitmask, values, row_offsets, in_features):
    _check_bitmap_unpack(bitmask, values, row_offsets, in_features)
    return values.new_empty((bitmask.shape[0], in_features))


@torch.library.register_fake("sparsekit::nm_unpack_linear")
def _nm_unpack_linear_fake(x, values, index_codes, n, m, in_features, bias):
    _check_nm_linear(x, values, index_codes, n, m, in_features, bias)
    return x.new_empty((*x.shape[:-1], values.shape[0]))


@torch.library.register_fake("sparsekit::bitmap_unpack_linear")
def _bitmap_unpack_linear_fake(x, bitmask, values, row_offsets, in_features, bias):
    _check_bitmap_linear(x, bitmask, values, row_offsets, in_features, bias)
    return x.new_empty((*x.shape[:-1], bitmask.shape[0]))


def nm_linear(x, values, index_codes, n: int, m: int, in_features: int, bias=None) -> torch.Tensor:
    """x @ W^T (+ bias) with W stored N:M packed (``sparsekit.formats.pack_nm`` + ``nm_index_codes``).

    x: (..., in_features) float32/bfloat16/float16; values: (out, in_features / m * (m - n)) x's dtype;
    index_codes: uint8 (out, ceil(kept * b / 8)), b = 2 bits for m <= 4 else 4; bias: (out,) x's dtype or
    None. Returns (..., out) in x's dtype. The CPU kernel accumulates in float32 and rounds once, and raises on
    a position >= m. It runs its streamed kernels up to 64 rows of x (float32 with AVX-512: 24;
    ``SPARSEKIT_CPU_STREAMED_MAX_ROWS`` overrides both) and decode + GEMM above (bfloat16 with AVX512-BF16 from
    13 rows, 9 for small weights, on the panel path; float32 with AVX-512 on sparsekit's own GEMM,
    ``csrc/cpu/sgemm.h``). The positions within a group must be distinct, as
    ``pack_nm`` makes them. That is not checked per call (at a repeated position the streamed paths add both
    values' products, while the reference and the decode + GEMM paths keep the last value): a check in the
    loops cost up to 10% at M = 1-8 on one thread (bfloat16 4:8). ``sparsekit.formats.check_nm_packed``
    checks a packed weight once, and ``SparseLinear`` runs it on what it loads.
    """
    _check_nm_linear(x, values, index_codes, n, m, in_features, bias)
    return torch.ops.sparsekit.nm_linear(x, values, index_codes, n, m, in_features, bias)


def bitmap_linear(x, bitmask, values, row_offsets, in_features: int, bias=None) -> torch.Tensor:
    """x @ W^T (+ bias) with W stored as a bitmap (``sparsekit.formats.pack_bitmap``).

    x: (..., in_features) float32/bfloat16/float16; bitmask: (out, ceil(in_features / 64)) int64;
    values: (nnz,) x's dtype; row_offsets: (out + 1,) int64, row r's values at [row_offsets[r], row_offsets[r+1]):
    they must match the bitmask's popcounts. Every kernel checks that per row, on every call, and no row reads
    outside its span: the CPU kernel raises naming the row; the CUDA kernels stop with a device-side assert
    (as torch's index checks do: a host-visible error would need a sync); the Triton kernel, which has no
    assert outside TRITON_DEBUG, writes NaN to the broken rows' outputs. ``sparsekit.formats.check_bitmap_packed``
    checks once, with a message naming the row, and ``SparseLinear`` runs it on what it loads. bias: (out,) x's
    dtype or None. Returns (..., out) in x's dtype.
    The CPU kernel accumulates in float32 and rounds once; it streams up to 64 rows of x (float32 with AVX-512:
    24; ``SPARSEKIT_CPU_STREAMED_MAX_ROWS`` overrides both) and decodes + GEMMs above (bfloat16 with
    AVX512-BF16 from 25 rows, 9 for small weights, on the panel path; float32 with AVX-512 on sparsekit's own
    GEMM, ``csrc/cpu/sgemm.h``).
    """
    _check_bitmap_linear(x, bitmask, values, row_offsets, in_features, bias)
    return torch.ops.sparsekit.bitmap_linear(x, bitmask, values, row_offsets, in_features, bias)


def nm_unpack(values, index_codes, n: int, m: int, in_features: int) -> torch.Tensor:
    """The dense (out, in_features) weight of an N:M packed one, in values' dtype (``unpack_nm`` as an op).

    values: (out, in_features / m * (m - n)) float32/bfloat16/float16; index_codes: uint8
    (out, ceil(kept * b / 8)) (``sparsekit.formats.nm_index_codes``). The positions of a group must be distinct,
    as ``pack_nm`` makes them; the CPU kernel writes a row with a repeated position value by value (the last
    wins) and raises on a position >= m. Exact: only bits move.
    """
    _check_nm_unpack(values, index_codes, n, m, in_features)
    return torch.ops.sparsekit.nm_unpack(values, index_codes, n, m, in_features)


def bitmap_unpack(bitmask, values, row_offsets, in_features: int) -> torch.Tensor:
    """The dense (out, in_features) weight of a bitmap packed one, in values' dtype (``unpack_bitmap`` as an op).

    bitmask: (out, ceil(in_features / 64)) int64; values: (nnz,) float32/bfloat16/float16; row_offsets:
    (out + 1,) int64. The CPU kernel checks every row's count against its popcount (an error, not a read past
    the values). Exact: only bits move.
    """
    _check_bitmap_unpack(bitmask, values, row_offsets, in_features)
    return torch.ops.sparsekit.bitmap_unpack(bitmask, values, row_offsets, in_features)


def nm_unpack_linear(x, values, index_codes, n: int, m: int, in_features: int, bias=None) -> torch.Tensor:
    """``F.linear(x, nm_unpack(values, index_codes, n, m, in_features), bias)`` without the dense weight.

    Arguments and result as ``nm_linear``. The CPU kernel decodes blocks of output rows into a per-thread buffer
    and runs one GEMM on each: for float32 on CPUs with AVX-512 sparsekit's own (``csrc/cpu/sgemm.h``, about
    twice the rate of torch's float32 GEMM, MKL's AVX2 sgemm, on the development machine's AMD CPU), otherwise a
    BLAS GEMM (``SPARSEKIT_CPU_PANEL=0`` forces it); bfloat16 with AVX512-BF16 up to 128 rows runs the panel path
    (``csrc/cpu/panel_gemm.h``). Products and float32 accumulation as ``F.linear`` in x's dtype, in another
    order. It is the kernel for many rows of x (prefill), where ``nm_linear``'s streaming kernel stops paying.
    Other devices run the reference (unpack, then ``F.linear``).
    """
    _check_nm_linear(x, values, index_codes, n, m, in_features, bias)
    return torch.ops.sparsekit.nm_unpack_linear(x, values, index_codes, n, m, in_features, bias)


def bitmap_unpack_linear(x, bitmask, values, row_offsets, in_features: int, bias=None) -> torch.Tensor:
    """``F.linear(x, bitmap_unpack(bitmask, values, row_offsets, in_features), bias)`` without the dense weight.

    Arguments and result as ``bitmap_linear``; the CPU kernel works as ``nm_unpack_linear``'s does.
    """
    _check_bitmap_linear(x, bitmask, values, row_offsets, in_features, bias)
    return torch.ops.sparsekit.bitmap_unpack_linear(x, bitmask, values, row_offsets, in_features, bias)


# Load the compiled and Triton backends last, once every schema above is defined
# (each registers itself on the dispatcher if it can).
from .. import _backends  # noqa: E402

_backends.load(_lib)
