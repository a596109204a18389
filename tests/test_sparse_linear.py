"""SparseLinear: the nn.Linear contract on packed weights, every forward path, storage and errors.

Each output is compared with the exact product on the same (low-precision) inputs, with the dtype's tolerance
(``linear_check.assert_linear_close``); the dense-cache path must equal ``F.linear`` on the pruned weight bit
for bit. Which path a call takes is checked twice: ``layer.path()`` against the measured policy pinned below,
and by counting the calls that reach the packed streaming op and the decode + BLAS op.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekit
from sparsekit import ops
from sparsekit.nn import SparseLinear
from sparsekit.nn.sparse_linear import (
    BITMAP_MIN_SPARSITY,
    CPU_BF16_MAX_ROWS_WITHOUT_DOT,
    CPU_BF16_MAX_ROWS_WITHOUT_PANEL,
    CPU_F32_ANY_ROWS,
    CPU_F32_MAX_ROWS_WITHOUT_GEMM,
    CPU_SPARSE_MAX_ROWS,
    CPU_SMALL_WEIGHT,
    CPU_SPARSE_MAX_ROWS_ONE_THREAD,
    CPU_SPARSE_MAX_ROWS_SMALL_WEIGHT,
    CPU_SPARSE_MAX_ROWS_UNPACK,
    auto_format,
    cpu_bf16_dot,
    cpu_bf16_panel,
    cpu_f32_gemm,
    cpu_sparse_kernels_fast,
    parse_format,
)
from linear_check import assert_linear_close, pruned_linear

FAST = cpu_sparse_kernels_fast()[0]


def _id(v):
    return str(v).removeprefix("torch.")


def count_calls(layer, method="_packed_op"):
    """Record the x shapes reaching ``layer.<method>`` (``_packed_op``: the streaming kernel; ``_unpack_op``:
    the decode + BLAS kernel)."""
    calls = []
    original = getattr(layer, method)

    def counted(x):
        calls.append(x.shape)
        return original(x)

    setattr(layer, method, counted)
    return calls


def expected_path(fmt, dtype, rows, fallback, numel, sparsity=0.5):
    """The path the dispatch tables give a layer of `numel` weights, written out independently of SparseLinear."""
    table = CPU_SPARSE_MAX_ROWS if torch.get_num_threads() >= 2 else CPU_SPARSE_MAX_ROWS_ONE_THREAD
    limit = table.get((fmt, dtype), 0)
    if dtype == torch.float32 and not cpu_f32_gemm():
        limit = min(limit, CPU_F32_MAX_ROWS_WITHOUT_GEMM)
        if torch.get_num_threads() >= 2 and numel <= CPU_SMALL_WEIGHT:
            limit = min(limit, CPU_SPARSE_MAX_ROWS_SMALL_WEIGHT.get((fmt, dtype), limit))
    if fallback == "unpack":
        limit = max(limit, CPU_SPARSE_MAX_ROWS_UNPACK.get((fmt, dtype), 0))
    if dtype == torch.bfloat16 and not cpu_bf16_dot():
        limit = min(limit, CPU_BF16_MAX_ROWS_WITHOUT_DOT)
    elif dtype == torch.bfloat16 and not cpu_bf16_panel():
        limit = min(limit, CPU_BF16_MAX_ROWS_WITHOUT_PANEL)
    wins = FAST and rows <= limit
    if fmt == "bitmap" and sparsity < BITMAP_MIN_SPARSITY:
        wins = False
    if wins:
        return "sparse"
    return "dense" if fallback == "cache" else "unpack"


def test_dispatch_policy_is_the_measured_one():
    # benchmarks/results/sparse_linear_cpu_dispatch_2t.md and sparse_linear_cpu_dispatch.md (quiet machine, 2 and
    # 1 threads): a change here must come with new measurements (benchmarks/bench_sparse_linear.py).
    f32, bf16 = torch.float32, torch.bfloat16
    # 1:2 and 8:16: benchmarks/results/nm_patterns_cpu_{2t,1t}.md
    # float32 at any M (eleventh session: decode + sparsekit's AVX-512 GEMM above 24 rows):
    # benchmarks/results/prefill_cpu_{1t,2t}.md, M = 64..4096. Without that GEMM (SPARSEKIT_CPU_PANEL=0) the
    # eighth session's limits: 2048 rows, and with 2 threads 256 for layers of at most 2^20 weights
    # (prefill_cpu_2t_smollm_rerun.md)
    formats = ("1:2", "2:4", "4:8", "8:16", "bitmap")
    assert CPU_F32_ANY_ROWS >= 2**62
    table = {(fmt, dt): CPU_F32_ANY_ROWS if dt == f32 else 64 for fmt in formats for dt in (f32, bf16)}
    assert CPU_SPARSE_MAX_ROWS == table
    assert CPU_F32_MAX_ROWS_WITHOUT_GEMM == 2048
    assert CPU_SMALL_WEIGHT == 2**20
    assert CPU_SPARSE_MAX_ROWS_SMALL_WEIGHT == {(fmt, f32): 256 for fmt in formats}
    assert CPU_SPARSE_MAX_ROWS_ONE_THREAD == table
    # with dense_fallback="unpack": no larger limit at present
    assert CPU_SPARSE_MAX_ROWS_UNPACK == {}
    assert CPU_BF16_MAX_ROWS_WITHOUT_DOT == 4
    assert CPU_BF16_MAX_ROWS_WITHOUT_PANEL == 16  # the streamed kernels' bfloat16 limit before the panel path
    assert BITMAP_MIN_SPARSITY == 0.5


# ----------------------------------------------------------------------------------------------------
# Outputs on every path
# ----------------------------------------------------------------------------------------------------
SHAPES = [(64, 24), (12, 7), (136, 33)]  # (in, out): odd out, in not a multiple of 64
LEADING = [(1,), (2,), (3,), (8,), (9,), (70,), (2, 3), (3, 1, 4), (3, 700)]  # 2100 rows: float32's decode + GEMM


CASES = [(in_f, out_f, fmt) for in_f, out_f in SHAPES for fmt in ("2:4", "4:8", "bitmap")
         if not (fmt == "4:8" and in_f % 8)]


@pytest.mark.parametrize("fallback", ["unpack", "cache"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("in_f,out_f,fmt", CASES, ids=lambda v: str(v))
def test_forward_matches_dense_on_every_path(in_f, out_f, fmt, bias, dtype, fallback):
    lin = pruned_linear(in_f, out_f, fmt, bias, dtype)
    layer = SparseLinear.from_linear(lin, fmt, dense_fallback=fallback)
    calls, unpack_calls = count_calls(layer), count_calls(layer, "_unpack_op")
    w, b = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
    for lead in LEADING:
        x = torch.randn(*lead, in_f).to(dtype)
        rows = x.numel() // in_f
        want = expected_path(fmt, dtype, rows, fallback, in_f * out_f)
        assert layer.path(rows, x.device, dtype) == want
        before, unpack_before = len(calls), len(unpack_calls)
        with torch.no_grad():
            y = layer(x)
        assert y.shape == (*lead, out_f) and y.dtype == dtype
        assert len(calls) - before == (1 if want == "sparse" else 0), want
        assert len(unpack_calls) - unpack_before == (1 if want == "unpack" else 0), want
        if want == "dense":
            assert torch.equal(y, F.linear(x, w, b))
        else:
            assert_linear_close(y.reshape(-1, out_f), x.reshape(-1, in_f), w, b)


def test_paths_cover_sparse_dense_and_unpack():
    """The policy is not vacuous: with the fast kernels, one layer takes all three paths across M."""
    if not FAST:
        pytest.skip(cpu_sparse_kernels_fast()[1])
    threads = torch.get_num_threads()
    bf16_limit = (64 if cpu_bf16_panel() else CPU_BF16_MAX_ROWS_WITHOUT_PANEL) if cpu_bf16_dot() \
        else CPU_BF16_MAX_ROWS_WITHOUT_DOT
    try:
        torch.set_num_threads(2)  # the limits below are the two-thread table's
        cached = SparseLinear.from_linear(pruned_linear(64, 16, "2:4"), dense_fallback="cache")
        packed = SparseLinear.from_linear(pruned_linear(64, 16, "2:4"))
        bitmap_cached = SparseLinear.from_linear(pruned_linear(64, 16, "bitmap"), "bitmap", dense_fallback="cache")
        bitmap_packed = SparseLinear.from_linear(pruned_linear(64, 16, "bitmap"), "bitmap")
    finally:
        torch.set_num_threads(threads)
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    # float32: the op at every M (decode + sparsekit's GEMM inside it past 24 rows)
    assert [cached.path(m, cpu, torch.float32) for m in (1, 257, 10**6)] == ["sparse"] * 3
    assert [cached.path(m, cpu, bf16) for m in (1, bf16_limit, bf16_limit + 1)] == ["sparse", "sparse", "dense"]
    assert [packed.path(m, cpu, bf16) for m in (1, bf16_limit, bf16_limit + 1)] == ["sparse", "sparse", "unpack"]
    assert cached.path(1, cpu, torch.float16) == "dense"  # no fast float16 kernel
    if cpu_bf16_panel():  # bitmap bf16: the op (streamed kernel, then panel) up to M = 64, then dense or unpack
        assert [bitmap_cached.path(m, cpu, bf16) for m in (16, 64, 65)] == ["sparse", "sparse", "dense"]
        assert [bitmap_packed.path(m, cpu, bf16) for m in (9, 64, 65)] == ["sparse", "sparse", "unpack"]


def test_float32_limits_with_and_without_sparsekits_gemm(monkeypatch):
    """float32 takes the packed op at any M while the ops multiply decoded blocks with sparsekit's AVX-512 GEMM.
    Without it (SPARSEKIT_CPU_PANEL=0: decode + MKL) the eighth session's limits hold: layers of at most
    CPU_SMALL_WEIGHT weights stop at M = 256 with 2 threads (the SmolLM2 shapes lost to dense above it there),
    larger layers at 2048, and one thread has no small-weight cap."""
    if not FAST:
        pytest.skip(cpu_sparse_kernels_fast()[1])
    threads = torch.get_num_threads()
    cpu, f32 = torch.device("cpu"), torch.float32
    in_f = 1024
    big_out = CPU_SMALL_WEIGHT // in_f + 8  # just over the cap's size
    try:
        for fmt in ("2:4", "bitmap"):
            torch.set_num_threads(2)
            small = SparseLinear.from_linear(pruned_linear(in_f, CPU_SMALL_WEIGHT // in_f, fmt), fmt)
            big = SparseLinear.from_linear(pruned_linear(in_f, big_out, fmt), fmt)
            assert cpu_f32_gemm()
            for layer in (small, big):
                assert [layer.path(m, cpu, f32) for m in (257, 2049, 10**9)] == ["sparse"] * 3
            monkeypatch.setenv("SPARSEKIT_CPU_PANEL", "0")
            assert [small.refresh_dispatch().path(m, cpu, f32) for m in (256, 257)] == ["sparse", "unpack"]
            assert [big.refresh_dispatch().path(m, cpu, f32) for m in (2048, 2049)] == ["sparse", "unpack"]
            assert small.path(64, cpu, torch.bfloat16) == big.path(64, cpu, torch.bfloat16)  # bfloat16: no cap
            torch.set_num_threads(1)
            assert [small.refresh_dispatch().path(m, cpu, f32) for m in (2048, 2049)] == ["sparse", "unpack"]
            monkeypatch.delenv("SPARSEKIT_CPU_PANEL")
            assert small.refresh_dispatch().path(10**9, cpu, f32) == "sparse"
    finally:
        torch.set_num_threads(threads)


def test_bf16_limit_falls_back_without_the_panel(monkeypatch):
    """SPARSEKIT_CPU_PANEL=0 leaves the ops their streamed kernels, which lose to dense past M = 16: the bfloat16
    limit of layers built then is capped there."""
    if not (FAST and cpu_bf16_dot()):
        pytest.skip("needs the AVX512-BF16 kernels")
    monkeypatch.setenv("SPARSEKIT_CPU_PANEL", "0")
    layer = SparseLinear.from_linear(pruned_linear(64, 16, "2:4", dtype=torch.bfloat16), dense_fallback="cache")
    cpu = torch.device("cpu")
    assert [layer.path(m, cpu, torch.bfloat16) for m in (16, 17)] == ["sparse", "dense"]
    monkeypatch.delenv("SPARSEKIT_CPU_PANEL")
    assert layer.refresh_dispatch().path(64, cpu, torch.bfloat16) == "sparse"


def test_cslt_option_decides_the_cslt_path(monkeypatch):
    """cslt=False (constructor, from_linear, sparsify_) or set_cslt(False) rules out the cuSPARSELt path and drops
    its copy; checked without a GPU: _cslt_possible and path() only read shapes, flags and device types."""
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", getattr(torch, "_cslt_sparse_mm", None), raising=False)
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    on = SparseLinear(64, 32, "2:4", dtype=bf16)
    off = SparseLinear(64, 32, "2:4", dtype=bf16, cslt=False)
    assert on.use_cslt and not off.use_cslt
    assert on._cslt_possible(cuda, bf16) and not off._cslt_possible(cuda, bf16)
    assert not on._cslt_possible(torch.device("cpu"), bf16)  # CUDA only
    assert not on._cslt_possible(cuda, torch.float32)  # float16 / bfloat16 only
    on.cslt_weight = torch.zeros(1)  # stands in for torch._cslt_compress's output
    assert on.path(1, cuda, bf16) == "cslt"
    assert on.set_cslt(False) is on and not on.use_cslt and on.cslt_weight is None
    assert on.path(1, cuda, bf16) == "unpack"
    assert not SparseLinear.from_linear(pruned_linear(64, 16, "2:4"), "2:4", cslt=False).use_cslt
    model = nn.Sequential(pruned_linear(64, 16, "2:4"))
    sparsekit.sparsify_(model, format="2:4", cslt=False)
    assert not model[0].use_cslt


def test_float16_and_other_nm_patterns_never_take_the_sparse_kernel():
    for fmt, dtype in (("2:4", torch.float16), ("4:8", torch.float16), ("1:4", torch.float32), ("6:8", torch.bfloat16),
                       ("3:6", torch.float32)):
        layer = SparseLinear.from_linear(pruned_linear(96, 8, fmt, dtype=dtype), fmt)
        assert layer.path(1, torch.device("cpu"), dtype) == "unpack"
        x = torch.randn(3, 96).to(dtype)
        assert_linear_close(layer(x), x, layer.to_dense(), layer.bias.detach())


@pytest.mark.parametrize("fmt", ["1:2", "4:8", "8:16"])
def test_half_density_patterns_take_the_sparse_kernel_like_2_4(fmt):
    if not FAST:
        pytest.skip(cpu_sparse_kernels_fast()[1])
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16):
        layer = SparseLinear.from_linear(pruned_linear(64, 8, fmt, dtype=dtype), fmt)
        two_four = SparseLinear.from_linear(pruned_linear(64, 8, "2:4", dtype=dtype), "2:4")
        assert [layer.path(m, cpu, dtype) for m in (1, 64, 65)] == [two_four.path(m, cpu, dtype) for m in (1, 64, 65)]
        assert layer.path(1, cpu, dtype) == "sparse"
        for rows in (1, 3, 20, 70, 2100):  # streamed kernels, bfloat16 panel, decode + GEMM (bf16 70, float32 70, 2100)
            x = torch.randn(rows, 64).to(dtype)
            assert_linear_close(layer(x), x, layer.to_dense(), layer.bias.detach())


def test_bitmap_below_half_sparse_uses_the_fallback():
    lin = pruned_linear(128, 16, "bitmap", sparsity=0.3)
    layer = SparseLinear.from_linear(lin, "bitmap", dense_fallback="cache")
    assert abs(layer.sparsity - 0.3) < 0.01
    assert layer.path(1, torch.device("cpu"), torch.float32) == "dense"
    x = torch.randn(1, 128)
    assert torch.equal(layer(x), lin(x))


def test_one_thread_limits():
    if not FAST:
        pytest.skip(cpu_sparse_kernels_fast()[1])
    threads = torch.get_num_threads()
    cpu, f32, bf16 = torch.device("cpu"), torch.float32, torch.bfloat16
    try:
        torch.set_num_threads(1)
        bitmap = SparseLinear.from_linear(pruned_linear(128, 16, "bitmap"), "bitmap", dense_fallback="cache")
        two_four = SparseLinear.from_linear(pruned_linear(128, 16, "2:4"), "2:4", dense_fallback="cache")
        dot = cpu_bf16_dot()
        assert [bitmap.path(m, cpu, f32) for m in (2048, 2049, 10**9)] == ["sparse"] * 3
        assert [two_four.path(m, cpu, f32) for m in (2048, 2049, 10**9)] == ["sparse"] * 3
        limit = (64 if cpu_bf16_panel() else CPU_BF16_MAX_ROWS_WITHOUT_PANEL) if dot else CPU_BF16_MAX_ROWS_WITHOUT_DOT
        assert [bitmap.path(m, cpu, bf16) for m in (limit, limit + 1)] == ["sparse", "dense"]
        assert [two_four.path(m, cpu, bf16) for m in (limit, limit + 1)] == ["sparse", "dense"]
        # the limits are decided when a layer is built: a table change shows only after refresh_dispatch
        saved = dict(CPU_SPARSE_MAX_ROWS)
        CPU_SPARSE_MAX_ROWS[("2:4", f32)] = 2
        try:
            torch.set_num_threads(2)
            assert two_four.path(3, cpu, f32) == "sparse"  # still the 1-thread decision
            assert two_four.refresh_dispatch().path(3, cpu, f32) == "dense"
        finally:
            CPU_SPARSE_MAX_ROWS.clear()
            CPU_SPARSE_MAX_ROWS.update(saved)
    finally:
        torch.set_num_threads(threads)


def test_non_contiguous_input():
    lin = pruned_linear(64, 24, "2:4")
    layer = SparseLinear.from_linear(lin)
    x = torch.randn(4, 64, 6).transpose(1, 2)[:, ::2]  # (4, 3, 64), strided
    assert not x.is_contiguous()
    with torch.no_grad():
        assert_linear_close(layer(x).reshape(-1, 24), x.reshape(-1, 64), lin.weight, lin.bias)


def test_gradient_reaches_x():
    lin = pruned_linear(64, 24, "bitmap")
    layer = SparseLinear.from_linear(lin)
    x = torch.randn(2, 64, requires_grad=True)
    assert layer.path(2, x.device, x.dtype, requires_grad=True) == "grad"
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.detach().sum(0).expand(2, -1))
    assert all(not p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize("fallback", ["cache", "unpack"])
def test_compile_fullgraph_matches_eager(fallback):
    layer = SparseLinear.from_linear(pruned_linear(64, 24, "2:4"), dense_fallback=fallback)
    compiled = torch.compile(layer, fullgraph=True)
    for rows in (1, 16):  # the sparse kernel, then the fallback (dense cache, or decode + BLAS)
        x = torch.randn(rows, 64)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# Construction, formats, storage
# ----------------------------------------------------------------------------------------------------
def test_auto_format_choice():
    two_four = pruned_linear(64, 16, "2:4")
    assert auto_format(two_four.weight) == "2:4"
    assert SparseLinear.from_linear(two_four).format == "2:4"
    unstructured = pruned_linear(64, 16, "bitmap")
    assert auto_format(unstructured.weight) == "bitmap"
    sparser = pruned_linear(64, 16, "2:4")
    with torch.no_grad():
        sparser.weight[:, 1::4] = 0  # still fits 2:4, but 75% zeros: the bitmap is smaller
    assert auto_format(sparser.weight) == "bitmap"
    assert auto_format(nn.Linear(64, 16).weight) is None


def test_packed_storage_and_state_dict():
    lin = pruned_linear(128, 32, "2:4")
    layer = SparseLinear.from_linear(lin, "2:4", dense_fallback="cache")
    assert set(layer.state_dict()) == {"values", "index_codes", "bias"}  # the dense cache is never saved
    assert layer.values.shape == (32, 64) and layer.index_codes.shape == (32, 16)
    assert layer.packed_bytes() == 32 * 64 * 4 + 32 * 16  # 2.125 bytes per dense fp32 weight
    assert torch.equal(layer.to_dense(), lin.weight)
    bm = SparseLinear.from_linear(pruned_linear(130, 5, "bitmap"), "bitmap")
    assert set(bm.state_dict()) == {"bitmask", "values", "row_offsets", "bias"}
    assert bm.bitmask.shape == (5, 3) and bm.row_offsets.shape == (6,) and bm.values.numel() == bm.nnz


@pytest.mark.parametrize("fmt", ["2:4", "bitmap"])
def test_load_state_dict_into_spec_built_layer(fmt):
    layer = SparseLinear.from_linear(pruned_linear(64, 24, fmt), fmt, dense_fallback="cache")
    empty = SparseLinear.from_compressed_spec(layer.compressed_spec(), dtype=torch.float32, device="cpu")
    assert empty.dense_weight is not None and not torch.equal(empty.dense_weight, layer.dense_weight)
    empty.load_state_dict(layer.state_dict())
    assert torch.equal(empty.dense_weight, layer.dense_weight)  # rebuilt by the load hook
    x = torch.randn(5, 3, 64)
    assert torch.equal(empty(x), layer(x))


def test_to_dtype_and_fallback_switch():
    lin = pruned_linear(64, 24, "2:4")
    layer = SparseLinear.from_linear(lin, dense_fallback="cache").to(torch.bfloat16)
    assert layer.values.dtype == layer.dense_weight.dtype == layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dense_weight, layer.to_dense())
    x = torch.randn(4, 64).to(torch.bfloat16)
    assert_linear_close(layer(x), x, lin.weight.to(torch.bfloat16), lin.bias.to(torch.bfloat16))
    layer.set_dense_fallback("unpack")
    assert layer.dense_weight is None and layer.path(65, x.device, x.dtype) == "unpack"


def test_from_conv1d():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(24, 64)  # weight (in, out)
    with torch.no_grad():
        conv.weight.mul_(ops.nm_mask(conv.weight.t().abs(), 2, 4).t())
        conv.bias.normal_()
    layer = SparseLinear.from_linear(conv, "2:4")
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert_linear_close(layer(x).reshape(-1, 24), x.reshape(-1, 64), conv.weight.t(), conv.bias)


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------
def test_input_errors_name_the_problem():
    layer = SparseLinear.from_linear(pruned_linear(64, 24, "2:4"))
    with pytest.raises(ValueError, match=r"in_features=64 in its last dim, got shape \(2, 63\)"):
        layer(torch.randn(2, 63))
    with pytest.raises(ValueError, match="holds torch.float32 weights but x is torch.bfloat16"):
        layer(torch.randn(2, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="weight is on cpu but x is on meta"):
        layer(torch.empty(2, 64, device="meta"))


def test_construction_errors_name_the_problem():
    unstructured = pruned_linear(64, 8, "bitmap")
    with pytest.raises(ValueError, match=r"not 2:4 sparse: row \d+, columns \d+\.\.\d+ hold 3 non-zeros"):
        with torch.no_grad():
            unstructured.weight[:, :4] = 1.0  # 4 non-zeros in the first group of every row
            unstructured.weight[:, 0] = 0.0
        SparseLinear.from_linear(unstructured, "2:4")
    with pytest.raises(ValueError, match="no packed format is smaller than dense"):
        SparseLinear.from_linear(nn.Linear(64, 8), "auto")
    with pytest.raises(ValueError, match="format must be 'auto', 'bitmap' or 'N:M'"):
        SparseLinear.from_linear(pruned_linear(64, 8, "2:4"), "24")
    with pytest.raises(ValueError, match="0 <= N < M <= 16"):
        parse_format("4:4")
    with pytest.raises(ValueError, match="M=8 does not divide in_features=12"):
        SparseLinear(12, 4, "4:8")
    with pytest.raises(ValueError, match="bitmap format needs nnz"):
        SparseLinear(12, 4, "bitmap")
    with pytest.raises(ValueError, match="dense_fallback must be one of"):
        SparseLinear.from_linear(pruned_linear(64, 8, "2:4"), dense_fallback="lazy")
    with pytest.raises(TypeError, match="expected nn.Linear"):
        SparseLinear.from_linear(nn.Conv2d(3, 3, 1))


# ----------------------------------------------------------------------------------------------------
# CUDA: torch's cuSPARSELt 2:4 path
# ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_id)
def test_cuda_2_4_matches_dense(dtype):
    lin = pruned_linear(128, 64, "2:4", dtype=dtype).cuda()
    layer = SparseLinear.from_linear(lin, "2:4")
    cslt = hasattr(torch, "_cslt_sparse_mm") and torch.backends.cusparselt.is_available()
    assert layer.path(3, torch.device("cuda"), dtype) == ("cslt" if cslt else "unpack")
    for rows in (1, 3, 17):
        x = torch.randn(rows, 128, device="cuda", dtype=dtype)
        with torch.no_grad():
            assert_linear_close(layer(x).cpu(), x.cpu(), lin.weight.cpu(), lin.bias.cpu())


@pytest.mark.skipif(not FAST, reason="the CPU C++ kernels' AVX-512 path is not live")
def test_switching_fallback_redecides_the_limits(monkeypatch):
    """CPU_SPARSE_MAX_ROWS_UNPACK (empty today) raises a limit for layers without a dense copy only; switching
    the fallback re-decides the limits. Checked with an entry put in the table for the test."""
    if not (FAST and cpu_bf16_panel()):
        pytest.skip("needs the AVX512-BF16 kernels and their panel path")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setitem(CPU_SPARSE_MAX_ROWS_UNPACK, ("bitmap", torch.bfloat16),
                        CPU_SPARSE_MAX_ROWS[("bitmap", torch.bfloat16)] + 32)
    try:
        lin = nn.Linear(256, 128, bias=False).bfloat16()
        with torch.no_grad():
            lin.weight.masked_fill_(torch.rand_like(lin.weight, dtype=torch.float32) < 0.6, 0)
        layer = SparseLinear.from_linear(lin, format="bitmap")
        cpu = torch.device("cpu")
        above = CPU_SPARSE_MAX_ROWS[("bitmap", torch.bfloat16)] + 4
        assert layer.path(above, cpu, torch.bfloat16) == "sparse"
        assert layer.set_dense_fallback("cache").path(above, cpu, torch.bfloat16) == "dense"
        assert layer.set_dense_fallback("unpack").path(above, cpu, torch.bfloat16) == "sparse"
        x = torch.randn(above, 256, dtype=torch.bfloat16)
        layer.set_dense_fallback("cache")
        torch.testing.assert_close(layer(x), F.linear(x, lin.weight), rtol=1.6e-2, atol=1e-2)
    finally:
        torch.set_num_threads(threads)


def test_load_state_dict_checks_a_bitmap_against_its_bits():
    """A checkpoint whose bitmap row_offsets disagree with the bits is refused when loaded (the kernels trust
    them), naming the row; so are bits past in_features and offsets that do not end at the number of values."""
    layer = SparseLinear.from_linear(pruned_linear(100, 12, "bitmap"), "bitmap")
    good = {k: v.clone() for k, v in layer.state_dict().items()}
    fresh = lambda: SparseLinear(100, 12, "bitmap", bias=layer.bias is not None, nnz=layer.nnz)  # noqa: E731
    fresh().load_state_dict(good)  # the consistent one loads
    bad = dict(good, row_offsets=good["row_offsets"].clone())
    bad["row_offsets"][4] += 1
    with pytest.raises(ValueError, match="row 3 has .* bits set but row_offsets gives it values"):
        fresh().load_state_dict(bad)
    stray = dict(good, bitmask=good["bitmask"].clone())
    stray["bitmask"][7, -1] |= 1 << 50
    with pytest.raises(ValueError, match="row 7 has bits set past in_features=100"):
        fresh().load_state_dict(stray)
    huge = dict(good, row_offsets=good["row_offsets"].clone())
    huge["row_offsets"][-1] = 1 << 40
    with pytest.raises(ValueError, match="row_offsets must run from 0 to the number of values"):
        fresh().load_state_dict(huge)


@pytest.mark.parametrize("fmt", ["2:4", "4:8", "1:2", "3:6"])
def test_load_state_dict_checks_nm_positions(fmt):
    """A checkpoint whose N:M codes repeat a position in a group is refused when loaded (the kernels do not check
    it per call, and their paths would disagree on it), naming the row and group; a fresh layer already holds
    valid codes (positions 0 .. K - 1), so it computes zeros (plus bias) on every path."""
    n, m = (int(v) for v in fmt.split(":"))
    layer = SparseLinear.from_linear(pruned_linear(48, 6, fmt), fmt)
    good = {k: v.clone() for k, v in layer.state_dict().items()}
    fresh = lambda: SparseLinear(48, 6, fmt, bias=layer.bias is not None)  # noqa: E731
    empty = fresh()
    sparsekit.formats.check_nm_packed(empty.values, empty.index_codes, n, m, 48)
    x = torch.randn(3, 48)
    for rows in (x[:1], x):
        assert torch.equal(empty(rows), torch.zeros(rows.shape[0], 6))
    fresh().load_state_dict(good)
    if m - n >= 2:
        bad = dict(good, index_codes=good["index_codes"].clone())
        bad["index_codes"][2] = 0  # every kept value of row 2 at position 0
        with pytest.raises(ValueError, match=r"loaded: row 2, group 0 \(columns 0\.\.{}\) repeats".format(m - 1)):
            fresh().load_state_dict(bad)


def test_unsupported_dtype_conversion_and_cslt_setting_round_trip():
    layer = SparseLinear.from_linear(pruned_linear(64, 8, "2:4"), "2:4", cslt=False)
    x = torch.randn(3, 64)
    before = layer(x)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16 values; a conversion would make them "
                                         "torch.float64"):
        layer.double()
    # refused before anything was converted: the layer is as it was
    assert layer.values.dtype == layer.bias.dtype == torch.float32
    assert torch.equal(layer(x), before)
    layer = SparseLinear.from_linear(pruned_linear(64, 8, "2:4"), "2:4", cslt=False)
    with pytest.raises(ValueError, match=r"x is torch.float64; convert \(x.to\(torch.float32\)\)"):
        layer(torch.randn(2, 64, dtype=torch.float64))
    again = SparseLinear.from_compressed_spec(layer.compressed_spec(), torch.float32, "cpu")
    assert again.use_cslt is False


def test_nm_index_codes_rejects_positions_outside_the_group():
    from sparsekit.formats import nm_index_codes

    with pytest.raises(ValueError, match=r"index 4 at \(0, 1\) is not a position in a group of m=4"):
        nm_index_codes(torch.tensor([[1, 4, 0, 3]], dtype=torch.uint8), 4)
    assert nm_index_codes(torch.tensor([[1, 3, 0, 2]], dtype=torch.uint8), 4).shape == (1, 1)


def test_refresh_derived_after_editing_values_in_place():
    layer = SparseLinear.from_linear(pruned_linear(64, 8, "2:4"), "2:4", dense_fallback="cache")
    with torch.no_grad():
        layer.values.mul_(2)
    assert not torch.equal(layer.dense_weight, layer.to_dense())  # the documented staleness
    layer.refresh_derived()
    assert torch.equal(layer.dense_weight, layer.to_dense())


@pytest.mark.parametrize("fmt", ["2:4", "bitmap"])
def test_refused_checkpoint_leaves_the_layer_as_it_was(fmt):
    """The packed buffers are checked before load_state_dict copies them: a refused checkpoint changes nothing."""
    layer = SparseLinear.from_linear(pruned_linear(64, 8, fmt), fmt)
    x = torch.randn(2, 64)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(x)
    bad = {k: v.clone() for k, v in before.items()}
    if fmt == "2:4":
        bad["index_codes"][0, 0] = 0  # group 0 of row 0 repeats position 0
        message = "repeats"
    else:
        bad["row_offsets"][3] += 1
        message = "row 2 has .* bits set but row_offsets gives it values"
    bad["bias"] += 1
    with pytest.raises(ValueError, match=message):
        layer.load_state_dict(bad)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    assert torch.equal(layer(x), y)


def test_bitmap_checkpoint_with_another_nnz_says_so():
    src = SparseLinear.from_linear(pruned_linear(64, 8, "bitmap"), "bitmap")
    other = SparseLinear(64, 8, "bitmap", nnz=src.nnz - 3)
    with pytest.raises(ValueError, match=f"holds {src.nnz} values, this layer was built for nnz={src.nnz - 3}"):
        other.load_state_dict(src.state_dict())


@pytest.mark.parametrize("fmt", ["2:4", "bitmap"])
def test_load_in_parts(fmt):
    """strict=False loads that each bring part of the packed weight (shard by shard): no error midway, the layer
    refuses to run until the last part is in, then it is checked and runs like the source."""
    src = SparseLinear.from_linear(pruned_linear(64, 8, fmt), fmt)
    sd = src.state_dict()
    dst = SparseLinear(64, 8, fmt, nnz=src.nnz if fmt == "bitmap" else None)
    names = ["values", "index_codes"] if fmt == "2:4" else ["values", "bitmask", "row_offsets"]
    x = torch.randn(2, 64)
    dst.load_state_dict({"bias": sd["bias"], names[0]: sd[names[0]]}, strict=False)
    with pytest.raises(RuntimeError, match=f"loaded in part: {', '.join(sorted(names[1:]))} not loaded yet"):
        dst(x)
    dst.load_state_dict({name: sd[name] for name in names[1:]}, strict=False)
    assert torch.equal(dst(x), src(x))
    # parts that do not fit together are refused once the last one is in
    bad = SparseLinear(64, 8, fmt, nnz=src.nnz if fmt == "bitmap" else None)
    bad.load_state_dict({names[0]: sd[names[0]]}, strict=False)
    wrong = {name: sd[name].clone() for name in names[1:]}
    if fmt == "2:4":
        wrong["index_codes"][1] = 0
    else:
        wrong["row_offsets"][2] += 1
    with pytest.raises(ValueError, match="loaded in parts"):
        bad.load_state_dict(wrong, strict=False)
    with pytest.raises(RuntimeError, match="loaded in part"):
        bad(x)


@pytest.mark.parametrize("fmt", ["2:4", "bitmap"])
def test_bias_with_requires_grad_gets_its_gradient(fmt):
    lin = pruned_linear(64, 8, fmt)
    layer = SparseLinear.from_linear(lin, fmt)
    layer.bias.requires_grad_(True)
    lin.bias.requires_grad_(True)
    x = torch.randn(3, 64)
    assert layer.path(3, x.device, x.dtype, requires_grad=True) == "grad"
    layer(x).sum().backward()
    lin(x).sum().backward()
    torch.testing.assert_close(layer.bias.grad, lin.bias.grad)


@pytest.mark.parametrize("layer_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["2:4", "bitmap"])
def test_autocast_as_nn_linear(fmt, layer_dtype):
    """Under torch.autocast the layer computes in autocast's dtype as nn.Linear does (a float32 layer fed bf16
    activations, or a bf16 layer fed float32 ones)."""
    lin = pruned_linear(64, 8, fmt, dtype=layer_dtype)
    layer = SparseLinear.from_linear(lin, fmt)
    for x_dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 64).to(x_dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = lin(x), layer(x)
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_nm_layer_on_the_meta_device():
    """As transformers and accelerate build models: under `with torch.device("meta")`."""
    with torch.device("meta"):
        layer = SparseLinear(64, 8, "2:4")
    assert layer.values.is_meta and layer.index_codes.is_meta
    assert layer.index_codes.shape == SparseLinear(64, 8, "2:4").index_codes.shape
