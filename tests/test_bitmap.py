"""Bitmap packed weights (sparsekit.formats.bitmap) and sparsekit::bitmap_linear.

Packing: exact round trips at several sparsities (0%, all zeros, widths that are not a multiple of 64), a
hand-worked layout (bit 63 is int64's sign bit), and the op (C++ when built: AVX-512 path and, with
SPARSEKIT_CPU_ISA=scalar, the portable one) against the float64 result on the same inputs. Tolerances as
in test_sparse24.py: float32 rtol 1e-5 of the sum of |products|, bfloat16 one ulp of the exactly rounded
result.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sparsekit
from sparsekit import ops
from sparsekit.formats import BitmapPacked, pack_bitmap, unpack_bitmap
from sparsekit.ops import reference as R
from guard_page import before_guard_page
from linear_check import assert_linear_close, set_isa

CPP_LIVE = sparsekit.backend_status()["cpu"].live


def _id(v):
    return str(v).removeprefix("torch.")


def sparse_weight(rows, cols, sparsity, dtype=torch.float32):
    """Per-row magnitude pruning of a fresh randn weight to the given fraction of zeros."""
    w = torch.randn(rows, cols)
    return (w * ops.rowwise_prune_mask(w.abs(), round(sparsity * cols))).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_id)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(1, 1), (7, 130), (33, 64), (64, 128), (5, 200)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_pack_bitmap_round_trip(shape, sparsity, dtype):
    w = sparse_weight(*shape, sparsity, dtype)
    p = pack_bitmap(w)
    tiles = -(-shape[1] // 64)
    assert p.bitmask.shape == (shape[0], tiles) and p.bitmask.dtype == torch.int64
    assert p.values.shape == (int((w != 0).sum()),) and p.values.dtype == dtype
    assert p.row_offsets.tolist() == [0] + (w != 0).sum(1).cumsum(0).tolist()
    assert torch.equal(unpack_bitmap(p), w)


def test_pack_bitmap_hand_worked():
    w = torch.zeros(2, 70)
    w[0, 0], w[0, 63], w[0, 64], w[0, 69] = 1.0, 2.0, 3.0, 4.0
    w[1, 5] = 5.0
    p = pack_bitmap(w)
    assert p.bitmask.tolist() == [[1 - 2**63, 1 + 2**5], [2**5, 0]]  # bit 63 set: int64's sign bit
    assert p.values.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert p.row_offsets.tolist() == [0, 4, 5]
    assert isinstance(p, BitmapPacked) and p.shape == (2, 70)


@pytest.mark.parametrize(
    "args,match", [((torch.zeros(8),), "2-D"), ((torch.zeros(2, 8, dtype=torch.int64),), "floating")]
)
def test_pack_bitmap_errors(args, match):
    with pytest.raises(ValueError, match=match):
        pack_bitmap(*args)


def packed_args(out_f, in_f, sparsity, dtype):
    p = pack_bitmap(sparse_weight(out_f, in_f, sparsity, dtype))
    return p.bitmask, p.values, p.row_offsets


# "avx512": AVX-512 without its BF16/VBMI2 extensions (bfloat16 then takes the float32-lane path, not vdpbf16ps)
@pytest.mark.parametrize("isa", ["auto", "avx512", "scalar"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
# K blocks of the streamed kernel (streamed.h): 24x2600 has several from 4 rows up and a partial last tile;
# at 8 rows 17x1025 has a last block of one tile holding one column. Rows: passes of 1-8 rows, a short pass
# after full ones (13, 40), the most the kernels stream in bfloat16 (64), the decode + BLAS path (70, with the
# streamed limit held at 64), and 200 (40 and 200 with the streamed limit raised to 2048: float32 on the AVX-512
# lanes streams them, the rest decode).
@pytest.mark.parametrize(
    "shape", [(64, 128), (96, 256), (33, 512), (17, 100), (24, 2600), (17, 1025)], ids=lambda s: f"{s[0]}x{s[1]}"
)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6, 7, 8, 13, 16, 40, 64, 70, 200])
def test_bitmap_linear_matches_reference(rows, shape, sparsity, dtype, bias, isa, monkeypatch):
    set_isa(isa, monkeypatch)
    if rows == 70:
        monkeypatch.setenv("SPARSEKIT_CPU_STREAMED_MAX_ROWS", "64")
    elif rows in (40, 200) and dtype == torch.float32 and isa != "scalar":
        # float32 streams only 24 rows by default (decode + GEMM above: test_panel.py)
        monkeypatch.setenv("SPARSEKIT_CPU_STREAMED_MAX_ROWS", "2048")
    out_f, in_f = shape
    bitmask, values, offsets = packed_args(out_f, in_f, sparsity, dtype)
    x = torch.randn(rows, in_f).to(dtype)
    b = torch.randn(out_f).to(dtype) if bias else None
    got = torch.ops.sparsekit.bitmap_linear(x, bitmask, values, offsets, in_f, b)
    weight = unpack_bitmap(BitmapPacked(bitmask, values, offsets, shape))
    assert_linear_close(got, x, weight, b)


@pytest.mark.parametrize("isa", ["auto", "avx512", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("sparsity", [0.0, 1.0])
@pytest.mark.parametrize("rows", [1, 8, 13])
def test_bitmap_linear_full_and_empty_tiles(rows, sparsity, dtype, isa, monkeypatch):
    """Every bit set (16-bit and 32-bit expand masks all ones) or none (no values at all)."""
    set_isa(isa, monkeypatch)
    bitmask, values, offsets = packed_args(24, 2600, sparsity, dtype)
    x = torch.randn(rows, 2600).to(dtype)
    b = torch.randn(24).to(dtype)
    got = torch.ops.sparsekit.bitmap_linear(x, bitmask, values, offsets, 2600, b)
    assert_linear_close(got, x, unpack_bitmap(BitmapPacked(bitmask, values, offsets, (24, 2600))), b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_id)
def test_bitmap_linear_leading_dims_and_wrapper(dtype):
    bitmask, values, offsets = packed_args(48, 100, 0.7, dtype)
    x = torch.randn(2, 3, 100).to(dtype)
    b = torch.randn(48).to(dtype)
    got = ops.bitmap_linear(x, bitmask, values, offsets, 100, b)
    assert got.shape == (2, 3, 48)
    assert torch.equal(got.reshape(6, 48), ops.bitmap_linear(x.reshape(6, 100), bitmask, values, offsets, 100, b))
    ref = R.bitmap_linear_reference(x.float(), bitmask, values.float(), offsets, 100, b.float())
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got.float(), ref, **tol)


@pytest.mark.parametrize("isa", ["auto", "avx512", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_id)
def test_bitmap_linear_zero_in_features_gives_bias(dtype, isa, monkeypatch):
    set_isa(isa, monkeypatch)
    bitmask, values, offsets = torch.zeros(5, 0, dtype=torch.int64), torch.zeros(0).to(dtype), torch.zeros(6, dtype=torch.int64)
    b = torch.randn(5).to(dtype)
    x = torch.randn(2, 3, 0).to(dtype)
    assert torch.equal(ops.bitmap_linear(x, bitmask, values, offsets, 0, b), b.expand(2, 3, 5))
    assert torch.equal(ops.bitmap_linear(x, bitmask, values, offsets, 0, None), torch.zeros(2, 3, 5).to(dtype))


_SMALL_K_BLOCKS = textwrap.dedent("""
    import torch
    from linear_check import assert_linear_close
    from sparsekit import ops
    from sparsekit.formats import nm_index_codes, pack_bitmap, pack_nm, unpack_bitmap, unpack_nm
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        # 150, 151: several row blocks (streamed::kRowBlock); 151 x 1100: bfloat16 bitmap rows in pairs (from 8 rows
        # of x and 1024 columns, bitmap_gemv.cpp) with an odd last row
        for out_f, in_f in ((24, 700), (9, 260), (150, 700), (151, 1100)):
            w = torch.randn(out_f, in_f)
            w24 = (w * ops.nm_mask(w.abs(), 2, 4)).to(dtype)
            p = pack_nm(w24, 2, 4)
            codes = nm_index_codes(p.indices, 4)
            wb = (w * (torch.rand(out_f, in_f) < 0.4)).to(dtype)
            pb = pack_bitmap(wb)
            b = torch.randn(out_f).to(dtype)
            for rows in (1, 5, 8, 13, 20):  # 13, 20: every row block goes through 2 and 3 passes
                x = torch.randn(rows, in_f).to(dtype)
                assert_linear_close(ops.nm_linear(x, p.values, codes, 2, 4, in_f, b), x, unpack_nm(p), b)
                got = ops.bitmap_linear(x, pb.bitmask, pb.values, pb.row_offsets, in_f, b)
                assert_linear_close(got, x, unpack_bitmap(pb), b)
    print("ok")
""")


@pytest.mark.parametrize("isa", ["auto", "avx512"])
def test_streamed_kernels_with_one_tile_k_blocks(isa):
    """The streamed kernels' K blocks (csrc/cpu/streamed.h) at their smallest, 64 columns (SPARSEKIT_CPU_KC=64,
    read once per process, hence a subprocess): every tile / 32-value step starts a block, so each row's
    value cursor is carried and y accumulated across many blocks (and, with 150 outputs and up to 20 rows of x,
    across row blocks that go through several passes), for 2:4 and bitmap, float32 and bfloat16."""
    if not CPP_LIVE:
        pytest.skip("the K blocks are the C++ kernel's")
    env = dict(os.environ, SPARSEKIT_CPU_KC="64", PYTHONPATH=str(Path(__file__).parent))
    if isa != "auto":
        env["SPARSEKIT_CPU_ISA"] = isa
    run = subprocess.run([sys.executable, "-c", _SMALL_K_BLOCKS], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_bitmap_linear_all_zero_weight_gives_bias():
    bitmask, values, offsets = packed_args(8, 64, 1.0, torch.float32)
    b = torch.randn(8)
    assert torch.equal(ops.bitmap_linear(torch.randn(3, 64), bitmask, values, offsets, 64, b), b.expand(3, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_bitmap_linear_opcheck(dtype):
    bitmask, values, offsets = packed_args(12, 100, 0.7, dtype)
    torch.library.opcheck(
        torch.ops.sparsekit.bitmap_linear.default, (torch.randn(3, 100).to(dtype), bitmask, values, offsets, 100, None)
    )
    torch.library.opcheck(
        torch.ops.sparsekit.bitmap_linear.default,
        (torch.randn(2, 1, 100).to(dtype), bitmask, values, offsets, 100, torch.randn(12).to(dtype)),
    )


def test_bitmap_linear_compiles_fullgraph():
    """The op traces as one node (fake implementation, no graph break); aot_eager keeps the test fast."""
    bitmask, values, offsets = packed_args(24, 100, 0.7, torch.float32)
    x, b = torch.randn(2, 5, 100), torch.randn(24)
    fn = torch.compile(
        lambda x: ops.bitmap_linear(x, bitmask, values, offsets, 100, b) * 2, backend="aot_eager", fullgraph=True
    )
    assert torch.equal(fn(x), ops.bitmap_linear(x, bitmask, values, offsets, 100, b) * 2)


def _bad_bitmap_linear():
    bitmask, values, offsets = packed_args(8, 100, 0.5, torch.float32)
    x = torch.randn(3, 100)
    return [
        ((torch.randn(3, 99), bitmask, values, offsets, 100, None), "in_features=100"),
        ((x.bfloat16(), bitmask, values, offsets, 100, None), "values must"),
        ((x, bitmask[:, :1], values, offsets, 100, None), r"bitmask must be int64 \(out"),
        ((x, bitmask.int(), values, offsets, 100, None), "bitmask must be int64"),
        ((x, bitmask, values, offsets[:-1], 100, None), "row_offsets must be int64"),
        ((x, bitmask, values.reshape(1, -1), offsets, 100, None), "values must"),
        ((x, bitmask, values, offsets, 100, torch.randn(9)), "bias must be"),
    ]


@pytest.mark.parametrize("args,match", _bad_bitmap_linear())
def test_bitmap_linear_wrapper_raises_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        ops.bitmap_linear(*args)


@pytest.mark.skipif(not CPP_LIVE, reason="sparsekit._C (CPU C++ kernels) is not loaded")
@pytest.mark.parametrize("args,match", _bad_bitmap_linear())
def test_bitmap_linear_cpp_raises_runtime_error(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sparsekit.bitmap_linear(*args)


@pytest.mark.skipif(not CPP_LIVE, reason="sparsekit._C (CPU C++ kernels) is not loaded")
def test_bitmap_linear_cpp_rejects_offsets_not_ending_at_nnz():
    bitmask, values, offsets = packed_args(8, 100, 0.5, torch.float32)
    with pytest.raises(RuntimeError, match="row_offsets must run from 0 to nnz"):
        torch.ops.sparsekit.bitmap_linear(torch.randn(2, 100), bitmask, values[:-1], offsets, 100, None)


# ----------------------------------------------------------------------------------------------------
# bitmap_unpack (packed -> dense) and bitmap_unpack_linear (decode + BLAS), against the reference
# ----------------------------------------------------------------------------------------------------
ISAS = ["auto", "avx512", "scalar"]  # as in test_sparse24.py: AVX-512 (+VBMI2 where present), without, portable


def exact(t):
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_id)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.9, 1.0])
# widths: under one 16/32-column chunk, a partial last tile, exact tiles, many tiles
@pytest.mark.parametrize("shape", [(1, 1), (7, 130), (33, 64), (5, 200), (16, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_bitmap_unpack_matches_reference_exactly(shape, sparsity, dtype, isa, monkeypatch):
    set_isa(isa, monkeypatch)
    w = sparse_weight(*shape, sparsity, dtype)
    w[shape[0] // 2] = 0  # an empty row in the middle
    p = pack_bitmap(w)
    got = ops.bitmap_unpack(p.bitmask, p.values, p.row_offsets, shape[1])
    assert got.dtype == dtype and got.shape == w.shape
    assert torch.equal(exact(got), exact(R.bitmap_unpack_reference(p.bitmask, p.values, p.row_offsets, shape[1])))
    assert torch.equal(got, w)


@pytest.mark.parametrize("isa", ISAS)
def test_bitmap_unpack_ignores_bits_past_in_features(isa, monkeypatch):
    set_isa(isa, monkeypatch)
    w = sparse_weight(3, 70, 0.5)
    p = pack_bitmap(w)
    bitmask = p.bitmask.clone()
    bitmask[:, 1] |= 1 << 40  # column 104 of a 70-column weight
    got = ops.bitmap_unpack(bitmask, p.values, p.row_offsets, 70)
    assert torch.equal(got, w)
    assert torch.equal(got, R.bitmap_unpack_reference(bitmask, p.values, p.row_offsets, 70))


@pytest.mark.skipif(not CPP_LIVE, reason="sparsekit._C (CPU C++ kernels) is not loaded")
def test_bitmap_unpack_cpp_checks_every_row_against_its_popcount():
    p = pack_bitmap(sparse_weight(4, 100, 0.5))
    offsets = p.row_offsets.clone()
    offsets[2] += 1  # row 1 claims one value more than its bits, row 2 one fewer; the total still matches
    with pytest.raises(RuntimeError, match="row 1 has 50 bits set but row_offsets gives it values"):
        torch.ops.sparsekit.bitmap_unpack(p.bitmask, p.values, offsets, 100)
    with pytest.raises(RuntimeError, match="row_offsets must run from 0 to nnz"):
        torch.ops.sparsekit.bitmap_unpack(p.bitmask, p.values[:-1], p.row_offsets, 100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_id)
def test_bitmap_unpack_opcheck(dtype):
    bitmask, values, offsets = packed_args(12, 100, 0.7, dtype)
    torch.library.opcheck(torch.ops.sparsekit.bitmap_unpack.default, (bitmask, values, offsets, 100))


def _bad_bitmap_unpack():
    bitmask, values, offsets = packed_args(8, 100, 0.5, torch.float32)
    return [
        ((bitmask, values.double(), offsets, 100), "float32, bfloat16 or float16"),
        ((bitmask[:, :1], values, offsets, 100), r"bitmask must be int64 \(out"),
        ((bitmask.int(), values, offsets, 100), "bitmask must be int64"),
        ((bitmask, values, offsets[:-1], 100), "row_offsets must be int64"),
        ((bitmask, values.reshape(1, -1), offsets, 100), "values must be 1-D"),
    ]


@pytest.mark.parametrize("args,match", _bad_bitmap_unpack())
def test_bitmap_unpack_wrapper_raises_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        ops.bitmap_unpack(*args)


@pytest.mark.skipif(not CPP_LIVE, reason="sparsekit._C (CPU C++ kernels) is not loaded")
@pytest.mark.parametrize("args,match", _bad_bitmap_unpack())
def test_bitmap_unpack_cpp_raises_runtime_error(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sparsekit.bitmap_unpack(*args)


@pytest.mark.parametrize("isa", ["auto", "scalar"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_id)
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
# (out, in): one GEMM block; and above 4 MiB of dense weight (several blocks, the last one shorter)
@pytest.mark.parametrize("shape", [(33, 100), (1100, 2000)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [1, 5, 70])
def test_bitmap_unpack_linear_matches_reference(rows, shape, sparsity, dtype, bias, isa, monkeypatch):
    set_isa(isa, monkeypatch)
    out_f, in_f = shape
    bitmask, values, offsets = packed_args(out_f, in_f, sparsity, dtype)
    x = torch.randn(rows, in_f).to(dtype)
    b = torch.randn(out_f).to(dtype) if bias else None
    got = ops.bitmap_unpack_linear(x, bitmask, values, offsets, in_f, b)
    assert_linear_close(got, x, unpack_bitmap(BitmapPacked(bitmask, values, offsets, shape)), b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_bitmap_unpack_linear_opcheck(dtype):
    bitmask, values, offsets = packed_args(12, 100, 0.7, dtype)
    op = torch.ops.sparsekit.bitmap_unpack_linear.default
    torch.library.opcheck(op, (torch.randn(3, 100).to(dtype), bitmask, values, offsets, 100, None))
    torch.library.opcheck(op, (torch.randn(2, 1, 100).to(dtype), bitmask, values, offsets, 100,
                               torch.randn(12).to(dtype)))


@pytest.mark.parametrize("args,match", _bad_bitmap_linear())
def test_bitmap_unpack_linear_wrapper_raises_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        ops.bitmap_unpack_linear(*args)


@pytest.mark.skipif(not CPP_LIVE, reason="sparsekit._C (CPU C++ kernels) is not loaded")
@pytest.mark.parametrize("args,match", _bad_bitmap_linear())
def test_bitmap_unpack_linear_cpp_raises_runtime_error(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sparsekit.bitmap_unpack_linear(*args)


# ----------------------------------------------------------------------------------------------------
# The vector paths load packed values with expand-loads, which read only the values a chunk consumes. A
# packed weight whose values end on the last byte before an unreadable page must not fault, whatever path
# reads it (a load of a whole vector there would).
# ----------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not CPP_LIVE, reason="sparsekit._C (CPU C++ kernels) is not loaded")
@pytest.mark.parametrize("isa", ["auto", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("rows", [1, 8, 70])  # one row of x, rows of W in pairs (bfloat16 dot path), decode + BLAS
def test_bitmap_kernels_read_no_value_past_the_end(rows, dtype, isa, monkeypatch):
    set_isa(isa, monkeypatch)
    out_f, in_f = 10, 1090  # 17 full tiles and a partial one; >= 1024 columns for the paired-row kernel
    w = sparse_weight(out_f, in_f, 0.5, dtype)
    w[-1, :] = 0
    w[-1, -3] = 1.5  # the last value sits alone in the last row's last tile: every chunk before it is empty
    p = pack_bitmap(w)
    values = before_guard_page(p.values)
    x = torch.randn(rows, in_f).to(dtype)
    assert torch.equal(ops.bitmap_unpack(p.bitmask, values, p.row_offsets, in_f), w)
    got = torch.ops.sparsekit.bitmap_linear(x, p.bitmask, values, p.row_offsets, in_f, None)
    assert_linear_close(got, x, w, None)
    got = torch.ops.sparsekit.bitmap_unpack_linear(x, p.bitmask, values, p.row_offsets, in_f, None)
    assert_linear_close(got, x, w, None)


@pytest.mark.skipif(not CPP_LIVE, reason="sparsekit._C (CPU C++ kernels) is not loaded")
@pytest.mark.parametrize("isa", ["auto", "avx512", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("rows", [1, 8, 70])
def test_bitmap_linear_ignores_bits_past_in_features(rows, dtype, isa, monkeypatch):
    """As the reference: set bits past in_features in the last tile name no column and take no value (before
    the kernels cleared them, the last row's took one from past nnz: the guard page turns that into a crash)."""
    set_isa(isa, monkeypatch)
    out_f, in_f = 10, 1090  # the last tile holds columns 1088 and 1089
    w = sparse_weight(out_f, in_f, 0.5, dtype)
    p = pack_bitmap(w)
    bitmask = p.bitmask.clone()
    bitmask[:, -1] |= (1 << 40) | (1 << 5)
    values = before_guard_page(p.values)
    x = torch.randn(rows, in_f).to(dtype)
    b = torch.randn(out_f).to(dtype)
    want = R.bitmap_linear_reference(x, bitmask, values, p.row_offsets, in_f, b)
    got = torch.ops.sparsekit.bitmap_linear(x, bitmask, values, p.row_offsets, in_f, b)
    assert_linear_close(got, x, w, b)
    assert_linear_close(want, x, w, b)
    assert torch.equal(bitmask[:, :-1], p.bitmask[:, :-1]) and (bitmask[:, -1] != p.bitmask[:, -1]).all()  # untouched


@pytest.mark.skipif(not CPP_LIVE, reason="sparsekit._C (CPU C++ kernels) is not loaded")
@pytest.mark.parametrize("isa", ["auto", "avx512", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("rows", [1, 8, 70])
def test_bitmap_linear_cpp_rejects_offsets_that_disagree_with_the_bits(rows, dtype, isa, monkeypatch):
    """row_offsets that do not match the rows' popcounts raise (before the fix: a wrong result, or a read past
    the end of the values for the last rows), whichever path the call takes."""
    set_isa(isa, monkeypatch)
    w = sparse_weight(12, 300, 0.5, dtype)
    p = pack_bitmap(w)
    values = before_guard_page(p.values)
    x = torch.randn(rows, 300).to(dtype)
    shifted = p.row_offsets.clone()
    shifted[3] += 2  # rows 2 and 3 keep the total but each claims the wrong count
    with pytest.raises(RuntimeError, match="row 2 has"):
        torch.ops.sparsekit.bitmap_linear(x, p.bitmask, values, shifted, 300, None)
    decreasing = p.row_offsets.clone()
    decreasing[5] = decreasing[7] + 1
    with pytest.raises(RuntimeError, match="must not decrease|row 4 has"):
        torch.ops.sparsekit.bitmap_linear(x, p.bitmask, values, decreasing, 300, None)
    extra = p.bitmask.clone()
    extra[-1, :] = -1  # every bit of the last row set: 300 bits for the ~150 values it has
    with pytest.raises(RuntimeError, match="row 11 has"):
        torch.ops.sparsekit.bitmap_linear(x, extra, values, p.row_offsets, 300, None)
