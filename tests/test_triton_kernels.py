"""Triton kernels (sparsekit/kernels/triton) against the plain-PyTorch reference, on CPU tensors.

Without a GPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1 before triton
is imported), so shapes are small; the blocks the dispatch picks on CPU are large. On a machine with a GPU
these tests still use CPU tensors only if the interpreter is on; otherwise they skip (tests/test_gpu_kernels.py
covers the compiled path there).

Tolerances, from the ops:
* masks: exact (``torch.equal``). Ranking is a comparison of integer keys; there is no rounding anywhere.
* wanda_score: bit-exact against ``wanda_exact`` (a correctly rounded float32 root times |w|, rounded once:
  computed in float64 and rounded to float32, which for a square root and for a product of two floats gives
  the correctly rounded result), since the kernel's root is correctly rounded (``tl.sqrt_rn``). Against the
  reference 2**-21 relative: torch's float32 CPU sqrt is off by one ulp on some inputs, so the two products
  can differ by 1 ulp of the root plus one rounding each, below 2**-22 relative.
* channel_sqnorm_accumulate_: squares of fp16/bf16 are exact in float32 and every term is nonnegative, so
  any float32 summation order of the T tokens plus the old acc is within (T + 1) * 2**-24 relative of the
  exact sum (one more 2**-24 for float32 inputs, whose squares round). Both kernel and reference obey it;
  they are checked against a float64 sum with that bound, and against each other with twice it.
* channel_stats_accumulate_: the same bound for both sums (|x| is exact in float32 for every input dtype).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("the Triton interpreter is off (a GPU is present): see test_gpu_kernels.py", allow_module_level=True)

from triton_probe import interpreter_problem  # noqa: E402

if interpreter_problem():
    pytest.skip(interpreter_problem(), allow_module_level=True)

from sparsekit.kernels.triton import dispatch  # noqa: E402
from sparsekit.ops import reference  # noqa: E402

# The interpreter turns a kernel's runtime loop bound into a Python int through a 1-element array.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
U = 2.0**-24  # unit roundoff of float32


def _with_specials(score: torch.Tensor) -> torch.Tensor:
    """Scatter NaN (both signs), +-inf, +-0.0 and denormal-sized values over a random half of the entries."""
    tiny = 1e-40 if score.dtype in (torch.float32, torch.bfloat16) else 1e-7
    specials = torch.tensor(
        [float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0, tiny, 2 * tiny, -tiny],
        dtype=score.dtype,
    )
    out = score.clone().reshape(-1)
    where = torch.randint(0, out.numel(), (out.numel() // 2,))
    out[where] = specials[torch.randint(0, len(specials), where.shape)]
    return out.reshape(score.shape)


def test_every_registered_triton_op_has_an_entry_point():
    """sparsekit._backends registers dispatch.<name> on the CUDA key for each name of TRITON_OPS."""
    from sparsekit._backends import TRITON_OPS
    from sparsekit.ops import OP_NAMES

    for name in TRITON_OPS:
        assert name in OP_NAMES and callable(getattr(dispatch, name)), name


# ----------------------------------------------------------------------------------------------------
# nm_mask
# ----------------------------------------------------------------------------------------------------
NM_CASES = [
    # (rows, cols, n, m): several rows always, so a row-mixing bug cannot hide; odd widths and group counts
    (3, 28, 2, 4),
    (5, 12, 1, 4),
    (4, 24, 3, 4),
    (3, 40, 4, 8),
    (2, 48, 8, 16),
    (3, 21, 1, 3),  # odd width, group size not a power of two
    (2, 35, 2, 5),
    (2, 64, 16, 32),
    (4, 20, 0, 4),  # n = 0: keep everything
    (3, 7, 0, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols,n,m", NM_CASES)
def test_nm_mask_random(rows, cols, n, m, dtype):
    score = torch.randn(rows, cols, dtype=dtype)
    keep = dispatch.nm_mask(score, n, m)
    assert keep.dtype == torch.bool and keep.shape == score.shape
    assert torch.equal(keep, reference.nm_mask_reference(score, n, m))
    assert torch.equal(keep.reshape(rows, -1, m).sum(-1), torch.full((rows, cols // m), m - n))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols,n,m", NM_CASES)
def test_nm_mask_ties(rows, cols, n, m, dtype):
    """Three distinct values: most groups have ties, which must fall on the lower column index first."""
    score = torch.randint(0, 3, (rows, cols)).to(dtype)
    assert torch.equal(dispatch.nm_mask(score, n, m), reference.nm_mask_reference(score, n, m))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_nm_mask_special_values(dtype):
    score = _with_specials(torch.randn(6, 40, dtype=dtype))
    for n, m in [(2, 4), (5, 8), (1, 5)]:
        assert torch.equal(dispatch.nm_mask(score, n, m), reference.nm_mask_reference(score, n, m))


def test_nm_mask_hand_worked():
    """Tie rule pinned by hand: stable ascending ranking, NaN largest, -0.0 ties with +0.0."""
    nan = float("nan")
    score = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 3.0],
            [nan, 0.0, nan, -1.0, 0.0, -0.0, 5.0, 6.0],
        ]
    )
    expect_2 = torch.tensor(
        [
            [False, False, True, True, True, False, False, True],  # ties: indices 0, 1 pruned; then the two 1.0s
            [True, False, True, False, False, False, True, True],  # -1 and 0 pruned; 0.0 then -0.0 (index order)
        ]
    )
    expect_3 = torch.tensor(
        [
            [False, False, False, True, False, False, False, True],
            [False, False, True, False, False, False, False, True],  # first NaN (lower index) goes third
        ]
    )
    for n, expect in [(2, expect_2), (3, expect_3)]:
        assert torch.equal(reference.nm_mask_reference(score, n, 4), expect)
        assert torch.equal(dispatch.nm_mask(score, n, 4), expect)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nm_mask_strided_input(dtype):
    """A transposed view is read through its strides, not copied into a wrong layout."""
    base = torch.randn(24, 6, dtype=dtype)
    score = base.t()  # (6, 24), stride (1, 6)
    assert torch.equal(dispatch.nm_mask(score, 2, 4), reference.nm_mask_reference(score.contiguous(), 2, 4))


def test_nm_mask_wide_group_and_empty():
    score = torch.randn(2, 128)
    assert torch.equal(dispatch.nm_mask(score, 40, 64), reference.nm_mask_reference(score, 40, 64))  # m > 32
    empty = torch.randn(0, 8)
    assert dispatch.nm_mask(empty, 2, 4).shape == (0, 8)


def test_nm_mask_checks_arguments():
    with pytest.raises(ValueError, match="does not divide"):
        dispatch.nm_mask(torch.randn(2, 10), 2, 4)
    with pytest.raises(ValueError, match="0 <= N < M"):
        dispatch.nm_mask(torch.randn(2, 8), 4, 4)


# ----------------------------------------------------------------------------------------------------
# wanda_score
# ----------------------------------------------------------------------------------------------------
WANDA_RTOL = 0.0  # the reference rounds its sqrt correctly, as the kernels do: equal to the bit


def wanda_exact(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """|w| * sqrt(s) with a correctly rounded float32 root and one float32 rounding of the product."""
    root = sq_norm.double().sqrt().float()  # sqrt in float64, rounded once: the correctly rounded float32 root
    return (weight.float().abs().double() * root.double()).float()  # exact product in float64, rounded once


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 13), (33, 96), (70, 257)])
def test_wanda_score(rows, cols, dtype):
    weight = torch.randn(rows, cols, dtype=dtype)
    sq_norm = torch.rand(cols) * 100
    out = dispatch.wanda_score(weight, sq_norm)
    assert out.dtype == torch.float32 and out.shape == (rows, cols)
    assert torch.equal(out, wanda_exact(weight, sq_norm))
    torch.testing.assert_close(out, reference.wanda_score_reference(weight, sq_norm), rtol=WANDA_RTOL, atol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # inf * 0, on purpose
def test_wanda_score_strided_and_special():
    weight = torch.randn(40, 24).t()  # (24, 40), non-contiguous
    sq_norm = torch.rand(40) * 10
    sq_norm[:3] = torch.tensor([0.0, float("inf"), 1e-40])
    weight[0, :2] = torch.tensor([float("nan"), -float("inf")])
    torch.testing.assert_close(
        dispatch.wanda_score(weight, sq_norm),
        reference.wanda_score_reference(weight, sq_norm),
        rtol=WANDA_RTOL,
        atol=0,
        equal_nan=True,
    )


def test_wanda_score_checks_arguments():
    with pytest.raises(ValueError, match="sq_norm must have shape"):
        dispatch.wanda_score(torch.randn(3, 4), torch.rand(5))
    with pytest.raises(ValueError, match="float32"):
        dispatch.wanda_score(torch.randn(3, 4), torch.rand(4, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------
# channel_sqnorm_accumulate_
# ----------------------------------------------------------------------------------------------------
def _sqnorm_bound(tokens: int, dtype: torch.dtype) -> float:
    return (tokens + 1 + (dtype == torch.float32)) * U


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 5), (37, 24), (3, 45, 70), (300, 33), (2, 2, 64, 256)])
def test_channel_sqnorm_accumulate(shape, dtype):
    x = torch.randn(*shape, dtype=dtype) * 3
    acc = torch.rand(shape[-1])  # a running accumulator, not zeros
    tokens = x.numel() // shape[-1]
    exact = acc.double() + x.double().reshape(tokens, -1).pow(2).sum(0)
    expect = acc.clone()
    reference.channel_sqnorm_accumulate_reference_(expect, x)

    out = dispatch.channel_sqnorm_accumulate_(acc, x)
    assert out is None
    bound = _sqnorm_bound(tokens, dtype)
    assert ((acc.double() - exact).abs() <= bound * exact).all()
    torch.testing.assert_close(acc, expect, rtol=2 * bound, atol=0)


def test_channel_sqnorm_accumulate_strided_and_repeated():
    """A channel-strided x (copied), and two calls adding up, as in a calibration loop."""
    x = torch.randn(50, 96)[:, ::2]  # (50, 48), stride (96, 2)
    acc = torch.zeros(48)
    dispatch.channel_sqnorm_accumulate_(acc, x)
    dispatch.channel_sqnorm_accumulate_(acc, x)
    exact = 2 * x.double().pow(2).sum(0)
    assert ((acc.double() - exact).abs() <= _sqnorm_bound(100, torch.float32) * exact).all()


def test_channel_sqnorm_accumulate_empty_and_checks():
    acc = torch.rand(8)
    before = acc.clone()
    dispatch.channel_sqnorm_accumulate_(acc, torch.randn(0, 8))
    assert torch.equal(acc, before)
    with pytest.raises(ValueError, match="channels"):
        dispatch.channel_sqnorm_accumulate_(acc, torch.randn(3, 9))
    with pytest.raises(ValueError, match="float32"):
        dispatch.channel_sqnorm_accumulate_(acc.double(), torch.randn(3, 8))


# ----------------------------------------------------------------------------------------------------
# channel_stats_accumulate_: sum x^2 and sum |x| from one read of x
# ----------------------------------------------------------------------------------------------------
def _stats_exact(sq_acc, abs_acc, x):
    x2 = (x.unsqueeze(0) if x.dim() == 1 else x.flatten(0, -2)).double()
    return sq_acc.double() + x2.pow(2).sum(0), abs_acc.double() + x2.abs().sum(0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (1, 1), (37, 33), (3, 45, 70), (300, 24), (2, 2, 64, 257)])
def test_channel_stats_accumulate(shape, dtype):
    x = torch.randn(*shape, dtype=dtype) * 3
    sq, ab = torch.rand(shape[-1]), torch.rand(shape[-1])  # running accumulators, not zeros
    tokens = x.numel() // shape[-1]
    exact_sq, exact_ab = _stats_exact(sq, ab, x)
    expect_sq, expect_ab = sq.clone(), ab.clone()
    reference.channel_stats_accumulate_reference_(expect_sq, expect_ab, x)

    assert dispatch.channel_stats_accumulate_(sq, ab, x) is None
    bound = _sqnorm_bound(tokens, dtype)
    for got, exact, expect in ((sq, exact_sq, expect_sq), (ab, exact_ab, expect_ab)):
        assert ((got.double() - exact).abs() <= bound * exact).all()
        torch.testing.assert_close(got, expect, rtol=2 * bound, atol=0)


def test_channel_stats_accumulate_strided_repeated_and_disjoint_views():
    """A channel-strided x (copied), two calls adding up, accumulators that are two halves of one buffer."""
    x = torch.randn(50, 96)[:, ::2]  # (50, 48), stride (96, 2)
    buf = torch.zeros(2, 48)
    dispatch.channel_stats_accumulate_(buf[0], buf[1], x)
    dispatch.channel_stats_accumulate_(buf[0], buf[1], x)
    exact_sq, exact_ab = _stats_exact(torch.zeros(48), torch.zeros(48), torch.cat([x, x]))
    bound = _sqnorm_bound(100, torch.float32)
    assert ((buf[0].double() - exact_sq).abs() <= bound * exact_sq).all()
    assert ((buf[1].double() - exact_ab).abs() <= bound * exact_ab).all()


def test_channel_stats_accumulate_matches_sqnorm_kernel():
    """The sum of squares is the same kernel code as channel_sqnorm_accumulate_'s: equal to the bit here
    (the interpreter runs the programs one after another, so their atomics land in the same order)."""
    x = torch.randn(64, 40, dtype=torch.bfloat16)
    sq, ab, acc = torch.zeros(40), torch.zeros(40), torch.zeros(40)
    dispatch.channel_stats_accumulate_(sq, ab, x)
    dispatch.channel_sqnorm_accumulate_(acc, x)
    assert torch.equal(sq, acc)


def test_channel_stats_accumulate_empty_and_checks():
    sq, ab = torch.rand(8), torch.rand(8)
    before = sq.clone(), ab.clone()
    dispatch.channel_stats_accumulate_(sq, ab, torch.randn(0, 8))
    assert torch.equal(sq, before[0]) and torch.equal(ab, before[1])
    with pytest.raises(ValueError, match="channels"):
        dispatch.channel_stats_accumulate_(sq, ab, torch.randn(3, 9))
    with pytest.raises(ValueError, match="abs_acc must be a 1-D float32"):
        dispatch.channel_stats_accumulate_(sq, ab.double(), torch.randn(3, 8))
    with pytest.raises(ValueError, match="overlap"):
        dispatch.channel_stats_accumulate_(sq, sq, torch.randn(3, 8))
    with pytest.raises(ValueError, match="same shape"):
        dispatch.channel_stats_accumulate_(sq, torch.rand(9), torch.randn(3, 8))
