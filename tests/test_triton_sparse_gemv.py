"""Triton sparse linear kernels (sparsekit/kernels/triton/sparse_gemv.py) against the plain-PyTorch
reference, on CPU tensors under the Triton interpreter (conftest sets TRITON_INTERPRET=1 without a GPU).

The launchers are called directly (``dispatch.nm_linear`` / ``dispatch.bitmap_linear`` with the CPU block
sizes, and ``launch_*`` with explicit blocks and split-K so that every path runs on small shapes). With a
GPU and the interpreter off these tests skip; tests/test_gpu_sparse_gemv.py covers the device.

Tolerance (tests/linear_check.py, shared with the CPU kernels' tests): the kernels accumulate in float32
and round once, so against the exact float64 product of the same low-precision inputs the error is one
rounding to the output dtype (2**-7 relative for bf16) plus float32 accumulation error, bounded by
1e-5 * sum |x| |w| (+ |b|). The reference (``F.linear`` in the inputs' dtype) is held to the same bound, so
the bound is one the oracle itself meets.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("the Triton interpreter is off (a GPU is present): see test_gpu_sparse_gemv.py",
                allow_module_level=True)

from triton_probe import interpreter_problem  # noqa: E402

if interpreter_problem():
    pytest.skip(interpreter_problem(), allow_module_level=True)

from linear_check import assert_linear_close, bad_row_offsets_cases  # noqa: E402

from sparsekit.formats import (  # noqa: E402
    BitmapPacked,
    NMPacked,
    nm_index_codes,
    nm_indices_from_codes,
    pack_bitmap,
    pack_nm,
    unpack_bitmap,
    unpack_nm,
)
from sparsekit.kernels.triton import dispatch  # noqa: E402
from sparsekit.kernels.triton.sparse_gemv import launch_bitmap_linear, launch_nm_linear  # noqa: E402
from sparsekit.ops import reference as R  # noqa: E402
from triton import next_power_of_2 as triton_next_pow2  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROWS = [1, 3, 8, 17, 64]


def _id(v):
    return str(v).replace("torch.", "")


def nm_weight(out_f, in_f, n, m, dtype, extra_zeros=0.0):
    """A fresh random N:M weight (n zeros in every m), optionally with more zeros scattered on top."""
    w = torch.randn(out_f, in_f)
    w = w * R.nm_mask_reference(torch.rand(out_f, in_f), n, m)
    if extra_zeros:
        w[torch.rand(out_f, in_f) < extra_zeros] = 0.0
    return w.to(dtype)


def nm_args(out_f, in_f, n, m, dtype, extra_zeros=0.0):
    """(values, index_codes, dense weight) as the op takes them; the dense weight is rebuilt from the codes."""
    p = pack_nm(nm_weight(out_f, in_f, n, m, dtype, extra_zeros), n, m)
    codes = nm_index_codes(p.indices, m)
    dense = unpack_nm(NMPacked(p.values, nm_indices_from_codes(codes, m, p.values.shape[1]), (out_f, in_f), n, m))
    return p.values, codes, dense


def bitmap_weight(out_f, in_f, sparsity, dtype):
    w = torch.randn(out_f, in_f)
    w[torch.rand(out_f, in_f) < sparsity] = 0.0
    return w.to(dtype)


def bitmap_args(weight):
    p = pack_bitmap(weight)
    return p.bitmask, p.values, p.row_offsets


def _check(got, x, weight, bias, reference_out):
    assert_linear_close(got, x, weight, bias)
    assert_linear_close(reference_out, x, weight, bias)  # the oracle meets the same bound


# ----------------------------------------------------------------------------------------------------
# nm_linear
# ----------------------------------------------------------------------------------------------------
# (out_features, in_features, n, m): odd out_features everywhere; in_features a multiple of M, not always of
# the step width (256 columns on the CPU), so the last step is partial.
NM_CASES = [
    (17, 320, 2, 4),
    (21, 96, 4, 8),
    (9, 64, 1, 4),  # 3 kept per group: K not a power of two
    (7, 60, 1, 3),  # M not a power of two
    (11, 64, 8, 16),  # 4-bit codes, one group per 16 columns
]


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("out_f,in_f,n,m", NM_CASES, ids=lambda v: str(v))
def test_nm_linear_matches_reference(out_f, in_f, n, m, rows, dtype, bias):
    values, codes, weight = nm_args(out_f, in_f, n, m, dtype)
    x = torch.randn(rows, in_f).to(dtype)
    b = torch.randn(out_f).to(dtype) if bias else None
    got = dispatch.nm_linear(x, values, codes, n, m, in_f, b)
    _check(got, x, weight, b, R.nm_linear_reference(x, values, codes, n, m, in_f, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("out_f,in_f,n,m,block_n,block_g,split_k", [
    (33, 128, 2, 4, 16, 4, 3),  # split-K: float32 workspace with atomics, bias added once
    (45, 192, 2, 4, 32, 8, 2),
    (19, 160, 4, 8, 32, 2, 4),
    (23, 96, 1, 3, 16, 8, 5),
])
def test_nm_linear_blocks_and_split_k(out_f, in_f, n, m, block_n, block_g, split_k, dtype):
    """The GPU's block shapes and split-K path, on the interpreter."""
    values, codes, weight = nm_args(out_f, in_f, n, m, dtype, extra_zeros=0.2)  # some groups more than N:M sparse
    for rows in (1, 17):
        x = torch.randn(rows, in_f).to(dtype)
        b = torch.randn(out_f).to(dtype)
        got = launch_nm_linear(x, values, codes, n, m, in_f, b, block_n=block_n, block_g=block_g, split_k=split_k)
        _check(got, x, weight, b, R.nm_linear_reference(x, values, codes, n, m, in_f, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (8, 16), (1, 3)])
def test_nm_linear_gpu_block_sizes_on_the_interpreter(n, m, dtype):
    """The blocks a GPU run picks (dispatch.nm_linear_blocks(..., on_gpu=True), the ones
    .ci/triton_sm90_check.py compiles for sm_90), with split-K, run here against the reference."""
    out_f, in_f = 40, 48 * m
    values, codes, weight = nm_args(out_f, in_f, n, m, dtype)
    b = torch.randn(out_f).to(dtype)
    for rows in (1, 17):
        block_n, block_g, warps = dispatch.nm_linear_blocks(rows, m, in_f // m, True, dtype.itemsize)
        assert block_g * triton_next_pow2(m) >= 16 and block_g & (block_g - 1) == 0
        x = torch.randn(rows, in_f).to(dtype)
        got = launch_nm_linear(x, values, codes, n, m, in_f, b, block_n=block_n, block_g=block_g, split_k=2,
                               num_warps=warps)
        _check(got, x, weight, b, R.nm_linear_reference(x, values, codes, n, m, in_f, b))


def test_launch_nm_linear_rejects_a_dot_under_16():
    values, codes, _ = nm_args(8, 64, 2, 4, torch.float32)
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match="block_g must be a power of two with block_g"):
        launch_nm_linear(x, values, codes, 2, 4, 64, None, block_n=16, block_g=2, split_k=1)
    with pytest.raises(ValueError, match="block_g=6"):
        launch_nm_linear(x, values, codes, 2, 4, 64, None, block_n=16, block_g=6, split_k=1)


def test_nm_linear_leading_dims_strided_and_fallback():
    values, codes, weight = nm_args(24, 64, 2, 4, torch.bfloat16)
    b = torch.randn(24).bfloat16()
    x = torch.randn(2, 3, 64).bfloat16()
    got = dispatch.nm_linear(x, values, codes, 2, 4, 64, b)
    assert got.shape == (2, 3, 24)
    assert torch.equal(got.reshape(6, 24), dispatch.nm_linear(x.reshape(6, 64), values, codes, 2, 4, 64, b))
    wide = torch.randn(5, 128).bfloat16()[:, ::2]  # unit stride missing: copied, not misread
    assert_linear_close(dispatch.nm_linear(wide, values, codes, 2, 4, 64, b), wide, weight, b)
    rows_view = torch.randn(5, 96).bfloat16()[:, 16:80]  # row stride 96: read in place
    assert_linear_close(dispatch.nm_linear(rows_view, values, codes, 2, 4, 64, b), rows_view, weight, b)
    many = torch.randn(70, 64).bfloat16()  # more than 64 rows: the reference
    assert torch.equal(dispatch.nm_linear(many, values, codes, 2, 4, 64, b),
                       R.nm_linear_reference(many, values, codes, 2, 4, 64, b))


def test_nm_linear_empty_and_checks():
    values, codes, _ = nm_args(8, 16, 2, 4, torch.float32)
    assert dispatch.nm_linear(torch.randn(0, 16), values, codes, 2, 4, 16).shape == (0, 8)
    b = torch.randn(5)  # in_features == 0: y = bias
    got = dispatch.nm_linear(torch.randn(2, 3, 0), torch.zeros(5, 0), torch.zeros(5, 0, dtype=torch.uint8), 2, 4, 0, b)
    assert torch.equal(got, b.expand(2, 3, 5))
    got = dispatch.bitmap_linear(torch.randn(2, 0), torch.zeros(5, 0, dtype=torch.int64), torch.zeros(0),
                                 torch.zeros(6, dtype=torch.int64), 0, None)
    assert torch.equal(got, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="in_features=16"):
        dispatch.nm_linear(torch.randn(3, 12), values, codes, 2, 4, 16)
    with pytest.raises(ValueError, match="index_codes must be uint8"):
        dispatch.nm_linear(torch.randn(3, 16), values, codes[:, :1], 2, 4, 16)


# ----------------------------------------------------------------------------------------------------
# bitmap_linear
# ----------------------------------------------------------------------------------------------------
BITMAP_SHAPES = [(33, 256), (17, 200)]  # in_features 200: a partial last tile


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.8])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", BITMAP_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bitmap_linear_matches_reference(shape, rows, sparsity, dtype, bias):
    out_f, in_f = shape
    weight = bitmap_weight(out_f, in_f, sparsity, dtype)
    bitmask, values, offsets = bitmap_args(weight)
    x = torch.randn(rows, in_f).to(dtype)
    b = torch.randn(out_f).to(dtype) if bias else None
    got = dispatch.bitmap_linear(x, bitmask, values, offsets, in_f, b)
    _check(got, x, weight, b, R.bitmap_linear_reference(x, bitmask, values, offsets, in_f, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("block_n,block_t", [(16, 1), (16, 2), (64, 8)])
def test_bitmap_linear_blocks_and_extreme_rows(block_n, block_t, dtype):
    """Empty rows, full rows (every bit, the sign bit 63 included), single non-zeros at tile edges."""
    out_f, in_f = 37, 320
    weight = bitmap_weight(out_f, in_f, 0.7, dtype)
    weight[0] = 0
    weight[1] = torch.randn(in_f).to(dtype)
    weight[1][weight[1] == 0] = 1.0  # every bit set
    weight[2] = 0
    weight[2, [0, 63, 64, 127, 319]] = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0]).to(dtype)
    bitmask, values, offsets = bitmap_args(weight)
    assert unpack_bitmap(BitmapPacked(bitmask, values, offsets, (out_f, in_f))).equal(weight)
    for rows in (1, 17):
        x = torch.randn(rows, in_f).to(dtype)
        b = torch.randn(out_f).to(dtype)
        got = launch_bitmap_linear(x, bitmask, values, offsets, in_f, b, block_n=block_n, block_t=block_t)
        _check(got, x, weight, b, R.bitmap_linear_reference(x, bitmask, values, offsets, in_f, b))
    # An all-zero weight gives the bias, exactly.
    zero = torch.zeros(out_f, in_f, dtype=dtype)
    bitmask, values, offsets = bitmap_args(zero)
    x = torch.randn(3, in_f).to(dtype)
    b = torch.randn(out_f).to(dtype)
    assert torch.equal(dispatch.bitmap_linear(x, bitmask, values, offsets, in_f, b), b.expand(3, out_f))


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # inf * 0 in the dot
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_bitmap_linear_ignores_bits_past_in_features(dtype):
    """As the reference: set bits past in_features in the last tile name no column and take no value."""
    weight = bitmap_weight(9, 200, 0.5, dtype)  # the last tile holds columns 192..199
    bitmask, values, offsets = bitmap_args(weight)
    stray = bitmask.clone()
    stray[:, -1] |= (1 << 40) | (1 << 8)
    x = torch.randn(3, 200).to(dtype)
    b = torch.randn(9).to(dtype)
    want = R.bitmap_linear_reference(x, stray, values, offsets, 200, b)
    _check(dispatch.bitmap_linear(x, stray, values, offsets, 200, b), x, weight, b, want)
    # Row 4's stray bits would take row 5's first value (times x = 0 past in_features): make it inf, so that
    # taking it shows as NaN in output feature 4.
    inf_values = values.clone()
    inf_values[offsets[5]] = float("inf")
    want = R.bitmap_linear_reference(x, stray, inf_values, offsets, 200, b)
    got = dispatch.bitmap_linear(x, stray, inf_values, offsets, 200, b)
    assert torch.isfinite(want[:, 4]).all() and torch.isfinite(got[:, 4]).all()
    torch.testing.assert_close(got[:, 4], want[:, 4], rtol=1e-2, atol=1e-2)


def test_bitmap_linear_leading_dims_and_fallback():
    weight = bitmap_weight(24, 100, 0.7, torch.float16)
    bitmask, values, offsets = bitmap_args(weight)
    b = torch.randn(24).half()
    x = torch.randn(2, 3, 100).half()
    got = dispatch.bitmap_linear(x, bitmask, values, offsets, 100, b)
    assert got.shape == (2, 3, 24)
    assert torch.equal(got.reshape(6, 24), dispatch.bitmap_linear(x.reshape(6, 100), bitmask, values, offsets, 100, b))
    many = torch.randn(65, 100).half()
    assert torch.equal(dispatch.bitmap_linear(many, bitmask, values, offsets, 100, b),
                       R.bitmap_linear_reference(many, bitmask, values, offsets, 100, b))
    assert dispatch.bitmap_linear(torch.randn(0, 100).half(), bitmask, values, offsets, 100).shape == (0, 24)
    with pytest.raises(ValueError, match="row_offsets must be int64"):
        dispatch.bitmap_linear(x, bitmask, values, offsets[:-1], 100, b)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("rows", [1, 5])
def test_bitmap_linear_bad_row_offsets_give_nan_rows(dtype, rows):
    """row_offsets is checked per row in the kernel: a row whose span is not its bitmask's popcount (or lies
    outside [0, nnz], or does not start at 0 / end at nnz) gives NaN outputs, reads no value outside its span,
    and leaves the other rows exact."""
    out_f, in_f = 12, 300
    weight = bitmap_weight(out_f, in_f, 0.6, dtype)
    bitmask, values, offsets = bitmap_args(weight)
    x = torch.randn(rows, in_f).to(dtype)
    b = torch.randn(out_f).to(dtype)
    good = dispatch.bitmap_linear(x, bitmask, values, offsets, in_f, b)
    assert torch.isfinite(good).all()
    for label, bad_values, bad, nan_rows in bad_row_offsets_cases(values, offsets):
        got = dispatch.bitmap_linear(x, bitmask, bad_values, bad, in_f, b)
        is_nan = torch.isnan(got).all(dim=0)
        assert set(torch.nonzero(is_nan).flatten().tolist()) == nan_rows, label
        keep = [r for r in range(out_f) if r not in nan_rows]
        assert torch.equal(got[:, keep], good[:, keep]), label
