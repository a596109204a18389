"""N:M packed weights (sparsekit.formats.sparse24) and sparsekit::nm_linear.

Packing: exact round trips on weights pruned with ``nm_mask``, hand-worked layouts of values, indices and
the 2-bit codes, and the error naming the first bad group. The op: the dispatched op (the C++ kernel when
``sparsekit._C`` is loaded; both its AVX-512 path and, with SPARSEKIT_CPU_ISA=scalar, its portable path) is
compared with ``nm_linear_reference`` computed in float64 on the same inputs, on fresh random data.

Tolerances come from the dtype. float32: the kernel sums the same products in another order, so the error
is bounded by a few units of float32 roundoff times the sum of |products| (rtol 1e-5 for <= 256 terms:
256 * 2^-24 = 1.5e-5 worst case, far less in practice). bfloat16: the kernel accumulates in float32 and
rounds once, so it must equal the exact result rounded to bfloat16 up to one bfloat16 ulp (2^-7 relative),
where float32 accumulation error moves a value across a rounding boundary.
"""

import pytest
import torch

import sparsekit
from sparsekit import ops
from sparsekit.formats import (NMPacked, check_nm_packed, nm_index_bits, nm_index_codes, nm_indices_from_codes,
                               pack_nm, unpack_nm)
from sparsekit.ops import reference as R
from linear_check import assert_linear_close, set_isa

CPP_LIVE = sparsekit.backend_status()["cpu"].live
PACK_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PATTERNS = [(2, 4), (1, 4), (3, 4), (0, 4), (4, 8), (6, 8), (5, 16)]


def _id(v):
    return str(v).removeprefix("torch.")


def nm_weight(rows, cols, n, m, dtype=torch.float32):
    w = torch.randn(rows, cols)
    return (w * ops.nm_mask(w.abs(), n, m)).to(dtype)


# ----------------------------------------------------------------------------------------------------
# Format
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", PACK_DTYPES, ids=_id)
@pytest.mark.parametrize("n,m", PATTERNS, ids=str)
@pytest.mark.parametrize("shape", [(1, 16), (7, 48), (33, 64), (64, 128)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_pack_nm_round_trip(shape, n, m, dtype):
    w = nm_weight(*shape, n, m, dtype)
    p = pack_nm(w, n, m)
    kept = shape[1] // m * (m - n)
    assert p.values.shape == p.indices.shape == (shape[0], kept)
    assert p.values.dtype == dtype and p.indices.dtype == torch.uint8
    assert torch.equal(unpack_nm(p), w)
    codes = nm_index_codes(p.indices, m)
    assert torch.equal(nm_indices_from_codes(codes, m, kept), p.indices)


def test_pack_nm_extra_zeros_round_trip():
    w = nm_weight(9, 32, 2, 4)
    w[w.abs() < 0.5] = 0  # many groups now hold fewer than 2 non-zeros
    w[3] = 0
    p = pack_nm(w, 2, 4)
    assert torch.equal(unpack_nm(p), w)


def test_pack_nm_hand_worked():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 4.0, 5.0, 6.0, 0.0, 7.0, 0.0]])
    p = pack_nm(w, 2, 4)
    assert p.values.tolist() == [[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 6.0, 7.0]]
    # a group with one non-zero fills its second slot with its first zero position
    assert p.indices.tolist() == [[1, 3, 0, 1], [2, 3, 0, 2]]
    # 2-bit codes, index j at bits 2j: 1 | 3 << 2 | 0 << 4 | 1 << 6 and 2 | 3 << 2 | 0 << 4 | 2 << 6
    assert nm_index_codes(p.indices, 4).tolist() == [[1 + 12 + 64], [2 + 12 + 128]]
    # 4-bit codes for M > 4: index j at bits 4j
    assert nm_index_codes(torch.tensor([[7, 2, 5]], dtype=torch.uint8), 8).tolist() == [[7 + 32, 5]]


def test_pack_nm_names_first_bad_group():
    w = nm_weight(4, 16, 2, 4)
    w[1, 4:8] = torch.tensor([1.0, 2.0, 0.0, 3.0])
    w[2, 0:4] = 1.0
    with pytest.raises(ValueError, match=r"row 1, columns 4\.\.7 hold 3 non-zeros, at most 2 allowed"):
        pack_nm(w, 2, 4)


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.zeros(2, 6), 2, 4), "does not divide"),
        ((torch.zeros(2, 8), 4, 4), "0 <= N < M"),
        ((torch.zeros(2, 34), 2, 17), "M <= 16"),
        ((torch.zeros(8), 2, 4), "2-D"),
        ((torch.zeros(2, 8, dtype=torch.int32), 2, 4), "floating"),
    ],
)
def test_pack_nm_errors(args, match):
    with pytest.raises(ValueError, match=match):
        pack_nm(*args)


# ----------------------------------------------------------------------------------------------------
# nm_linear against the reference
# ----------------------------------------------------------------------------------------------------
def packed_args(out_f, in_f, n, m, dtype):
    """(values, index_codes) of a fresh random N:M weight, as the op takes them."""
    p = pack_nm(nm_weight(out_f, in_f, n, m, dtype), n, m)
    return p.values, nm_index_codes(p.indices, m)


def weight_of(values, codes, n, m, in_f):
    indices = nm_indices_from_codes(codes, m, values.shape[1])
    return unpack_nm(NMPacked(values, indices, (values.shape[0], in_f), n, m))


# (n, m, isa): "scalar" sets SPARSEKIT_CPU_ISA=scalar, which moves the half-density patterns (K = M / 2 kept:
# 1:2, 2:4, 4:8, 8:16) off the AVX-512 path; "avx512" keeps AVX-512 but not its BF16/VBMI2 extensions (bfloat16
# then takes the float32-lane path instead of vdpbf16ps); other patterns (1:4) always take the portable path.
NM_LINEAR_CASES = [(2, 4, "auto"), (2, 4, "avx512"), (2, 4, "scalar"), (4, 8, "auto"), (4, 8, "avx512"),
                   (4, 8, "scalar"), (8, 16, "auto"), (1, 2, "auto"), (1, 4, "auto")]


# K blocks of the streamed kernel (streamed.h): 24x2600 has several from 4 rows up and a last one ending in a
# partial 64-column step (6 rows: a second block starting at column 1344, not a multiple of 1024); at 8 rows
# 24x1028 and 24x1064 have a last block that is only a scalar tail (widths 8 does not divide: not for 4:8).
NM_LINEAR_SHAPES = [(64, 128), (96, 256), (33, 512), (5, 40), (24, 2600), (24, 1028), (24, 1064)]


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize(
    "shape,n,m,isa",
    [(shape, *case) for case in NM_LINEAR_CASES for shape in NM_LINEAR_SHAPES if shape[1] % case[1] == 0],
    ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else str(v),
)
# Rows: passes of 1-8 rows, a short pass after full ones (13, 40), the most the kernels stream in bfloat16 (64),
# the decode + BLAS path (70, with the streamed limit held at 64), and 200 (40 and 200 with the streamed limit
# raised to 2048: float32 on the AVX-512 lanes streams them, the rest decode).
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6, 7, 8, 13, 16, 40, 64, 70, 200])
def test_nm_linear_matches_reference(rows, shape, n, m, isa, dtype, bias, monkeypatch):
    set_isa(isa, monkeypatch)
    if rows == 70:
        monkeypatch.setenv("SPARSEKIT_CPU_STREAMED_MAX_ROWS", "64")
    elif rows in (40, 200) and dtype == torch.float32 and isa != "scalar":
        # float32 streams only 24 rows by default (decode + GEMM above: test_panel.py)
        monkeypatch.setenv("SPARSEKIT_CPU_STREAMED_MAX_ROWS", "2048")
    out_f, in_f = shape
    values, codes = packed_args(out_f, in_f, n, m, dtype)
    x = torch.randn(rows, in_f).to(dtype)
    b = torch.randn(out_f).to(dtype) if bias else None
    got = torch.ops.sparsekit.nm_linear(x, values, codes, n, m, in_f, b)
    assert_linear_close(got, x, weight_of(values, codes, n, m, in_f), b)


@pytest.mark.parametrize("isa", ["auto", "avx512", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_id)
def test_nm_linear_zero_in_features_gives_bias(dtype, isa, monkeypatch):
    set_isa(isa, monkeypatch)
    values, codes = torch.zeros(5, 0).to(dtype), torch.zeros(5, 0, dtype=torch.uint8)
    b = torch.randn(5).to(dtype)
    x = torch.randn(2, 3, 0).to(dtype)
    assert torch.equal(ops.nm_linear(x, values, codes, 2, 4, 0, b), b.expand(2, 3, 5))
    assert torch.equal(ops.nm_linear(x, values, codes, 2, 4, 0, None), torch.zeros(2, 3, 5).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_id)
def test_nm_linear_leading_dims_and_wrapper(dtype):
    values, codes = packed_args(48, 96, 2, 4, dtype)
    x = torch.randn(2, 3, 96).to(dtype)
    b = torch.randn(48).to(dtype)
    got = ops.nm_linear(x, values, codes, 2, 4, 96, b)
    assert got.shape == (2, 3, 48)
    flat = ops.nm_linear(x.reshape(6, 96), values, codes, 2, 4, 96, b)
    assert torch.equal(got.reshape(6, 48), flat)
    ref = R.nm_linear_reference(x.float(), values.float(), codes, 2, 4, 96, b.float())
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got.float(), ref, **tol)


def test_nm_linear_empty_batch():
    values, codes = packed_args(8, 16, 2, 4, torch.float32)
    assert ops.nm_linear(torch.randn(0, 16), values, codes, 2, 4, 16).shape == (0, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)], ids=str)
def test_nm_linear_opcheck(n, m, dtype):
    values, codes = packed_args(12, 64, n, m, dtype)
    torch.library.opcheck(
        torch.ops.sparsekit.nm_linear.default, (torch.randn(3, 64).to(dtype), values, codes, n, m, 64, None)
    )
    torch.library.opcheck(
        torch.ops.sparsekit.nm_linear.default,
        (torch.randn(2, 1, 64).to(dtype), values, codes, n, m, 64, torch.randn(12).to(dtype)),
    )


def test_nm_linear_compiles_fullgraph():
    """The op traces as one node (fake implementation, no graph break); aot_eager keeps the test fast."""
    values, codes = packed_args(24, 64, 2, 4, torch.float32)
    x, b = torch.randn(2, 5, 64), torch.randn(24)
    fn = torch.compile(lambda x: ops.nm_linear(x, values, codes, 2, 4, 64, b) * 2, backend="aot_eager", fullgraph=True)
    assert torch.equal(fn(x), ops.nm_linear(x, values, codes, 2, 4, 64, b) * 2)


def _bad_nm_linear():
    values, codes = packed_args(8, 32, 2, 4, torch.float32)
    x = torch.randn(3, 32)
    return [
        ((torch.randn(3, 31), values, codes, 2, 4, 32, None), "in_features=32"),
        ((x.bfloat16(), values, codes, 2, 4, 32, None), "values must have x's dtype"),
        ((x.double(), values.double(), codes, 2, 4, 32, None), "float32, bfloat16 or float16"),
        ((x, values[:, :-1], codes, 2, 4, 32, None), r"values must be \(out"),
        ((x, values, codes.int(), 2, 4, 32, None), "index_codes must be uint8"),
        ((x, values, codes[:, :-1], 2, 4, 32, None), "index_codes must be uint8"),
        ((x, values, codes, 2, 4, 32, torch.randn(7)), "bias must be"),
    ]


@pytest.mark.parametrize("args,match", _bad_nm_linear())
def test_nm_linear_wrapper_raises_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        ops.nm_linear(*args)


@pytest.mark.skipif(not CPP_LIVE, reason="sparsekit._C (CPU C++ kernels) is not loaded")
@pytest.mark.parametrize("args,match", _bad_nm_linear())
def test_nm_linear_cpp_raises_runtime_error(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sparsekit.nm_linear(*args)


def test_nm_packed_is_plain_data():
    p = pack_nm(nm_weight(2, 8, 2, 4), 2, 4)
    assert isinstance(p, NMPacked) and p.shape == (2, 8) and p.kept_per_group == 2


# ----------------------------------------------------------------------------------------------------
# nm_unpack (packed -> dense) and nm_unpack_linear (decode + BLAS), against the reference
# ----------------------------------------------------------------------------------------------------
# "auto": the fastest path here (AVX-512 with VBMI2 and BITALG where the CPU has them); "vbmi2": without BITALG
# (4:8 and 8:16 in 16 bits then take the vector-built bitmask + expand instead of the rank permute); "avx512":
# AVX-512 without VBMI2; "scalar": the portable path. 2:4 and the other power-of-two patterns have permute paths
# (4:8 and 8:16 a vector-built group mask first); other M share the bitmask + expand one.
ISAS = ["auto", "vbmi2", "avx512", "scalar"]
UNPACK_PATTERNS = [(2, 4), (4, 8), (1, 4), (3, 4), (0, 4), (1, 2), (2, 3), (6, 8), (5, 16), (0, 1), (8, 16), (1, 8),
                   (7, 8), (0, 8)]


def exact(t):
    """The bits of t, so that torch.equal also tells -0.0 from 0.0 and compares NaN payloads."""
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", PACK_DTYPES, ids=_id)
@pytest.mark.parametrize("n,m", UNPACK_PATTERNS, ids=str)
# widths: one 32-column step, a tail of 1..7 groups after full steps, several 64-column words, odd row counts
@pytest.mark.parametrize("rows,groups", [(1, 8), (7, 3), (33, 25), (5, 200), (16, 129)], ids=str)
def test_nm_unpack_matches_reference_exactly(rows, groups, n, m, dtype, isa, monkeypatch):
    set_isa(isa, monkeypatch)
    w = nm_weight(rows, groups * m, n, m, dtype)
    w[0, :m] = 0  # a group with fewer non-zeros than kept slots
    w[-1] = 0  # an empty row
    p = pack_nm(w, n, m)
    codes = nm_index_codes(p.indices, m)
    got = ops.nm_unpack(p.values, codes, n, m, groups * m)
    assert got.dtype == dtype and got.shape == w.shape
    assert torch.equal(exact(got), exact(R.nm_unpack_reference(p.values, codes, n, m, groups * m)))
    assert torch.equal(got, w)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", PACK_DTYPES, ids=_id)
def test_nm_unpack_moves_bits_unchanged(dtype, isa, monkeypatch):
    """Kept values are copied bit for bit: NaN, inf, -0.0 and subnormals included."""
    set_isa(isa, monkeypatch)
    w = nm_weight(9, 64, 2, 4, torch.float32)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, -3.5])
    kept = (w != 0).nonzero()
    for i, (r, c) in enumerate(kept[: len(specials)].tolist()):
        w[r, c] = specials[i]
    w = w.to(dtype)
    p = pack_nm(w, 2, 4)
    got = ops.nm_unpack(p.values, nm_index_codes(p.indices, 4), 2, 4, 64)
    assert torch.equal(exact(got), exact(R.nm_unpack_reference(p.values, nm_index_codes(p.indices, 4), 2, 4, 64)))


@pytest.mark.skipif(not CPP_LIVE, reason="sparsekit._C (CPU C++ kernels) is not loaded")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("n,m", [(4, 8), (8, 16)], ids=str)
def test_nm_unpack_one_swapped_pair_in_a_group(n, m, dtype, isa, monkeypatch):
    """4:8 and 8:16 decode through a column mask only when a group's positions increase, checked within each code
    byte and across a group's bytes: one swapped pair at each place in turn (in one group of a row, the other
    rows and groups increasing) still decodes as the scatter."""
    set_isa(isa, monkeypatch)
    kept, groups = m - n, 70  # 70 groups: a full 64-byte step of codes and a partial one
    torch.manual_seed(m)
    w = nm_weight(kept - 1, groups * m, n, m, dtype)
    p = pack_nm(w, n, m)
    indices, values = p.indices.clone(), p.values.clone()
    for k in range(kept - 1):  # row k: positions k and k + 1 of group 37 swapped
        j = 37 * kept + k
        indices[k, [j, j + 1]] = indices[k, [j + 1, j]]
        values[k, [j, j + 1]] = values[k, [j + 1, j]]
    codes = nm_index_codes(indices, m)
    got = ops.nm_unpack(values, codes, n, m, groups * m)
    assert torch.equal(got, w)
    assert torch.equal(exact(got), exact(R.nm_unpack_reference(values, codes, n, m, groups * m)))


@pytest.mark.skipif(not CPP_LIVE, reason="sparsekit._C (CPU C++ kernels) is not loaded")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (8, 16)], ids=str)
def test_nm_unpack_repeated_position_last_value_wins(n, m, isa, monkeypatch):
    """Codes pack_nm never makes (all zero: every kept value at position 0) are written value by value, the last
    one winning."""
    set_isa(isa, monkeypatch)
    rows, groups, kept = 3, 9, m - n
    values = torch.randn(rows, groups * kept)
    codes = torch.zeros(rows, -(-groups * kept * nm_index_bits(m) // 8), dtype=torch.uint8)
    want = torch.zeros(rows, groups, m)
    want[:, :, 0] = values.reshape(rows, groups, kept)[:, :, -1]
    assert torch.equal(ops.nm_unpack(values, codes, n, m, groups * m), want.reshape(rows, -1))


@pytest.mark.skipif(not CPP_LIVE, reason="sparsekit._C (CPU C++ kernels) is not loaded")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("n,m,in_f", [(4, 8, 128), (4, 8, 72), (1, 2, 64), (2, 8, 96), (3, 6, 36)], ids=str)
# no rows of x (no loop runs), the streamed kernels (1, 8 rows), the bfloat16 panel path (20), decode + BLAS (70)
@pytest.mark.parametrize("rows", [0, 1, 8, 20, 70])
def test_nm_linear_rejects_a_position_outside_the_group(rows, n, m, in_f, dtype, isa, monkeypatch):
    """A code >= M (4-bit codes hold up to 15, 2-bit up to 3) would read another group's input, or past the
    row: every path raises, in the middle of a row and in the scalar tail after the last vector step."""
    set_isa(isa, monkeypatch)
    values, codes = packed_args(5, in_f, n, m, dtype)
    bits = nm_index_bits(m)
    for j in (1, values.shape[1] - 1):  # a kept value early in the row, and the row's last one
        bad = codes.clone()
        bad[3, j * bits // 8] |= ((1 << bits) - 1) << (j * bits % 8)  # the largest code the field holds
        x = torch.randn(rows, in_f).to(dtype)
        with pytest.raises(RuntimeError, match=f">= M={m} at row 3"):
            torch.ops.sparsekit.nm_linear(x, values, bad, n, m, in_f, None)


@pytest.mark.parametrize("isa", ISAS)
def test_nm_unpack_rejects_a_position_outside_the_group(isa, monkeypatch):
    set_isa(isa, monkeypatch)
    values = torch.randn(2, 4)  # 1:3, in_features 6: two groups of 3 keep 2 each
    # nm_index_codes refuses a position >= m: encode as for m = 4, whose codes are 2-bit like m = 3's
    codes = nm_index_codes(torch.tensor([[0, 1, 0, 2], [0, 1, 1, 3]], dtype=torch.uint8), 4)
    with pytest.raises(RuntimeError):  # C++: "index code 3 >= M=3 at row 1"; reference: scatter out of bounds
        ops.nm_unpack(values, codes, 1, 3, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_id)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)], ids=str)
def test_nm_unpack_opcheck(n, m, dtype):
    values, codes = packed_args(12, 96, n, m, dtype)
    torch.library.opcheck(torch.ops.sparsekit.nm_unpack.default, (values, codes, n, m, 96))


def test_nm_unpack_empty_shapes():
    values, codes = packed_args(0, 16, 2, 4, torch.float32)
    assert ops.nm_unpack(values, codes, 2, 4, 16).shape == (0, 16)
    empty = torch.zeros(3, 0)
    assert ops.nm_unpack(empty, torch.zeros(3, 0, dtype=torch.uint8), 2, 4, 0).shape == (3, 0)


def _bad_nm_unpack():
    values, codes = packed_args(8, 32, 2, 4, torch.float32)
    return [
        ((values.double(), codes, 2, 4, 32), "float32, bfloat16 or float16"),
        ((values[:, :-1], codes, 2, 4, 32), r"values must be \(out"),
        ((values, codes.int(), 2, 4, 32), "index_codes must be uint8"),
        ((values, codes[:, :-1], 2, 4, 32), "index_codes must be uint8"),
        ((values, codes, 2, 4, 30), "does not divide"),
        ((values, codes, 4, 4, 32), "N < M"),
    ]


@pytest.mark.parametrize("args,match", _bad_nm_unpack())
def test_nm_unpack_wrapper_raises_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        ops.nm_unpack(*args)


@pytest.mark.skipif(not CPP_LIVE, reason="sparsekit._C (CPU C++ kernels) is not loaded")
@pytest.mark.parametrize("args,match", _bad_nm_unpack())
def test_nm_unpack_cpp_raises_runtime_error(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sparsekit.nm_unpack(*args)


@pytest.mark.parametrize("isa", ["auto", "scalar"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", PACK_DTYPES, ids=_id)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)], ids=str)
# (out, in): one GEMM block; and above 4 MiB of dense weight (several blocks, the last one shorter)
@pytest.mark.parametrize("shape", [(33, 96), (1100, 2048)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [1, 5, 70])
def test_nm_unpack_linear_matches_reference(rows, shape, n, m, dtype, bias, isa, monkeypatch):
    set_isa(isa, monkeypatch)
    out_f, in_f = shape
    values, codes = packed_args(out_f, in_f, n, m, dtype)
    x = torch.randn(rows, in_f).to(dtype)
    b = torch.randn(out_f).to(dtype) if bias else None
    got = ops.nm_unpack_linear(x, values, codes, n, m, in_f, b)
    assert_linear_close(got, x, weight_of(values, codes, n, m, in_f), b)


@pytest.mark.parametrize("threads", [1, 2])
def test_nm_unpack_linear_threads_and_inference_mode(threads):
    """Blocks run on worker threads: their GEMMs must see the caller's inference mode (an inference tensor
    written outside it raises), and the result must not depend on the thread count."""
    values, codes = packed_args(600, 2048, 2, 4, torch.float32)
    x, b = torch.randn(2, 3, 2048), torch.randn(600)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            got = ops.nm_unpack_linear(x, values, codes, 2, 4, 2048, b)
    finally:
        torch.set_num_threads(previous)
    assert got.shape == (2, 3, 600)
    assert_linear_close(got.reshape(6, 600), x.reshape(6, 2048), weight_of(values, codes, 2, 4, 2048), b)


def test_nm_unpack_linear_empty_and_zero_width():
    values, codes = packed_args(8, 16, 2, 4, torch.float32)
    assert ops.nm_unpack_linear(torch.randn(0, 16), values, codes, 2, 4, 16).shape == (0, 8)
    b = torch.randn(3)
    got = ops.nm_unpack_linear(torch.randn(2, 0), torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.uint8), 2, 4, 0, b)
    assert torch.equal(got, b.expand(2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_nm_unpack_linear_opcheck(dtype):
    values, codes = packed_args(12, 64, 2, 4, dtype)
    op = torch.ops.sparsekit.nm_unpack_linear.default
    torch.library.opcheck(op, (torch.randn(3, 64).to(dtype), values, codes, 2, 4, 64, None))
    torch.library.opcheck(op, (torch.randn(2, 1, 64).to(dtype), values, codes, 2, 4, 64, torch.randn(12).to(dtype)))


@pytest.mark.parametrize("args,match", _bad_nm_linear())
def test_nm_unpack_linear_wrapper_raises_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        ops.nm_unpack_linear(*args)


@pytest.mark.skipif(not CPP_LIVE, reason="sparsekit._C (CPU C++ kernels) is not loaded")
@pytest.mark.parametrize("args,match", _bad_nm_linear())
def test_nm_unpack_linear_cpp_raises_runtime_error(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sparsekit.nm_unpack_linear(*args)


# ----------------------------------------------------------------------------------------------------------------
# check_nm_packed: what the kernels do not check per call
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (4, 8), (8, 16), (2, 8), (3, 6), (0, 4), (5, 8)], ids=str)
def test_check_nm_packed_accepts_what_pack_nm_makes_and_names_a_repeat(n, m):
    """Every packed weight pack_nm makes passes (decreasing positions too: distinct is what counts); a repeated
    position or one >= M is refused, naming the row and group."""
    torch.manual_seed(n * 17 + m)
    rows, groups, kept = 5, 7, m - n
    w = torch.randn(rows, groups * m)
    w.view(rows, groups, m).scatter_(-1, torch.rand(rows, groups, m).argsort(-1)[..., :n], 0.0)
    p = pack_nm(w, n, m)
    codes = nm_index_codes(p.indices, m)
    check_nm_packed(p.values, codes, n, m, groups * m)
    flipped = p.indices.reshape(rows, groups, kept).flip(-1).reshape(rows, -1)  # distinct, decreasing
    check_nm_packed(p.values, nm_index_codes(flipped, m), n, m, groups * m)
    if kept >= 2:
        rep = p.indices.clone().reshape(rows, groups, kept)
        rep[3, 4, kept - 1] = rep[3, 4, 0]
        with pytest.raises(ValueError, match=r"row 3, group 4 \(columns {}\.\.{}\) repeats a position".format(
                4 * m, 5 * m - 1)):
            check_nm_packed(p.values, nm_index_codes(rep.reshape(rows, -1), m), n, m, groups * m)
    if m not in (2, 4, 16):  # a code field can hold m: 2-bit codes hold 0..3, 4-bit ones 0..15
        big = codes.clone()
        bits = nm_index_bits(m)
        j = 2 * kept + 1 if kept > 1 else 2 * kept  # row 1, group 2
        big[1, j * bits // 8] |= m << (j * bits % 8)
        with pytest.raises(ValueError, match=f"row 1, group 2 .* holds position {m | int(p.indices[1, j])}"):
            check_nm_packed(p.values, big, n, m, groups * m)


def test_check_nm_packed_shape_errors():
    p = pack_nm(torch.zeros(3, 16), 2, 4)
    codes = nm_index_codes(p.indices, 4)
    with pytest.raises(ValueError, match="M=4 does not divide in_features=18"):
        check_nm_packed(p.values, codes, 2, 4, 18)
    with pytest.raises(ValueError, match=r"values must be \(out, 16\)"):
        check_nm_packed(p.values, codes, 2, 4, 32)
    with pytest.raises(ValueError, match=r"index_codes must be uint8 \(3, 2\)"):
        check_nm_packed(p.values, codes.to(torch.int16), 2, 4, 16)
    with pytest.raises(ValueError, match="N:M"):
        check_nm_packed(p.values, codes, 4, 4, 16)
