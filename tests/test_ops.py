"""sparsekit's ops on CPU: the dispatched op (the C++ kernel when ``sparsekit._C`` is loaded) against the
plain-PyTorch reference in ``sparsekit.ops.reference``, plus hand-worked cases that pin the semantics
(keep-mask convention, stable tie-break, NaN order, which entries compete), opcheck on every op, argument
errors on both entry points, and torch.compile.

With SPARSEKIT_DISABLE_EXTENSIONS=1 the dispatched op is the reference itself: the comparisons still run
(and must pass), and the tests that only make sense for the C++ kernel skip.
"""

import os

import pytest
import torch

import sparsekit
from sparsekit import ops
from sparsekit.ops import reference as R

_EXTENSIONS_OFF = any(
    os.environ.get(var, "0") not in ("", "0") for var in ("SPARSEKIT_NO_EXTENSIONS", "SPARSEKIT_DISABLE_EXTENSIONS")
)
CPP_LIVE = sparsekit.backend_status()["cpu"].live
needs_cpp = pytest.mark.skipif(not CPP_LIVE, reason="sparsekit._C (CPU C++ kernels) is not loaded")

NAN, INF = float("nan"), float("inf")
T, F = True, False

MASK_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(1, 4), (3, 8), (7, 24), (64, 96), (33, 128), (5, 1000)]
NM_PATTERNS = [(2, 4), (4, 8), (1, 4), (3, 8), (0, 4)]


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def make_scores(shape, dtype, kind="randn"):
    """Fresh scores. 'ties': values in {0, 1, 2}, so most comparisons are ties. 'special': randn with NaN
    (both signs), +-inf and +-0.0 sprinkled in."""
    if kind == "randn":
        return torch.randn(shape).to(dtype)
    if kind == "ties":
        return torch.randint(0, 3, shape).to(dtype)
    if kind == "special":
        s = torch.randn(shape)
        pick = torch.randint(0, 10, shape)
        s[pick == 0] = NAN
        s[pick == 1] = -NAN
        s[pick == 2] = INF
        s[pick == 3] = -INF
        s[pick == 4] = 0.0
        s[pick == 5] = -0.0
        return s.to(dtype)
    raise ValueError(kind)


# ----------------------------------------------------------------------------------------------------
# Backend status
# ----------------------------------------------------------------------------------------------------
def test_cpu_backend_is_live():
    if _EXTENSIONS_OFF:
        pytest.skip("SPARSEKIT_NO_EXTENSIONS / SPARSEKIT_DISABLE_EXTENSIONS is set")
    cpu = sparsekit.backend_status()["cpu"]
    assert cpu.live, cpu.detail
    for name in ops.OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekit::{name}", "CPU"), name


# ----------------------------------------------------------------------------------------------------
# nm_mask
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["randn", "ties"])
@pytest.mark.parametrize("dtype", MASK_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("n,m", NM_PATTERNS, ids=lambda v: str(v))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_nm_mask_matches_reference(shape, n, m, dtype, kind):
    if shape[1] % m:
        pytest.skip(f"M={m} does not divide width {shape[1]}")
    score = make_scores(shape, dtype, kind)
    got = torch.ops.sparsekit.nm_mask(score, n, m)
    want = R.nm_mask_reference(score, n, m)
    assert got.dtype == torch.bool and got.shape == score.shape
    assert torch.equal(got, want)
    assert torch.equal(ops.nm_mask(score, n, m), want)
    kept_per_group = got.reshape(shape[0], -1, m).sum(-1)
    assert bool((kept_per_group == m - n).all())


@pytest.mark.parametrize("kind", ["randn", "ties", "special"])
@pytest.mark.parametrize(
    "n,m", [(1, 2), (5, 12), (8, 16), (5, 24), (17, 32), (1, 48), (60, 96), (95, 96)], ids=lambda v: str(v)
)
def test_nm_mask_other_group_sizes_match_reference(n, m, kind):
    # The C++ kernel unrolls M = 4 and 8, ranks other groups up to 16 long by counting, and selects
    # (nth_element) in longer ones: every path must give the reference's mask.
    score = make_scores((9, 96), torch.float32, kind)
    assert torch.equal(torch.ops.sparsekit.nm_mask(score, n, m), R.nm_mask_reference(score, n, m))


@pytest.mark.parametrize("dtype", MASK_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("n,m", [(2, 4), (3, 8), (9, 24)], ids=lambda v: str(v))
def test_nm_mask_nan_inf_signed_zero_match_reference(n, m, dtype):
    # torch.sort puts NaN (either sign) after +inf, ranks -0.0 == +0.0, and keeps index order among equals.
    score = make_scores((17, 48), dtype, "special")
    assert torch.equal(torch.ops.sparsekit.nm_mask(score, n, m), R.nm_mask_reference(score, n, m))


def test_nm_mask_hand_worked_2_4():
    score = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0],  # all tied: the two lowest indices go
            [4.0, 3.0, 2.0, 1.0],  # strictly decreasing: the last two go
            [2.0, 2.0, 1.0, 1.0],  # two tied pairs: the pair of 1s goes
            [1.0, 2.0, 1.0, 2.0],  # interleaved: the 1s go
            [5.0, 0.0, 0.0, 0.0],  # three tied for two slots: indices 1 and 2 go, 3 survives
            [NAN, 1.0, NAN, -5.0],  # NaN ranks highest: -5 and 1 go
        ]
    )
    want = torch.tensor(
        [
            [F, F, T, T],
            [T, T, F, F],
            [T, T, F, F],
            [F, T, F, T],
            [T, F, F, T],
            [T, F, T, F],
        ]
    )
    for dtype in MASK_DTYPES:
        s = score.to(dtype)
        assert torch.equal(torch.ops.sparsekit.nm_mask(s, 2, 4), want), dtype
        assert torch.equal(R.nm_mask_reference(s, 2, 4), want), dtype


def test_nm_mask_hand_worked_groups_are_independent():
    # Two rows x two groups: each group of 4 consecutive columns of each row competes on its own.
    score = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0],
            [9.0, 8.0, 7.0, 6.0, -1.0, -2.0, -3.0, -4.0],
        ]
    )
    want_2_4 = torch.tensor([[F, F, T, T, T, F, T, F], [T, T, F, F, T, T, F, F]])
    assert torch.equal(torch.ops.sparsekit.nm_mask(score, 2, 4), want_2_4)
    # 1:4 on ties prunes only the first of the tied lowest; 3:4 keeps only the highest (last on ties).
    want_1_4 = torch.tensor([[F, T, T, T, T, F, T, T], [T, T, T, F, T, T, T, F]])
    assert torch.equal(torch.ops.sparsekit.nm_mask(score, 1, 4), want_1_4)
    want_3_4 = torch.tensor([[F, F, F, T, F, F, T, F], [T, F, F, F, T, F, F, F]])
    assert torch.equal(torch.ops.sparsekit.nm_mask(score, 3, 4), want_3_4)
    # 4:8 on one group of 8: the whole row competes.
    want_4_8 = torch.tensor([[F, F, F, F, T, T, T, T], [T, T, T, T, F, F, F, F]])
    assert torch.equal(torch.ops.sparsekit.nm_mask(score, 4, 8), want_4_8)


# ----------------------------------------------------------------------------------------------------
# rowwise_prune_mask
# ----------------------------------------------------------------------------------------------------
PRUNE_COUNTS = {
    "0": lambda cols: 0,
    "1": lambda cols: 1,
    "half": lambda cols: cols // 2,
    "all-1": lambda cols: cols - 1,
    "all": lambda cols: cols,
}


@pytest.mark.parametrize("kind", ["randn", "ties"])
@pytest.mark.parametrize("dtype", MASK_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("count", list(PRUNE_COUNTS))
@pytest.mark.parametrize("shape", SHAPES + [(1, 4099)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_rowwise_prune_mask_matches_reference(shape, count, dtype, kind):
    num_pruned = PRUNE_COUNTS[count](shape[1])
    score = make_scores(shape, dtype, kind)
    got = torch.ops.sparsekit.rowwise_prune_mask(score, num_pruned)
    want = R.rowwise_prune_mask_reference(score, num_pruned)
    assert got.dtype == torch.bool and got.shape == score.shape
    assert torch.equal(got, want)
    assert torch.equal(ops.rowwise_prune_mask(score, num_pruned), want)
    assert bool((got.sum(-1) == shape[1] - num_pruned).all())


@pytest.mark.parametrize("dtype", MASK_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("num_pruned", [1, 7, 30, 59])
def test_rowwise_prune_mask_nan_inf_signed_zero_match_reference(dtype, num_pruned):
    score = make_scores((13, 60), dtype, "special")
    got = torch.ops.sparsekit.rowwise_prune_mask(score, num_pruned)
    assert torch.equal(got, R.rowwise_prune_mask_reference(score, num_pruned))


def test_rowwise_prune_mask_hand_worked_ties():
    score = torch.tensor(
        [
            [3.0, 1.0, 2.0, 1.0, 5.0],
            [2.0, 2.0, 2.0, 2.0, 2.0],
            [0.0, 4.0, -0.0, -1.0, 0.0],  # -0.0 ties with 0.0 (index order decides)
        ]
    )
    want_2 = torch.tensor([[T, F, T, F, T], [F, F, T, T, T], [F, T, T, F, T]])
    want_3 = torch.tensor([[T, F, F, F, T], [F, F, F, T, T], [F, T, F, F, T]])
    for dtype in MASK_DTYPES:
        s = score.to(dtype)
        assert torch.equal(torch.ops.sparsekit.rowwise_prune_mask(s, 2), want_2), dtype
        assert torch.equal(torch.ops.sparsekit.rowwise_prune_mask(s, 3), want_3), dtype
        assert torch.equal(R.rowwise_prune_mask_reference(s, 3), want_3), dtype


def test_rowwise_prune_mask_hand_worked_nan():
    # Ascending order: -inf, 1, inf, NaN (index 0), NaN (index 3, negative sign bit).
    score = torch.tensor([[NAN, 1.0, -INF, -NAN, INF]])
    for k, want in [
        (1, [T, T, F, T, T]),
        (2, [T, F, F, T, T]),
        (3, [T, F, F, T, F]),
        (4, [F, F, F, T, F]),
    ]:
        assert torch.equal(torch.ops.sparsekit.rowwise_prune_mask(score, k), torch.tensor([want])), k


def test_rowwise_prune_mask_is_per_row_not_per_matrix():
    # Row 1's scores are all below row 0's: a whole-matrix ranking would prune row 1 entirely.
    score = torch.tensor([[10.0, 11.0, 12.0, 13.0], [0.0, 1.0, 2.0, 3.0]])
    want = torch.tensor([[F, F, T, T], [F, F, T, T]])
    assert torch.equal(torch.ops.sparsekit.rowwise_prune_mask(score, 2), want)
    # The documented whole-matrix form: a (1, numel) view.
    flat = torch.ops.sparsekit.rowwise_prune_mask(score.reshape(1, -1), 4).reshape(2, 4)
    assert torch.equal(flat, torch.tensor([[T, T, T, T], [F, F, F, F]]))


# ----------------------------------------------------------------------------------------------------
# Non-contiguous and empty inputs
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", MASK_DTYPES, ids=_dtype_id)
def test_masks_non_contiguous_input(dtype):
    base = make_scores((96, 64), dtype, "ties")
    score = base.t()  # (64, 96), strides (1, 64)
    assert not score.is_contiguous()
    assert torch.equal(torch.ops.sparsekit.nm_mask(score, 2, 4), R.nm_mask_reference(score.contiguous(), 2, 4))
    assert torch.equal(
        torch.ops.sparsekit.rowwise_prune_mask(score, 40), R.rowwise_prune_mask_reference(score.contiguous(), 40)
    )
    strided = make_scores((10, 192), dtype)[:, ::2]  # (10, 96), column stride 2
    assert torch.equal(torch.ops.sparsekit.nm_mask(strided, 4, 8), R.nm_mask_reference(strided.contiguous(), 4, 8))


def test_masks_empty_inputs():
    for shape in [(0, 8), (4, 0)]:
        score = torch.randn(shape)
        assert torch.equal(torch.ops.sparsekit.nm_mask(score, 2, 4), R.nm_mask_reference(score, 2, 4))
        assert torch.ops.sparsekit.rowwise_prune_mask(score, 0).shape == shape
    assert torch.ops.sparsekit.rowwise_prune_mask(torch.randn(0, 8), 3).shape == (0, 8)


# ----------------------------------------------------------------------------------------------------
# wanda_score
# ----------------------------------------------------------------------------------------------------
def make_sq_norm(cols):
    return torch.randn(cols).square() * 50 + 1e-3  # positive, like a sum of squares


def wanda_correctly_rounded(weight, sq_norm):
    """|W| * sqrt(s) with a correctly rounded float32 sqrt and multiply, computed in float64: sqrt rounded
    once to float32 from float64 is correctly rounded, and the product of two float32 is exact in float64."""
    w = weight.abs().float().double()
    root = sq_norm.double().sqrt().float().double()
    return (w * root).float()


# torch's CPU sqrt (vectorised) is not correctly rounded: it is off by one ulp for some inputs, so the
# reference and a correctly rounded kernel can differ by one float32 ulp of the product. Allow 2 ulp.
WANDA_RTOL = 0.0  # the reference rounds its sqrt correctly, as the kernels do: equal to the bit


@pytest.mark.parametrize("dtype", MASK_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_wanda_score_matches_reference(shape, dtype):
    weight = torch.randn(shape).to(dtype)
    sq_norm = make_sq_norm(shape[1])
    got = torch.ops.sparsekit.wanda_score(weight, sq_norm)
    want = R.wanda_score_reference(weight, sq_norm)
    assert got.dtype == torch.float32 and got.shape == weight.shape
    torch.testing.assert_close(got, want, rtol=WANDA_RTOL, atol=0)
    torch.testing.assert_close(ops.wanda_score(weight, sq_norm), want, rtol=WANDA_RTOL, atol=0)


@needs_cpp
@pytest.mark.parametrize("dtype", MASK_DTYPES, ids=_dtype_id)
def test_wanda_score_cpp_is_correctly_rounded(dtype):
    weight = torch.randn(37, 200).to(dtype)
    sq_norm = make_sq_norm(200)
    assert torch.equal(torch.ops.sparsekit.wanda_score(weight, sq_norm), wanda_correctly_rounded(weight, sq_norm))


def all_16bit_values(dtype):
    """Every float16 / bfloat16 bit pattern (subnormals, +-0, +-inf, NaNs), as a (256, 256) tensor."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
def test_wanda_score_every_16bit_value(dtype):
    weight = all_16bit_values(dtype)
    sq_norm = make_sq_norm(256)
    got = torch.ops.sparsekit.wanda_score(weight, sq_norm)
    # bfloat16 reaches float32's subnormal range, where one ulp is an absolute 2^-149.
    want = R.wanda_score_reference(weight, sq_norm)
    torch.testing.assert_close(got, want, rtol=WANDA_RTOL, atol=2 * 2.0**-149, equal_nan=True)
    if CPP_LIVE:
        torch.testing.assert_close(got, wanda_correctly_rounded(weight, sq_norm), rtol=0, atol=0, equal_nan=True)


def test_wanda_score_hand_worked():
    weight = torch.tensor([[-2.0, 3.0, 0.5], [0.5, -0.0, -1.0]])
    sq_norm = torch.tensor([4.0, 9.0, 0.25])
    want = torch.tensor([[4.0, 9.0, 0.25], [1.0, 0.0, 0.5]])  # |W_ij| * sqrt(s_j), not s_j
    for dtype in MASK_DTYPES:
        assert torch.equal(torch.ops.sparsekit.wanda_score(weight.to(dtype), sq_norm), want), dtype


def test_wanda_score_non_contiguous():
    weight = torch.randn(96, 64).t()
    sq_norm = make_sq_norm(192)[::2]
    assert not weight.is_contiguous() and not sq_norm.is_contiguous()
    got = torch.ops.sparsekit.wanda_score(weight, sq_norm)
    torch.testing.assert_close(got, R.wanda_score_reference(weight, sq_norm), rtol=WANDA_RTOL, atol=0)


# ----------------------------------------------------------------------------------------------------
# channel_sqnorm_accumulate_
# ----------------------------------------------------------------------------------------------------
def sqnorm_float64(acc, x):
    return acc.double() + x.reshape(-1, x.shape[-1]).double().square().sum(0)


# The float32 reference sums with torch's cascade summation: its relative error against float64 grows like
# ~log2(rows) * 2^-24, about 1e-6 at these sizes; 1e-5 leaves a margin and still catches a dropped or
# doubled row (relative change >= 1/rows here). The C++ kernel sums in float64 and rounds twice, so it is
# held to 2 ulp below.
SQNORM_RTOL = 1e-5
SQNORM_CPP_RTOL = 2 * 2.0**-23


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("shape", [(1, 4), (5, 7), (3, 11, 96), (2048, 576), (4, 2, 3, 1000)], ids=str)
def test_channel_sqnorm_matches_reference(shape, dtype):
    x = torch.randn(shape).to(dtype)
    acc0 = torch.rand(shape[-1]) + 0.5
    acc = acc0.clone()
    torch.ops.sparsekit.channel_sqnorm_accumulate_(acc, x)
    ref = acc0.clone()
    R.channel_sqnorm_accumulate_reference_(ref, x)
    want = sqnorm_float64(acc0, x)
    torch.testing.assert_close(acc.double(), want, rtol=SQNORM_RTOL, atol=0)
    torch.testing.assert_close(ref.double(), want, rtol=SQNORM_RTOL, atol=0)  # the tolerance fits the oracle too
    # Accumulates rather than overwrites; the wrapper returns acc itself.
    out = ops.channel_sqnorm_accumulate_(acc, x)
    assert out is acc
    torch.testing.assert_close(acc.double(), sqnorm_float64(acc0, torch.cat([x, x])), rtol=SQNORM_RTOL, atol=0)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_channel_sqnorm_cpp_accuracy(dtype):
    x = torch.randn(8192, 96).to(dtype)
    acc0 = torch.rand(96) + 0.5
    acc = acc0.clone()
    torch.ops.sparsekit.channel_sqnorm_accumulate_(acc, x)
    torch.testing.assert_close(acc.double(), sqnorm_float64(acc0, x), rtol=SQNORM_CPP_RTOL, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
def test_channel_sqnorm_every_16bit_value(dtype):
    x = all_16bit_values(dtype).t()  # column j: the 256 values whose high byte is j
    acc0 = torch.rand(256) + 0.5
    acc = acc0.clone()
    torch.ops.sparsekit.channel_sqnorm_accumulate_(acc, x)
    # Rounded to float32: bfloat16's largest squares overflow float32 (inf), as in the float32 reference.
    want = sqnorm_float64(acc0, x).float()
    torch.testing.assert_close(acc, want, rtol=SQNORM_RTOL, atol=0, equal_nan=True)
    finite = x.isfinite().all(0)
    assert 0 < int(finite.sum()) < 256  # columns with and without inf/NaN


def test_channel_sqnorm_hand_worked_and_non_contiguous():
    acc = torch.tensor([1.0, 2.0])
    torch.ops.sparsekit.channel_sqnorm_accumulate_(acc, torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
    assert torch.equal(acc, torch.tensor([11.0, 7.0]))  # [1 + 1 + 9, 2 + 4 + 1]

    x = torch.randn(96, 300).t()  # (300, 96): channels strided
    assert not x.is_contiguous()
    acc = torch.rand(96) + 0.5
    want = sqnorm_float64(acc, x)
    torch.ops.sparsekit.channel_sqnorm_accumulate_(acc, x)
    torch.testing.assert_close(acc.double(), want, rtol=SQNORM_RTOL, atol=0)


# ----------------------------------------------------------------------------------------------------
# channel_stats_accumulate_: sum x^2 and sum |x| from one read of x
# ----------------------------------------------------------------------------------------------------
def stats_float64(sq_acc, abs_acc, x):
    x2 = (x.unsqueeze(0) if x.dim() == 1 else x.flatten(0, -2)).double()
    return sq_acc.double() + x2.square().sum(0), abs_acc.double() + x2.abs().sum(0)


# Every term of both sums is nonnegative, so the float32 reference's error bound is the one of the sum of
# squares above (SQNORM_RTOL); the C++ kernel sums both in float64 and rounds twice (SQNORM_CPP_RTOL).
STATS_SHAPES = [(7,), (1, 1), (5, 7), (3, 11, 33), (2048, 576), (2, 4095), (4, 2, 3, 1000), (0, 8), (2, 0, 5),
                (3, 0)]


def _fresh_accumulators(channels):
    return torch.rand(channels) + 0.5, torch.rand(channels) + 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("shape", STATS_SHAPES, ids=str)
def test_channel_stats_matches_reference(shape, dtype):
    x = torch.randn(shape).to(dtype)
    sq0, ab0 = _fresh_accumulators(shape[-1])
    sq, ab = sq0.clone(), ab0.clone()
    torch.ops.sparsekit.channel_stats_accumulate_(sq, ab, x)
    sq_ref, ab_ref = sq0.clone(), ab0.clone()
    R.channel_stats_accumulate_reference_(sq_ref, ab_ref, x)
    want_sq, want_ab = stats_float64(sq0, ab0, x)
    for got, ref, want in ((sq, sq_ref, want_sq), (ab, ab_ref, want_ab)):
        torch.testing.assert_close(got.double(), want, rtol=SQNORM_RTOL, atol=0)
        torch.testing.assert_close(ref.double(), want, rtol=SQNORM_RTOL, atol=0)  # the tolerance fits the oracle
    # Accumulates rather than overwrites (a calibration loop calls it once per batch).
    assert ops.channel_stats_accumulate_(sq, ab, x) is None
    want_sq, want_ab = stats_float64(sq0, ab0, torch.cat([x, x]) if x.dim() > 1 else torch.stack([x, x]))
    torch.testing.assert_close(sq.double(), want_sq, rtol=SQNORM_RTOL, atol=0)
    torch.testing.assert_close(ab.double(), want_ab, rtol=SQNORM_RTOL, atol=0)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_dtype_id)
def test_channel_stats_cpp_accuracy_and_same_sq_as_sqnorm(dtype):
    x = torch.randn(8192, 97).to(dtype)
    sq0, ab0 = _fresh_accumulators(97)
    sq, ab = sq0.clone(), ab0.clone()
    torch.ops.sparsekit.channel_stats_accumulate_(sq, ab, x)
    want_sq, want_ab = stats_float64(sq0, ab0, x)
    torch.testing.assert_close(sq.double(), want_sq, rtol=SQNORM_CPP_RTOL, atol=0)
    torch.testing.assert_close(ab.double(), want_ab, rtol=SQNORM_CPP_RTOL, atol=0)
    # The same float64 sums as channel_sqnorm_accumulate_: one statistic, one answer, to the bit.
    acc = sq0.clone()
    torch.ops.sparsekit.channel_sqnorm_accumulate_(acc, x)
    assert torch.equal(acc, sq)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_dtype_id)
def test_channel_stats_cpp_avx512_and_portable_paths_agree(dtype, monkeypatch):
    """The AVX-512 build of the loop (where the CPU has it) and the portable one (SPARSEKIT_CPU_ISA=scalar)
    add the same exact float64 terms in the same order per channel: equal to the bit."""
    x = torch.randn(3000, 203).to(dtype)  # 203: vector remainder lanes too
    sums = {}
    for isa in ("default", "scalar"):
        if isa == "scalar":
            monkeypatch.setenv("SPARSEKIT_CPU_ISA", "scalar")
        sq, ab, acc = torch.zeros(203), torch.zeros(203), torch.zeros(203)
        torch.ops.sparsekit.channel_stats_accumulate_(sq, ab, x)
        torch.ops.sparsekit.channel_sqnorm_accumulate_(acc, x)
        sums[isa] = (sq, ab, acc)
    for got, want in zip(sums["default"], sums["scalar"]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
def test_channel_stats_every_16bit_value(dtype):
    x = all_16bit_values(dtype).t()  # column j: the 256 values whose high byte is j (inf and NaN included)
    sq0, ab0 = _fresh_accumulators(256)
    sq, ab = sq0.clone(), ab0.clone()
    torch.ops.sparsekit.channel_stats_accumulate_(sq, ab, x)
    want_sq, want_ab = stats_float64(sq0, ab0, x)
    torch.testing.assert_close(sq, want_sq.float(), rtol=SQNORM_RTOL, atol=0, equal_nan=True)
    torch.testing.assert_close(ab, want_ab.float(), rtol=SQNORM_RTOL, atol=0, equal_nan=True)
    assert ab.isnan().any() and ab.isfinite().any()  # the +-inf columns hold NaNs too: their sums are NaN


def test_channel_stats_hand_worked_non_contiguous_and_disjoint_views():
    sq, ab = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.0])
    torch.ops.sparsekit.channel_stats_accumulate_(sq, ab, torch.tensor([[1.0, -2.0], [-3.0, 1.0]]))
    assert torch.equal(sq, torch.tensor([11.0, 7.0]))  # [1 + 1 + 9, 2 + 4 + 1]
    assert torch.equal(ab, torch.tensor([4.5, 3.0]))  # [0.5 + 1 + 3, 0 + 2 + 1]

    x = torch.randn(96, 300).t()  # (300, 96): channels strided
    assert not x.is_contiguous()
    sq, ab = _fresh_accumulators(96)
    want_sq, want_ab = stats_float64(sq, ab, x)
    ops.channel_stats_accumulate_(sq, ab, x)
    torch.testing.assert_close(sq.double(), want_sq, rtol=SQNORM_RTOL, atol=0)
    torch.testing.assert_close(ab.double(), want_ab, rtol=SQNORM_RTOL, atol=0)

    # Two disjoint halves of one buffer are two separate accumulators.
    buf = torch.zeros(2, 24)
    x = torch.randn(5, 24)
    ops.channel_stats_accumulate_(buf[0], buf[1], x)
    want_sq, want_ab = stats_float64(torch.zeros(24), torch.zeros(24), x)
    torch.testing.assert_close(buf[0].double(), want_sq, rtol=SQNORM_RTOL, atol=0)
    torch.testing.assert_close(buf[1].double(), want_ab, rtol=SQNORM_RTOL, atol=0)


def test_channel_stats_wrapper_checks_devices():
    meta = torch.zeros(8, device="meta")
    with pytest.raises(ValueError, match="abs_acc is on meta"):
        ops.channel_stats_accumulate_(torch.zeros(8), meta, torch.randn(3, 8))
    with pytest.raises(ValueError, match="but x is on meta"):
        ops.channel_stats_accumulate_(torch.zeros(8), torch.zeros(8), torch.randn(3, 8, device="meta"))


# ----------------------------------------------------------------------------------------------------
# opcheck: schema, fake tensors, autograd registration, AOT dispatch
# ----------------------------------------------------------------------------------------------------
OPCHECK_CASES = [
    pytest.param("nm_mask", lambda: (torch.randn(8, 16), 2, 4), id="nm_mask-f32"),
    pytest.param("nm_mask", lambda: (torch.randn(5, 24).bfloat16(), 3, 8), id="nm_mask-bf16"),
    pytest.param("rowwise_prune_mask", lambda: (torch.randn(6, 33), 11), id="rowwise-f32"),
    pytest.param("rowwise_prune_mask", lambda: (torch.randn(3, 40).half(), 0), id="rowwise-f16"),
    pytest.param("wanda_score", lambda: (torch.randn(7, 24), make_sq_norm(24)), id="wanda-f32"),
    pytest.param("wanda_score", lambda: (torch.randn(4, 64).bfloat16(), make_sq_norm(64)), id="wanda-bf16"),
    pytest.param("channel_sqnorm_accumulate_", lambda: (torch.rand(24), torch.randn(5, 24)), id="sqnorm-f32"),
    pytest.param(
        "channel_sqnorm_accumulate_", lambda: (torch.rand(16), torch.randn(2, 3, 16).half()), id="sqnorm-f16-3d"
    ),
    pytest.param("channel_stats_accumulate_", lambda: (torch.rand(24), torch.rand(24), torch.randn(5, 24)),
                 id="stats-f32"),
    pytest.param("channel_stats_accumulate_",
                 lambda: (torch.rand(33), torch.rand(33), torch.randn(2, 3, 33).bfloat16()), id="stats-bf16-3d-odd"),
    pytest.param("channel_stats_accumulate_", lambda: (torch.rand(7), torch.rand(7), torch.randn(7).half()),
                 id="stats-f16-1d"),
]


@pytest.mark.parametrize("name,make_args", OPCHECK_CASES)
def test_opcheck(name, make_args):
    torch.library.opcheck(getattr(torch.ops.sparsekit, name).default, make_args())


# ----------------------------------------------------------------------------------------------------
# Argument errors: ValueError from the checked wrappers, RuntimeError (TORCH_CHECK) from the raw C++ op
# ----------------------------------------------------------------------------------------------------
def _bad_nm():
    s = torch.randn(4, 8)
    return [
        ("nm_mask", (torch.randn(2, 4, 8), 2, 4), "2-D"),
        ("nm_mask", (torch.randint(0, 3, (4, 8)), 2, 4), "dtype|float"),
        ("nm_mask", (torch.randn(4, 6), 2, 4), "divide"),
        ("nm_mask", (s, 4, 4), "N < M"),
        ("nm_mask", (s, 5, 4), "N < M"),
        ("nm_mask", (s, -1, 4), "N < M"),
        ("nm_mask", (s, 0, 0), "M >= 1"),
    ]


def _bad_rowwise():
    s = torch.randn(4, 8)
    return [
        ("rowwise_prune_mask", (torch.randn(8), 2), "2-D"),
        ("rowwise_prune_mask", (s.to(torch.int32), 2), "dtype|float"),
        ("rowwise_prune_mask", (s, 9), "num_pruned"),
        ("rowwise_prune_mask", (s, -1), "num_pruned"),
    ]


def _bad_wanda():
    w = torch.randn(4, 8)
    return [
        ("wanda_score", (torch.randn(8), torch.rand(8)), "2-D"),
        ("wanda_score", (w.to(torch.int64), torch.rand(8)), "dtype|float"),
        ("wanda_score", (w, torch.rand(4)), "sq_norm must have shape"),
        ("wanda_score", (w, torch.rand(1, 8)), "sq_norm must have shape"),
        ("wanda_score", (w, torch.rand(8).half()), "float32"),
    ]


def _bad_sqnorm():
    return [
        ("channel_sqnorm_accumulate_", (torch.zeros(8).half(), torch.randn(3, 8)), "1-D float32"),
        ("channel_sqnorm_accumulate_", (torch.zeros(2, 8), torch.randn(3, 8)), "1-D float32"),
        ("channel_sqnorm_accumulate_", (torch.zeros(16)[::2], torch.randn(3, 8)), "contiguous"),
        ("channel_sqnorm_accumulate_", (torch.zeros(8), torch.randn(3, 7)), "channels"),
        ("channel_sqnorm_accumulate_", (torch.zeros(8), torch.randn(3, 8).double()), "float32, float16 or bfloat16"),
        ("channel_sqnorm_accumulate_", (torch.zeros(8), torch.ones(3, 8, dtype=torch.int32)), "float32, float16"),
    ]


def _bad_stats():
    x = torch.randn(3, 8)
    acc = torch.zeros(8)
    buf = torch.zeros(16)
    return [
        ("channel_stats_accumulate_", (torch.zeros(8).half(), acc, x), "sq_acc must be a 1-D float32"),
        ("channel_stats_accumulate_", (acc, torch.zeros(8).double(), x), "abs_acc must be a 1-D float32"),
        ("channel_stats_accumulate_", (torch.zeros(2, 8), acc, x), "sq_acc must be a 1-D float32"),
        ("channel_stats_accumulate_", (acc, torch.zeros(1, 8), x), "abs_acc must be a 1-D float32"),
        ("channel_stats_accumulate_", (buf[::2], acc, x), "sq_acc must be contiguous"),
        ("channel_stats_accumulate_", (acc, buf[::2], x), "abs_acc must be contiguous"),
        ("channel_stats_accumulate_", (acc, torch.zeros(9), x), "same shape"),
        ("channel_stats_accumulate_", (acc, acc, x), "overlap"),
        ("channel_stats_accumulate_", (buf[:8], buf[4:12], x), "overlap"),
        ("channel_stats_accumulate_", (buf[4:12], buf[:8], x), "overlap"),
        ("channel_stats_accumulate_", (acc, torch.zeros(8), torch.randn(3, 7)), "channels"),
        ("channel_stats_accumulate_", (acc, torch.zeros(8), torch.randn(())), "channels"),
        ("channel_stats_accumulate_", (acc, torch.zeros(8), x.double()), "float32, float16 or bfloat16"),
        ("channel_stats_accumulate_", (acc, torch.zeros(8), torch.ones(3, 8, dtype=torch.int32)), "float32, float16"),
    ]


BAD_CALLS = [
    pytest.param(name, args, match, id=f"{name}-{i}")
    for group in (_bad_nm, _bad_rowwise, _bad_wanda, _bad_sqnorm, _bad_stats)
    for i, (name, args, match) in enumerate(group())
]


@pytest.mark.parametrize("name,args,match", BAD_CALLS)
def test_wrapper_raises_value_error(name, args, match):
    with pytest.raises(ValueError, match=match):
        getattr(ops, name)(*args)


@needs_cpp
@pytest.mark.parametrize("name,args,match", BAD_CALLS)
def test_cpp_op_raises_runtime_error(name, args, match):
    with pytest.raises(RuntimeError, match=match):
        getattr(torch.ops.sparsekit, name)(*args)


@needs_cpp
def test_cpp_op_leaves_acc_alone_on_error():
    acc = torch.ones(8)
    with pytest.raises(RuntimeError):
        torch.ops.sparsekit.channel_sqnorm_accumulate_(acc, torch.randn(3, 7))
    assert torch.equal(acc, torch.ones(8))
    sq, ab = torch.ones(8), torch.ones(8)
    with pytest.raises(RuntimeError):
        torch.ops.sparsekit.channel_stats_accumulate_(sq, ab, torch.randn(3, 8).double())
    assert torch.equal(sq, torch.ones(8)) and torch.equal(ab, torch.ones(8))


# ----------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------
def _compile_available():
    return hasattr(torch, "compile") and torch._dynamo.is_dynamo_supported()


@pytest.mark.skipif(not _compile_available(), reason="torch.compile is not supported here")
def test_torch_compile_fullgraph():
    def prune_step(weight, acc, sq, ab, x):
        torch.ops.sparsekit.channel_sqnorm_accumulate_(acc, x)
        torch.ops.sparsekit.channel_stats_accumulate_(sq, ab, x)  # two mutated arguments
        score = torch.ops.sparsekit.wanda_score(weight, acc)
        keep = torch.ops.sparsekit.nm_mask(score, 2, 4)
        return weight * keep, keep

    weight, x = torch.randn(32, 64), torch.randn(10, 64)
    acc0 = torch.rand(64) + 0.5
    torch._dynamo.reset()
    compiled = torch.compile(prune_step, fullgraph=True)
    eager_accs = [acc0.clone() for _ in range(3)]
    compiled_accs = [acc0.clone() for _ in range(3)]
    w_eager, keep_eager = prune_step(weight, *eager_accs, x)
    w_compiled, keep_compiled = compiled(weight, *compiled_accs, x)
    for got, want in zip(compiled_accs, eager_accs):
        assert torch.equal(got, want)  # the in-place updates survive functionalization
    assert torch.equal(keep_compiled, keep_eager)
    assert torch.equal(w_compiled, w_eager)


def test_int_arguments_and_matrix_sparsity_are_checked():
    """Numpy integers (not Python ints) get an error naming the argument, not one naming a valid pattern; a
    matrix sparsity outside [0, 1) is refused, naming it."""
    import numpy as np

    from sparsekit.formats import pack_nm

    score = torch.rand(4, 8)
    with pytest.raises(ValueError, match=r"m must be a Python int, got np.int64\(4\) \(int64\)"):
        ops.nm_mask(score, 2, np.int64(4))
    with pytest.raises(ValueError, match=r"N=np.int64\(2\) \(int64\); pass int\(N\)"):
        pack_nm(score, np.int64(2), 4)
    for bad in (1.0, -0.01, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"matrix_prune_mask: sparsity must be in \[0, 1\)"):
            ops.matrix_prune_mask(score, bad)
