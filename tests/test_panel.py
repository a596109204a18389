"""The CPU panel path (csrc/cpu/panel_gemm.h) and the N:M decode paths (csrc/cpu/sparse24_unpack.cpp).

The panel path runs bfloat16 calls of nm_unpack_linear / bitmap_unpack_linear with 1..128 rows of x, and of
nm_linear (half-density N:M: 1:2, 2:4, 4:8, 8:16) / bitmap_linear from 13 / 25 rows on (9 for weights of at most
2^20 elements), on CPUs with AVX512-BF16; elsewhere (and with
SPARSEKIT_CPU_PANEL=0) the same calls take block decode + BLAS. Either way the result must match the exact
product: the cases below cross its tiles (24 weight rows), chunks of x (64 rows), vector groups of x (16 rows)
and K blocks (1024 column pairs at 64 rows of x, 4096 at 16).

Which path a packed op takes by rows of x (the streamed kernels up to streamed::max_rows, decode + GEMM above) is
checked here too, through what the paths do with an inf of x at a pruned position.
"""

import pytest
import torch

import sparsekit
from sparsekit import ops
from sparsekit.formats import NMPacked, nm_index_codes, pack_bitmap, pack_nm, unpack_nm
from sparsekit.nn.sparse_linear import cpu_sparse_kernels_fast
from guard_page import before_guard_page
from linear_check import assert_linear_close, set_isa

CPP_LIVE = sparsekit.backend_status()["cpu"].live


def _nm_weight(out_f, in_f, n, m, dtype):
    w = torch.randn(out_f, in_f)
    groups = w.view(out_f, in_f // m, m)
    drop = groups.abs().topk(n, dim=-1, largest=False).indices
    groups.scatter_(-1, drop, 0.0)
    return w.to(dtype)


def _bitmap_weight(out_f, in_f, sparsity, dtype):
    w = torch.randn(out_f, in_f)
    w[torch.rand(out_f, in_f) < sparsity] = 0.0
    return w.to(dtype)


def _run(fmt, op, x, w, b):
    """y from the op `op` ("unpack" or "packed") on weight w packed as fmt."""
    in_f = w.shape[1]
    if fmt in ("2:4", "4:8"):
        n, m = (2, 4) if fmt == "2:4" else (4, 8)
        p = pack_nm(w, n, m)
        codes = nm_index_codes(p.indices, m)
        f = ops.nm_unpack_linear if op == "unpack" else ops.nm_linear
        return f(x, p.values, codes, n, m, in_f, b)
    p = pack_bitmap(w)
    f = ops.bitmap_unpack_linear if op == "unpack" else ops.bitmap_linear
    return f(x, p.bitmask, p.values, p.row_offsets, in_f, b)


# (rows, (out, in)): one partial tile; two tiles and a partial one with several K blocks from 33 rows on; one K
# block at 13..32 rows (4096 pairs) crossed at 8200 columns. Rows 16k + 1..4 (17, 20, 33, 36, 65, 100) end in
# tail_times_tile, whose columns go 32 at a time: 8200, 100 and 24 columns leave a masked rest (24: only the rest).
_CASES = ([(rows, shape) for shape in [(5, 64), (50, 2112)]
           for rows in [9, 12, 13, 16, 17, 20, 21, 33, 36, 48, 64, 65, 100, 128, 129]]
          + [(rows, (24, 8200)) for rows in [13, 16, 18, 33, 129]]
          + [(rows, shape) for shape in [(7, 100), (3, 24)] for rows in [17, 19, 20, 35]])


@pytest.mark.parametrize("panel", ["on", "off"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("op", ["unpack", "packed"])
@pytest.mark.parametrize("fmt", ["2:4", "bitmap"])
@pytest.mark.parametrize("rows,shape", _CASES, ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else str(v))
def test_bf16_linear_matches_reference_across_panel_boundaries(rows, shape, fmt, op, bias, panel, monkeypatch):
    if panel == "off":
        monkeypatch.setenv("SPARSEKIT_CPU_PANEL", "0")
    torch.manual_seed(rows * 7 + shape[0])
    out_f, in_f = shape
    w = _nm_weight(out_f, in_f, 2, 4, torch.bfloat16) if fmt == "2:4" else _bitmap_weight(out_f, in_f, 0.6,
                                                                                         torch.bfloat16)
    x = torch.randn(rows, in_f).bfloat16()
    b = torch.randn(out_f).bfloat16() if bias else None
    assert_linear_close(_run(fmt, op, x, w, b), x, w, b)


@pytest.mark.parametrize("fmt", ["2:4", "4:8", "bitmap"])
def test_bf16_panel_leading_dims_threads_and_odd_width(fmt):
    """3-D x through the panel path with 1 and 2 threads gives one result; an odd in_features (no column pairs)
    takes decode + BLAS and is right too."""
    torch.manual_seed(0)
    w = (_bitmap_weight(70, 96, 0.5, torch.bfloat16) if fmt == "bitmap"
         else _nm_weight(70, 96, *((2, 4) if fmt == "2:4" else (4, 8)), torch.bfloat16))
    x = torch.randn(2, 20, 96).bfloat16()
    b = torch.randn(70).bfloat16()
    previous = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                outs.append(_run(fmt, "unpack", x, w, b))
    finally:
        torch.set_num_threads(previous)
    assert outs[0].shape == (2, 20, 70)
    assert torch.equal(outs[0], outs[1])  # each output is one thread's sum in a fixed order
    assert_linear_close(outs[0].reshape(40, 70), x.reshape(40, 96), w, b)
    if fmt == "bitmap":
        w_odd = _bitmap_weight(30, 75, 0.5, torch.bfloat16)
        x_odd = torch.randn(40, 75).bfloat16()
        assert_linear_close(_run(fmt, "unpack", x_odd, w_odd, None), x_odd, w_odd, None)


# ----------------------------------------------------------------------------------------------------
# float32: decode + the AVX-512 GEMM of csrc/cpu/sgemm.h (8-row x 48-feature tiles, 384-feature x 384-column
# packed blocks, 1024 rows of x per pass), which nm_unpack_linear / bitmap_unpack_linear run on CPUs with AVX-512
# (at::addmm elsewhere, with SPARSEKIT_CPU_PANEL=0 and on the scalar ISA path), and nm_linear / bitmap_linear
# above 24 rows of x.
# ----------------------------------------------------------------------------------------------------
# (rows, (out, in)): rows around the 8-row tiles (1, 7, 9, 25, 31, 33, 70) and past 1024 (1030); output features
# in one partial panel (5), three panels and one (50), two 384-feature blocks (400: the second a single panel);
# columns in one partial 16 (24), a partial last vector (104), a second partial K block (520 = 384 + 136, 392) and
# 5 blocks and a part (2000, where 1100 x 2000 float32 is two decode blocks of 4 MiB and more).
_F32_CASES = ([(rows, shape) for shape in [(5, 24), (50, 104), (200, 520), (400, 64)]
               for rows in [1, 7, 9, 25, 31, 33, 70]]
              + [(rows, (1100, 2000)) for rows in [25, 70]] + [(1030, (40, 392))])


@pytest.mark.parametrize("isa", ["auto", "scalar"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("op", ["unpack", "packed"])
@pytest.mark.parametrize("fmt", ["2:4", "4:8", "bitmap"])
@pytest.mark.parametrize("rows,shape", _F32_CASES, ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else str(v))
def test_f32_linear_matches_reference_across_gemm_boundaries(rows, shape, fmt, op, bias, isa, monkeypatch):
    set_isa(isa, monkeypatch)
    torch.manual_seed(rows * 7 + shape[0] + shape[1])
    out_f, in_f = shape
    w = (_bitmap_weight(out_f, in_f, 0.6, torch.float32) if fmt == "bitmap"
         else _nm_weight(out_f, in_f, *((2, 4) if fmt == "2:4" else (4, 8)), torch.float32))
    x = torch.randn(rows, in_f)
    b = torch.randn(out_f) if bias else None
    assert_linear_close(_run(fmt, op, x, w, b), x, w, b)


@pytest.mark.parametrize("fmt", ["2:4", "bitmap"])
def test_f32_gemm_threads_strided_bias_and_non_finite(fmt):
    """float32 decode + GEMM gives the same bits with 1, 2 and 3 threads, which cut a 96 x 520 weight into 1, 2 and 3
    blocks of output features (each output is one thread's sum over K blocks in order, whatever the blocks); one
    thread runs an 800 x 520 weight as one block, whose GEMM crosses two 384-feature blocks (the second ending in a
    partial panel) with a strided bias; and it multiplies the decoded zeros as F.linear does: an inf of x gives NaN
    wherever the weight's column is zero, a NaN in x its whole row."""
    torch.manual_seed(1)

    def weight(out_f, in_f):
        return (_bitmap_weight(out_f, in_f, 0.6, torch.float32) if fmt == "bitmap"
                else _nm_weight(out_f, in_f, 2, 4, torch.float32))

    w, x = weight(96, 520), torch.randn(3, 15, 520)
    b = torch.randn(192)[::2]  # strided
    w_big, x_big, b_big = weight(800, 520), torch.randn(70, 520), torch.randn(1600)[::2]
    previous = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(_run(fmt, "unpack", x, w, b))
        torch.set_num_threads(1)
        y_big = _run(fmt, "unpack", x_big, w_big, b_big)
    finally:
        torch.set_num_threads(previous)
    assert outs[0].shape == (3, 15, 96)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert_linear_close(outs[0].reshape(45, 96), x.reshape(45, 520), w, b)
    assert_linear_close(y_big, x_big, w_big, b_big)
    x2 = torch.randn(40, 520)
    x2[7, 11] = float("nan")
    x2[20, 3] = float("inf")  # column 3 is pruned in some rows of w: NaN there, +-inf elsewhere
    y = _run(fmt, "unpack", x2, w, None)
    expected = torch.nn.functional.linear(x2, w)
    assert bool((w[:, 3] == 0).any()) and bool((w[:, 3] != 0).any())
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    assert bool(torch.isnan(y[7]).all()) and bool(torch.isnan(y[20]).any()) and not bool(torch.isnan(y[20]).all())


@pytest.mark.parametrize("rows", [1, 25, 31])
@pytest.mark.parametrize("fmt", ["2:4", "bitmap"])
def test_f32_gemm_reads_no_row_of_x_past_the_last(fmt, rows):
    """x's last row ends at a page that may not be read: the GEMM's 8-row tiles repeat the last row of x for the
    rows past it (computed, not stored) instead of reading past x, and its K blocks stop at in_features."""
    torch.manual_seed(rows)
    in_f = 296
    w = _bitmap_weight(70, in_f, 0.6, torch.float32) if fmt == "bitmap" else _nm_weight(70, in_f, 2, 4,
                                                                                        torch.float32)
    x = before_guard_page(torch.randn(rows * in_f)).view(rows, in_f)
    assert_linear_close(_run(fmt, "unpack", x, w, None), x, w, None)


# ----------------------------------------------------------------------------------------------------
# N:M codes whose positions decrease within a group: the format writes them increasing (pack_nm), but the
# reference decodes any order as a scatter, and so must every kernel (an expand put them in column order).
# ----------------------------------------------------------------------------------------------------
def _decreasing(out_f, in_f, n, m, dtype, every_row=True):
    """(values, indices) of an N:M weight with the kept positions of every group in decreasing order (of the
    odd rows only when not every_row: rows of both kinds in one call)."""
    p = pack_nm(_nm_weight(out_f, in_f, n, m, dtype), n, m)
    kept = m - n
    indices = p.indices.view(out_f, -1, kept).flip(-1).reshape(out_f, -1).contiguous()
    values = p.values.view(out_f, -1, kept).flip(-1).reshape(out_f, -1).contiguous()
    if not every_row:
        indices[::2], values[::2] = p.indices[::2], p.values[::2]
    return values, indices


# 2:4, 4:8 and 8:16 have their own decode paths (a permute; vector-built group masks, then a rank permute or, on
# "vbmi2" and "avx512", a mask + expand, and a permute for rows whose positions do not increase); the other
# power-of-two patterns share a permute path.
@pytest.mark.parametrize("isa", ["auto", "vbmi2", "avx512", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
# widths: full steps; odd groups; tail groups; a 16-column tail after 32-column steps (those M divides)
@pytest.mark.parametrize("n,m,in_f", [(n, m, in_f) for n, m in [(2, 4), (4, 8), (8, 16), (1, 2), (2, 8), (6, 8)]
                                      for in_f in (96, 100, 104, 144) if in_f % m == 0], ids=str)
@pytest.mark.parametrize("every_row", [True, False], ids=["all-rows", "odd-rows"])
def test_nm_decode_of_decreasing_positions_is_a_scatter(every_row, in_f, n, m, dtype, isa, monkeypatch):
    set_isa(isa, monkeypatch)
    torch.manual_seed(in_f)
    values, indices = _decreasing(9, in_f, n, m, dtype, every_row)
    dense = unpack_nm(NMPacked(values, indices, (9, in_f), n, m))
    assert (dense != 0).sum() == values.count_nonzero()  # the flip kept every value, at its own position
    codes = nm_index_codes(indices, m)
    assert torch.equal(ops.nm_unpack(values, codes, n, m, in_f), dense)
    for rows in (1, 20, 70):
        x = torch.randn(rows, in_f).to(dtype)
        for f in (ops.nm_linear, ops.nm_unpack_linear):
            assert_linear_close(f(x, values, codes, n, m, in_f, None), x, dense, None)


@pytest.mark.skipif(not CPP_LIVE, reason="sparsekit._C (CPU C++ kernels) is not loaded")
@pytest.mark.parametrize("isa", ["auto", "scalar"])
@pytest.mark.parametrize("fmt", ["2:4", "4:8", "bitmap"])
def test_streamed_row_limit_decides_the_path(fmt, isa, monkeypatch):
    """float32 on the AVX-512 lanes streams up to 24 rows of x (2048 when the decoded GEMM is MKL's:
    SPARSEKIT_CPU_PANEL=0), bfloat16 and the portable loops up to 64, then the ops decode + GEMM;
    SPARSEKIT_CPU_STREAMED_MAX_ROWS overrides all. The path is seen from outside: the N:M
    streamed kernels pick the kept inputs, so an inf of x at a pruned position leaves y finite, while decode +
    GEMM multiplies the decoded zero (NaN, as F.linear); for bitmaps, row_offsets that disagree with the bits are
    reported by the op that runs (bitmap_linear's streamed checks, or bitmap_unpack's decode)."""
    set_isa(isa, monkeypatch)
    vector = isa == "auto" and cpu_sparse_kernels_fast()[0]
    torch.manual_seed(0)
    in_f = 64
    w = torch.randn(8, in_f)
    w[:, 0] = 0.0  # the smallest |w| of its group: pruned in every row
    if fmt == "bitmap":
        p = pack_bitmap(w * ops.rowwise_prune_mask(w.abs(), in_f // 2))
        offsets = p.row_offsets.clone()
        offsets[3] += 1  # rows 2 and 3 each claim one value too many / too few

        def streamed(rows, dtype=torch.float32):
            x = torch.randn(rows, in_f).to(dtype)
            with pytest.raises(RuntimeError, match=r"sparsekit::bitmap_(linear|unpack): row") as err:
                ops.bitmap_linear(x, p.bitmask, p.values.to(dtype), offsets, in_f)
            return "sparsekit::bitmap_linear" in str(err.value)
    else:
        n, m = (2, 4) if fmt == "2:4" else (4, 8)
        w = w * ops.nm_mask(w.abs(), n, m)

        def streamed(rows, dtype=torch.float32):
            x = torch.randn(rows, in_f)
            x[:, 0] = float("inf")
            y = _run(fmt, "packed", x.to(dtype), w.to(dtype), None)
            finite = bool(torch.isfinite(y).all())
            assert finite or bool(torch.isnan(y).all()), "one path for the whole call"
            return finite

    assert streamed(24)
    assert streamed(25) == (not vector) and streamed(64) == (not vector)
    assert not streamed(65)
    assert not streamed(65, torch.bfloat16)
    monkeypatch.setenv("SPARSEKIT_CPU_PANEL", "0")
    assert streamed(65) == vector and streamed(2048) == vector
    assert not streamed(2049)
    monkeypatch.delenv("SPARSEKIT_CPU_PANEL")
    monkeypatch.setenv("SPARSEKIT_CPU_STREAMED_MAX_ROWS", "8")
    assert streamed(8) and not streamed(9)
    monkeypatch.setenv("SPARSEKIT_CPU_STREAMED_MAX_ROWS", "3000")
    assert streamed(2049)
