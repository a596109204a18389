"""SparseGPT's Hessian statistic: ``xtx_lower_accumulate_`` (xtx += x^T x on and below the diagonal).

The dispatched op (the AVX-512 kernel of csrc/cpu/xtx.cpp where sparsekit._C is loaded and the CPU has it)
against exact float64 products, with a bound from float32 summation (any order of adding n terms is within
n * 2**-24 of the sum of their magnitudes), and against the plain-PyTorch reference; the reference's lower
block triangle; odd widths, rows across the kernel's 256-row blocks, fp16/bf16 inputs, strided x; one
answer for any thread count; argument errors on both entry points; opcheck.
"""

import pytest
import torch

import sparsekit
from guard_page import before_guard_page
from linear_check import set_isa
from sparsekit import ops
from sparsekit.calibrate import mirror_lower_
from sparsekit.ops.reference import xtx_lower_accumulate_reference_, xtx_lower_blocks

CPP_LIVE = sparsekit.backend_status()["cpu"].live
needs_cpp = pytest.mark.skipif(not CPP_LIVE, reason="sparsekit._C (CPU C++ kernels) is not loaded")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# widths: below, at and past one 16-channel panel, the 48-column tile, and 8-row blocks; real ones (576)
WIDTHS = [1, 5, 8, 15, 16, 17, 31, 47, 48, 49, 95, 100, 576]
ROWS = [1, 3, 255, 256, 257, 600]


def _within_float32_sum_bound(got, start, xs, lower_only=True):
    """|got - exact| <= 2 * n * 2**-24 * (sum of the magnitudes of the n terms), entrywise (n = rows + 1)."""
    xd = [x.reshape(-1, x.shape[-1]).double() for x in xs]
    exact = start.double() + sum(x.t() @ x for x in xd)
    magnitude = start.double().abs() + sum(x.abs().t() @ x.abs() for x in xd)
    n = sum(x.shape[0] for x in xd) + 1
    ok = (got.double() - exact).abs() <= 2 * n * 2.0**-24 * magnitude
    if lower_only:  # entries above the diagonal are unspecified
        ok |= torch.ones_like(ok).triu(1)
    return bool(ok.all()), exact


def _fresh(channels, rows, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, channels, generator=g).to(dtype)
    start = torch.randn(channels, channels, generator=g)
    return x, start @ start.t()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("channels", WIDTHS)
def test_xtx_lower_matches_exact_products(channels, rows, dtype):
    x, start = _fresh(channels, rows, dtype, seed=channels * 1000 + rows)
    xtx = start.clone()
    assert ops.xtx_lower_accumulate_(xtx, x) is None
    ok, exact = _within_float32_sum_bound(xtx, start, [x])
    assert ok
    # ... and as close as the reference is (same bound), and both see the same fp16/bf16 values
    ref = start.clone()
    xtx_lower_accumulate_reference_(ref, x)
    assert _within_float32_sum_bound(ref, start, [x])[0]
    # a lost or doubled product would be off by about |x_i x_j| ~ 1: far outside the bound
    assert (xtx.double() - exact).tril().abs().max() < 1e-2 * max(1.0, rows**0.5)


def test_xtx_lower_accumulates_over_calls_leading_dims_and_strides():
    """Three calls: a 3-D x, a transposed (strided) view, a column slice; then mirrored and symmetric."""
    g = torch.Generator().manual_seed(7)
    channels = 70
    xs = [torch.randn(2, 150, channels, generator=g),
          torch.randn(channels, 90, generator=g).t(),  # (90, 70), strides (1, 90)
          torch.randn(300, channels + 5, generator=g)[:, 3:3 + channels]]
    assert not xs[1].is_contiguous() and not xs[2].is_contiguous()
    start = torch.zeros(channels, channels)
    xtx = start.clone()
    for x in xs:
        ops.xtx_lower_accumulate_(xtx, x)
    assert mirror_lower_(xtx) is xtx
    assert torch.equal(xtx, xtx.t())
    assert _within_float32_sum_bound(xtx, start, xs, lower_only=False)[0]


@pytest.mark.parametrize("channels,rows", [(0, 5), (6, 0), (0, 0)])
def test_xtx_lower_empty_is_a_no_op(channels, rows):
    xtx = torch.ones(channels, channels)
    ops.xtx_lower_accumulate_(xtx, torch.randn(rows, channels))
    assert torch.equal(xtx, torch.ones(channels, channels))


def test_xtx_lower_hand_worked():
    """x = [[1, 2], [3, -1]]: x^T x = [[10, -1], [-1, 5]]; the lower triangle is [[10, .], [-1, 5]]."""
    xtx = torch.tensor([[1.0, 0.0], [0.5, 2.0]])
    ops.xtx_lower_accumulate_(xtx, torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
    assert xtx[0, 0] == 11.0 and xtx[1, 0] == -0.5 and xtx[1, 1] == 7.0


@needs_cpp
@pytest.mark.parametrize("isa", ["auto", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_xtx_lower_touches_nothing_past_x_or_xtx(dtype, isa, monkeypatch):
    """xtx and x end on the last byte before an unreadable page. The tiles' columns past C are computed (as
    zeros) but must not be stored: a plain store there would add 0 to the next row (invisible to the value
    tests) and, on the last row, write past the end, which faults here."""
    set_isa(isa, monkeypatch)
    for channels, rows in ((1, 3), (15, 2), (17, 257), (33, 1), (49, 300), (100, 5)):
        x, start = _fresh(channels, rows, dtype, seed=channels)
        xg = before_guard_page(x.reshape(-1)).view(rows, channels)
        xtx = before_guard_page(start.reshape(-1)).view(channels, channels)
        torch.ops.sparsekit.xtx_lower_accumulate_(xtx, xg)
        assert _within_float32_sum_bound(xtx, start, [x])[0]


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_xtx_lower_same_bits_for_any_thread_count(dtype):
    x, start = _fresh(200, 700, dtype, seed=3)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            xtx = start.clone()
            ops.xtx_lower_accumulate_(xtx, x)
            results.append(xtx.tril())
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results[1:])


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_xtx_lower_plain_avx512_path(dtype, monkeypatch):
    """SPARSEKIT_CPU_ISA=avx512: bfloat16 x goes through the float32 FMA tiles instead of vdpbf16ps (CPUs
    without AVX512-BF16); every dtype stays within the float32 summation bound."""
    set_isa("avx512", monkeypatch)
    for channels, rows in ((17, 3), (49, 257), (100, 600)):
        x, start = _fresh(channels, rows, dtype, seed=channels + rows)
        xtx = start.clone()
        torch.ops.sparsekit.xtx_lower_accumulate_(xtx, x)
        assert _within_float32_sum_bound(xtx, start, [x])[0]


@needs_cpp
def test_xtx_lower_portable_path_is_the_reference(monkeypatch):
    """SPARSEKIT_CPU_ISA=scalar (and CPUs without AVX-512): the C++ op runs the reference's lower-block
    addmm_ calls, so it equals the reference to the bit, blocks above the diagonal untouched."""
    set_isa("scalar", monkeypatch)
    for channels, rows in ((5, 9), (100, 64), (576, 48)):
        x, start = _fresh(channels, rows, torch.bfloat16, seed=channels)
        got, ref = start.clone(), start.clone()
        torch.ops.sparsekit.xtx_lower_accumulate_(got, x)
        xtx_lower_accumulate_reference_(ref, x)
        assert torch.equal(got, ref)


# ----------------------------------------------------------------------------------------------------
# The reference: X^T X on the lower block triangle, mirrored once
# ----------------------------------------------------------------------------------------------------
def test_xtx_lower_blocks_cover_the_columns():
    assert xtx_lower_blocks(576) == [(72 * i, 72 * (i + 1)) for i in range(8)]
    assert xtx_lower_blocks(1536) == [(192 * i, 192 * (i + 1)) for i in range(8)]
    assert xtx_lower_blocks(64) == [(0, 32), (32, 64)]
    assert xtx_lower_blocks(20) == [(0, 20)]
    for channels in (1, 7, 100, 4095):
        for blocks in (None, 1, 3, 8, 50):
            bounds = xtx_lower_blocks(channels, blocks)
            assert bounds[0][0] == 0 and bounds[-1][1] == channels
            assert all(e0 == s1 for (_, e0), (s1, _) in zip(bounds, bounds[1:]))
            assert all(s < e for s, e in bounds)


@pytest.mark.parametrize("blocks", [None, 1, 2, 3, 8])
@pytest.mark.parametrize("channels,rows", [(1, 5), (7, 1), (64, 37), (100, 64), (576, 48)])
def test_reference_lower_triangle_equals_full_product(channels, rows, blocks):
    """Two batches accumulated on the lower block triangle into a running (symmetric) xtx, then mirrored,
    equal xtx + sum of x^T x within float32 GEMM rounding; blocks above the diagonal are not written."""
    xs = [torch.randn(rows, channels) for _ in range(2)]
    start = torch.randn(channels, channels)
    start = start @ start.t()
    xtx = start.clone()
    for x in xs:
        xtx_lower_accumulate_reference_(xtx, x, blocks)
    for s, e in xtx_lower_blocks(channels, blocks):
        assert torch.equal(xtx[s:e, e:], start[s:e, e:])
    assert mirror_lower_(xtx) is xtx
    assert torch.equal(xtx, xtx.t())
    assert _within_float32_sum_bound(xtx, start, xs, lower_only=False)[0]


# ----------------------------------------------------------------------------------------------------
# Errors and opcheck
# ----------------------------------------------------------------------------------------------------
def _bad_xtx():
    x = torch.randn(3, 8)
    acc = torch.zeros(8, 8)
    buf = torch.zeros(8, 16)
    return [
        ((torch.zeros(8, 8).double(), x), "square 2-D float32"),
        ((torch.zeros(8, 8).half(), x), "square 2-D float32"),
        ((torch.zeros(8, 9), x), "square 2-D float32"),
        ((torch.zeros(64), x), "square 2-D float32"),
        ((buf[:, ::2], x), "contiguous"),
        ((acc, torch.randn(3, 7)), "channels"),
        ((acc, torch.randn(())), "channels"),
        ((acc, x.double()), "float32, float16 or bfloat16"),
        ((acc, torch.ones(3, 8, dtype=torch.int32)), "float32, float16 or bfloat16"),
    ]


@pytest.mark.parametrize("args,match", _bad_xtx())
def test_xtx_wrapper_raises_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        ops.xtx_lower_accumulate_(*args)


@needs_cpp
@pytest.mark.parametrize("args,match", _bad_xtx())
def test_xtx_cpp_op_raises_runtime_error(args, match):
    before = args[0].clone()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sparsekit.xtx_lower_accumulate_(*args)
    assert torch.equal(args[0], before)


def test_xtx_refuses_x_sharing_memory_with_xtx():
    xtx = torch.randn(8, 8)
    with pytest.raises(ValueError, match="shares memory"):
        ops.xtx_lower_accumulate_(xtx, xtx[:3])
    if CPP_LIVE:
        with pytest.raises(RuntimeError, match="overlaps"):
            torch.ops.sparsekit.xtx_lower_accumulate_(xtx, xtx[:3])


def test_xtx_wrapper_checks_devices():
    with pytest.raises(ValueError, match="but x is on meta"):
        ops.xtx_lower_accumulate_(torch.zeros(8, 8), torch.randn(3, 8, device="meta"))


@pytest.mark.parametrize("make_args", [
    pytest.param(lambda: (torch.rand(24, 24), torch.randn(5, 24)), id="f32"),
    pytest.param(lambda: (torch.rand(33, 33), torch.randn(2, 30, 33).bfloat16()), id="bf16-3d-odd"),
    pytest.param(lambda: (torch.rand(7, 7), torch.randn(7).half()), id="f16-1d"),
])
def test_xtx_opcheck(make_args):
    torch.library.opcheck(torch.ops.sparsekit.xtx_lower_accumulate_.default, make_args())


def test_xtx_under_torch_compile():
    def f(xtx, x):
        ops.xtx_lower_accumulate_(xtx, x * 2.0)
        return xtx

    x = torch.randn(40, 20)
    eager, compiled = torch.zeros(20, 20), torch.zeros(20, 20)
    f(eager, x)
    torch.compile(f, fullgraph=True)(compiled, x)
    assert torch.equal(eager.tril(), compiled.tril())


@pytest.mark.parametrize("channels", [0, 1, 2, 127, 128, 129, 300])
def test_mirror_lower_copies_the_lower_triangle(channels):
    """Strips of 128 columns: widths below, at and past a strip; the lower triangle kept bit for bit."""
    a = torch.randn(channels, channels)
    want = a.tril() + a.tril(-1).t()
    assert mirror_lower_(a) is a
    assert torch.equal(a, want)
