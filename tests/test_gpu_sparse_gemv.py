"""Sparse linear kernels on the GPU (csrc/cuda/kernels/sparse_gemv.cuh, sparsekit/kernels/triton/sparse_gemv.py)
against the plain-PyTorch reference, and a host emulation of the CUDA kernels' lane logic.

GPU tests (``gpu`` marker, skipped without CUDA): two implementations on fresh random inputs,
* the dispatched op ``torch.ops.sparsekit.{nm,bitmap}_linear``: CUDA C++ where ``sparsekit._C_cuda`` is built,
  else whatever ``sparsekit._backends`` registered on the CUDA key (the Triton kernels once they are listed in
  its ``TRITON_OPS``, else the reference itself);
* the Triton entry points called directly (``sparsekit.kernels.triton.dispatch``).
Shapes are Llama-3-8B's (4096x4096, 14336x4096, 4096x14336) plus odd ones; 1..64 rows of x take the sparse
kernels and 65 the decode + dense fallback. Tolerance (METHOD.md, STYLE.md): the maximum error against the
float64 product of the same inputs is at most twice that of ``F.linear`` on the unpacked weight in the same
dtype on the same device (+ a float32-rounding floor), and nothing is NaN. The caching allocator is filled
with NaN first, so an output element a kernel never writes shows up as NaN.

Host emulation (needs nvcc, no GPU): a small C++ program compiles sparse_gemv.cuh for the host and runs its
``__host__ __device__`` pieces (N:M chunk loads and decode, mma fragment assembly, the launch plan's split
of the input features, the bitmap tile walk) with mma.m16n8k16 emulated from the fragment layouts of the PTX
ISA, on weights packed by ``sparsekit.formats``. It checks the data path of the kernels, not the kernels
themselves (their loops, shared memory, the asm string): those need the GPU tests above.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from linear_check import assert_linear_close, bad_row_offsets_cases

import sparsekit
from sparsekit.formats import pack_bitmap, pack_nm, nm_index_codes
from sparsekit.ops import reference as R

LLAMA3_8B = {"attn.q": (4096, 4096), "mlp.up": (14336, 4096), "mlp.down": (4096, 14336)}
ROWS = [1, 2, 3, 8, 9, 16, 17, 33, 64, 65]  # 65: more than the kernels take, the fallback
SMALL_SHAPES = [(256, 1024), (33, 448), (17, 4100)]  # (out, in): in % 64 != 0 takes the N:M fallback


def _nm_weight(out_f, in_f, n, m, dtype, device="cpu"):
    w = torch.randn(out_f, in_f, device=device)
    return (w * R.nm_mask_reference(torch.rand(out_f, in_f, device=device), n, m)).to(dtype)


def _bitmap_weight(out_f, in_f, sparsity, dtype, device="cpu"):
    w = torch.randn(out_f, in_f, device=device)
    w[torch.rand(out_f, in_f, device=device) < sparsity] = 0
    return w.to(dtype)


# ----------------------------------------------------------------------------------------------------
# On the GPU
# ----------------------------------------------------------------------------------------------------
def _cuda_kernel_registered(op: str) -> bool:
    """Whether a CUDA-key kernel (CUDA C++ or Triton) serves ``sparsekit::op``, not the plain-PyTorch default."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekit::{op}", "CUDA")


def _impls():
    """(nm_linear, bitmap_linear) for each implementation on CUDA; no CUDA query at import."""
    status = sparsekit.backend_status()
    if status["cuda"].live:
        dispatched = "CUDA C++"
    elif _cuda_kernel_registered("nm_linear"):
        dispatched = "Triton (dispatched)"
    else:
        dispatched = "reference (dispatched)"
    impls = [pytest.param((torch.ops.sparsekit.nm_linear, torch.ops.sparsekit.bitmap_linear), id=dispatched)]
    try:
        from sparsekit.kernels.triton import dispatch
    except ImportError:
        return impls
    impls.append(pytest.param((dispatch.nm_linear, dispatch.bitmap_linear), id="Triton"))
    return impls


IMPLS = _impls()


def _poison_allocator(nbytes=1 << 28):
    """Leave NaN in the caching allocator's free blocks: an output element nobody writes stays NaN.

    Both pools: blocks of 1 MiB and more come from the large pool (the one big tensor); smaller ones are carved
    from 2 MiB segments of the small pool, so small outputs would miss a large poisoned block. The small tensors
    below fill whole small-pool segments with NaN, of every size class an output here can take."""
    torch.full((nbytes // 4,), float("nan"), device="cuda")
    small = [torch.full((size // 4,), float("nan"), device="cuda")  # (bytes, count): about 17 MiB in all
             for size, count in ((512, 256), (4 << 10, 256), (64 << 10, 128), (512 << 10, 16)) for _ in range(count)]
    del small
    torch.cuda.synchronize()


def _assert_close(got, x, weight, bias):
    """Max error vs the float64 product <= 2x that of F.linear in x's dtype (+ a float32 floor); no NaN.
    float32 is held to linear_check's dtype bound instead: a kernel that sums each output in one sequential
    float32 chain (Triton's) can lose to cuBLAS's split sums by more than 2x while far inside float32 accuracy."""
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert got.dtype == x.dtype and got.shape == exact.shape
    assert not got.isnan().any(), "NaN in the output (an element left unwritten?)"
    if x.dtype == torch.float32:
        assert_linear_close(got.cpu(), x.cpu(), weight.cpu(), None if bias is None else bias.cpu())
        return
    ref = F.linear(x, weight, bias)
    err = (got.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    floor = 2.0**-20 * exact.abs().max().item()
    assert err <= 2 * ref_err + floor, f"max error {err:.3g} vs the reference's {ref_err:.3g}"


# (n, m, dtype): 2:4 in every dtype (float32: the CUDA fallback), the other built patterns in bf16, and two
# the tensor-core kernel is not built for (1:4 keeps 3 of 4; 1:3 has M = 3). Few cases: each Triton
# specialisation compiles on first use, and a GPU session has minutes.
NM_CASES = [(2, 4, torch.bfloat16), (2, 4, torch.float16), (2, 4, torch.float32), (4, 8, torch.bfloat16),
            (8, 16, torch.float16), (1, 4, torch.bfloat16), (1, 3, torch.float16)]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,m,dtype", NM_CASES, ids=str)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_nm_linear(impl, shape, n, m, dtype):
    nm_linear = impl[0]
    out_f, in_f = shape
    if in_f % m:
        in_f -= in_f % m
    w = _nm_weight(out_f, in_f, n, m, dtype, "cuda")
    p = pack_nm(w, n, m)
    codes = nm_index_codes(p.indices, m)
    b = torch.randn(out_f, device="cuda").to(dtype)
    for i, rows in enumerate(ROWS):
        x = torch.randn(rows, in_f, device="cuda").to(dtype)
        bias = b if i % 2 else None
        _poison_allocator()
        _assert_close(nm_linear(x, p.values, codes, n, m, in_f, bias), x, w, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(LLAMA3_8B))
def test_nm_linear_llama_shapes_2_4_bf16(impl, name):
    nm_linear = impl[0]
    out_f, in_f = LLAMA3_8B[name]
    w = _nm_weight(out_f, in_f, 2, 4, torch.bfloat16, "cuda")
    p = pack_nm(w, 2, 4)
    codes = nm_index_codes(p.indices, 4)
    b = torch.randn(out_f, device="cuda").bfloat16()
    for rows in (1, 4, 16, 64):
        x = torch.randn(rows, in_f, device="cuda").bfloat16()
        _poison_allocator()
        _assert_close(nm_linear(x, p.values, codes, 2, 4, in_f, b), x, w, b)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.8])
@pytest.mark.parametrize("shape", [LLAMA3_8B["attn.q"], (33, 200), (5, 4160)], ids=str)
def test_bitmap_linear(impl, shape, sparsity, dtype):
    bitmap_linear = impl[1]
    out_f, in_f = shape
    w = _bitmap_weight(out_f, in_f, sparsity, dtype, "cuda")
    p = pack_bitmap(w)
    b = torch.randn(out_f, device="cuda").to(dtype)
    for i, rows in enumerate(ROWS):
        x = torch.randn(rows, in_f, device="cuda").to(dtype)
        bias = b if i % 2 else None
        _poison_allocator()
        _assert_close(bitmap_linear(x, p.bitmask, p.values, p.row_offsets, in_f, bias), x, w, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
def test_misaligned_strided_and_leading_dims(impl):
    """Views 2 bytes off 16-byte alignment (the N:M kernel falls back, the bitmap one reads element-wise),
    strided x, and leading dimensions."""
    nm_linear, bitmap_linear = impl
    w = _nm_weight(256, 512, 2, 4, torch.bfloat16, "cuda")
    p = pack_nm(w, 2, 4)
    codes = nm_index_codes(p.indices, 4)
    values_off = torch.cat([torch.zeros(1, device="cuda", dtype=torch.bfloat16), p.values.reshape(-1)])[1:]
    values_off = values_off.view(p.values.shape)
    x_base = torch.randn(4 * 512 + 1, device="cuda").bfloat16()
    x_off = x_base[1:].view(4, 512)
    for values, x in ((values_off, torch.randn(3, 512, device="cuda").bfloat16()), (p.values, x_off),
                      (p.values, torch.randn(512, 6, device="cuda").bfloat16().t()[:5])):
        _assert_close(nm_linear(x, values, codes, 2, 4, 512, None), x, w, None)
    x3 = torch.randn(2, 3, 512, device="cuda").bfloat16()
    got = nm_linear(x3, p.values, codes, 2, 4, 512, None)
    assert got.shape == (2, 3, 256)
    _assert_close(got.reshape(6, 256), x3.reshape(6, 512), w, None)

    wb = _bitmap_weight(100, 700, 0.7, torch.float16, "cuda")
    pb = pack_bitmap(wb)
    vb = torch.cat([torch.zeros(1, device="cuda", dtype=torch.float16), pb.values])[1:]
    x = torch.randn(2, 4, 700, device="cuda").half()
    got = bitmap_linear(x, pb.bitmask, vb, pb.row_offsets, 700, None)
    assert got.shape == (2, 4, 100)
    _assert_close(got.reshape(8, 100), x.reshape(8, 700), wb, None)


@pytest.mark.gpu
def test_empty_and_all_zero():
    p = pack_nm(_nm_weight(64, 128, 2, 4, torch.bfloat16, "cuda"), 2, 4)
    codes = nm_index_codes(p.indices, 4)
    assert sparsekit.ops.nm_linear(torch.randn(0, 128, device="cuda").bfloat16(), p.values, codes, 2, 4, 128).shape \
        == (0, 64)
    pb = pack_bitmap(torch.zeros(40, 300, device="cuda", dtype=torch.bfloat16))
    b = torch.randn(40, device="cuda").bfloat16()
    x = torch.randn(3, 300, device="cuda").bfloat16()
    assert torch.equal(sparsekit.ops.bitmap_linear(x, pb.bitmask, pb.values, pb.row_offsets, 300, b), b.expand(3, 40))
    # in_features == 0: y = bias (a (-1, 0) reshape used to raise here)
    x0 = torch.randn(2, 3, 0, device="cuda").bfloat16()
    b5 = torch.randn(5, device="cuda").bfloat16()
    z = torch.zeros(5, 0, device="cuda").bfloat16()
    assert torch.equal(sparsekit.ops.nm_linear(x0, z, torch.zeros(5, 0, device="cuda", dtype=torch.uint8), 2, 4, 0, b5),
                       b5.expand(2, 3, 5))
    mask0, off0 = torch.zeros(5, 0, device="cuda", dtype=torch.int64), torch.zeros(6, device="cuda", dtype=torch.int64)
    assert torch.equal(sparsekit.ops.bitmap_linear(x0, mask0, z.reshape(0), off0, 0, None),
                       torch.zeros(2, 3, 5, device="cuda").bfloat16())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_bitmap_bad_row_offsets_give_nan_rows(dtype):
    """On the device, as under the interpreter: a row whose row_offsets do not match its bits gives NaN outputs,
    reads nothing outside its span (a read past values would be an illegal address), the other rows exact."""
    pytest.importorskip("triton")
    from sparsekit.kernels.triton import dispatch

    w = _bitmap_weight(12, 300, 0.6, dtype, "cuda")
    p = pack_bitmap(w)
    x = torch.randn(3, 300, device="cuda").to(dtype)
    good = dispatch.bitmap_linear(x, p.bitmask, p.values, p.row_offsets, 300)
    for label, values, offsets, nan_rows in bad_row_offsets_cases(p.values, p.row_offsets):
        got = dispatch.bitmap_linear(x, p.bitmask, values, offsets, 300)
        assert set(torch.nonzero(torch.isnan(got).all(dim=0)).flatten().tolist()) == nan_rows, label
        keep = [r for r in range(12) if r not in nan_rows]
        assert torch.equal(got[:, keep], good[:, keep]), label
    torch.cuda.synchronize()


_BAD_OFFSETS_SCRIPT = r"""
import sys, torch, sparsekit
from sparsekit.formats import pack_bitmap
w = torch.randn(12, 300, device="cuda").bfloat16() * (torch.rand(12, 300, device="cuda") > 0.6)
p = pack_bitmap(w)
bad = p.row_offsets.clone()
bad[3] += 1
x = torch.randn(int(sys.argv[2]), 300, device="cuda").bfloat16()
if sys.argv[1] == "linear":
    sparsekit.ops.bitmap_linear(x, p.bitmask, p.values, bad, 300)
else:
    sparsekit.ops.bitmap_unpack(p.bitmask, p.values, bad, 300)
torch.cuda.synchronize()
print("no error")
"""


@pytest.mark.gpu
@pytest.mark.parametrize("op,rows", [("linear", 3), ("linear", 65), ("unpack", 1)])
def test_cuda_bitmap_bad_row_offsets_device_assert(op, rows):
    """The CUDA C++ bitmap kernels stop with a device-side assert on row_offsets that do not match the bits (in a
    subprocess: the assert leaves its CUDA context unusable). 65 rows: the decode + cuBLAS path."""
    if not sparsekit.backend_status()["cuda"].live:
        pytest.skip("sparsekit._C_cuda is not built")
    done = subprocess.run([sys.executable, "-c", _BAD_OFFSETS_SCRIPT, op, str(rows)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "no error" not in done.stdout, done.stdout + done.stderr[-2000:]
    assert "device-side assert" in done.stderr or "row_offsets" in done.stderr, done.stderr[-2000:]


@pytest.mark.gpu
def test_opcheck_cuda():
    p = pack_nm(_nm_weight(48, 256, 2, 4, torch.bfloat16, "cuda"), 2, 4)
    codes = nm_index_codes(p.indices, 4)
    x = torch.randn(3, 256, device="cuda").bfloat16()
    torch.library.opcheck(torch.ops.sparsekit.nm_linear.default, (x, p.values, codes, 2, 4, 256, None))
    torch.library.opcheck(torch.ops.sparsekit.nm_linear.default,
                          (x[:1], p.values, codes, 2, 4, 256, torch.randn(48, device="cuda").bfloat16()))
    pb = pack_bitmap(_bitmap_weight(48, 200, 0.7, torch.float16, "cuda"))
    torch.library.opcheck(torch.ops.sparsekit.bitmap_linear.default,
                          (torch.randn(2, 1, 200, device="cuda").half(), pb.bitmask, pb.values, pb.row_offsets, 200,
                           None))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)], ids=str)
def test_nm_unpack_and_unpack_linear(n, m, dtype):
    """nm_unpack equals the weight exactly; nm_unpack_linear is F.linear on it (the same cuBLAS call)."""
    w = _nm_weight(200, 1024, n, m, dtype, "cuda")
    p = pack_nm(w, n, m)
    codes = nm_index_codes(p.indices, m)
    assert torch.equal(sparsekit.ops.nm_unpack(p.values, codes, n, m, 1024), w)
    x, b = torch.randn(33, 1024, device="cuda").to(dtype), torch.randn(200, device="cuda").to(dtype)
    assert torch.equal(sparsekit.ops.nm_unpack_linear(x, p.values, codes, n, m, 1024, b), F.linear(x, w, b))
    torch.library.opcheck(torch.ops.sparsekit.nm_unpack.default, (p.values, codes, n, m, 1024))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("in_f", [1024, 300])
def test_bitmap_unpack_and_unpack_linear(in_f, dtype):
    w = _bitmap_weight(200, in_f, 0.7, dtype, "cuda")
    w[7] = 0
    pb = pack_bitmap(w)
    assert torch.equal(sparsekit.ops.bitmap_unpack(pb.bitmask, pb.values, pb.row_offsets, in_f), w)
    x = torch.randn(5, in_f, device="cuda").to(dtype)
    got = sparsekit.ops.bitmap_unpack_linear(x, pb.bitmask, pb.values, pb.row_offsets, in_f, None)
    assert torch.equal(got, F.linear(x, w))
    torch.library.opcheck(torch.ops.sparsekit.bitmap_unpack.default, (pb.bitmask, pb.values, pb.row_offsets, in_f))


@pytest.mark.gpu
def test_cuda_graph_capture():
    """No host syncs: a decode step (16 rows: the N:M kernel splits in_features, with workspace and rounding
    pass) is captured and replayed, with x updated in place between replays."""
    if not (_cuda_kernel_registered("nm_linear") and _cuda_kernel_registered("bitmap_linear")):
        pytest.skip("no CUDA kernel registered for nm_linear/bitmap_linear: the reference syncs with the host")
    w = _nm_weight(4096, 4096, 2, 4, torch.bfloat16, "cuda")
    p = pack_nm(w, 2, 4)
    codes = nm_index_codes(p.indices, 4)
    wb = _bitmap_weight(4096, 4096, 0.7, torch.bfloat16, "cuda")
    pb = pack_bitmap(wb)
    x = torch.randn(16, 4096, device="cuda").bfloat16()

    def step():
        h = sparsekit.ops.nm_linear(x, p.values, codes, 2, 4, 4096)
        return sparsekit.ops.bitmap_linear(h, pb.bitmask, pb.values, pb.row_offsets, 4096)

    step()  # warm up (Triton compiles here, not under capture)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        expect = F.linear(F.linear(x, w), wb)
        torch.testing.assert_close(out, expect, rtol=2e-2, atol=2e-2 * expect.abs().max().item())


# ----------------------------------------------------------------------------------------------------
# Host emulation of the CUDA kernels' lane logic (no GPU)
# ----------------------------------------------------------------------------------------------------
_NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "csrc")

# Reads cases written by the test (header of 12 int64, then 16-byte-padded arrays), computes y the way the
# kernels' lanes do with mma emulated, writes y as float32. Usage: emu CASE OUT [CASE OUT ...].
_EMULATION_SOURCE = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "cuda/kernels/sparse_gemv.cuh"
using namespace sparsekit::cuda::gemv;

static std::vector<char> read_all(const char* path) {
  FILE* f = fopen(path, "rb");
  if (!f) { perror(path); exit(2); }
  fseek(f, 0, SEEK_END); long n = ftell(f); fseek(f, 0, SEEK_SET);
  std::vector<char> b(n + 16);
  if (fread(b.data(), 1, n, f) != size_t(n)) exit(3);
  fclose(f);
  return b;
}
template <typename T>
double half_bits(uint32_t h) {
  T v;
  const uint16_t s = uint16_t(h);
  memcpy(&v, &s, 2);
  return as_float(v);
}

// D(16x8) += A(16x16) B(16x8), mma.m16n8k16.row.col fragments as the PTX ISA gives them: lane = 4g + t holds
// A (g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..); B (2t..2t+1, g), (2t+8.., g); D (g, 2t..), (g+8, 2t..).
template <typename T>
void emulate_mma(const uint32_t a[32][4], const uint32_t b[32][2], float c[32][4]) {
  double A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = half_bits<T>(a[lane][0] >> 16 * h);
      A[g + 8][2 * t + h] = half_bits<T>(a[lane][1] >> 16 * h);
      A[g][2 * t + 8 + h] = half_bits<T>(a[lane][2] >> 16 * h);
      A[g + 8][2 * t + 8 + h] = half_bits<T>(a[lane][3] >> 16 * h);
      B[2 * t + h][g] = half_bits<T>(b[lane][0] >> 16 * h);
      B[2 * t + 8 + h][g] = half_bits<T>(b[lane][1] >> 16 * h);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      double s = 0;
      for (int k = 0; k < 16; ++k) s += A[g + (i >= 2 ? 8 : 0)][k] * B[k][2 * t + (i & 1)];
      c[lane][i] += float(s);
    }
  }
}

// nm_mma_kernel's grid, warps and lanes, in order; every 64-column step must be visited once per row tile.
template <typename T, int M_, int K_>
void run_nm(const NMArgs& p, int num_sms, float* y) {
  const NMPlan plan = plan_nm_linear(p.rows, p.out_features, p.in_features, num_sms);
  uint32_t table[16];
  for (int i = 0; i < 16; ++i) table[i] = sparse24_selectors(i);
  const int64_t steps = p.in_features / kStepCols;
  const int row_warps = plan.row_warps, k_warps = kWarps / row_warps;
  const uint16_t* values = static_cast<const uint16_t*>(p.values);
  const T* x = static_cast<const T*>(p.x);
  std::fill(y, y + p.rows * p.out_features, 0.0f);
  for (int64_t bx = 0; bx < plan.row_tiles; ++bx) {
    for (int rw = 0; rw < row_warps; ++rw) {
      const int64_t row0 = (bx * row_warps + rw) * 16;
      std::vector<int> visits(steps, 0);
      for (int64_t by = 0; by < plan.splits; ++by) {
        static float acc[kMaxRowBlocks][32][4];
        memset(acc, 0, sizeof(acc));
        for (int kw = 0; kw < k_warps; ++kw) {
          const int64_t end = std::min(steps, (by + 1) * plan.steps_per_split);
          for (int64_t step = by * plan.steps_per_split + kw; step < end; step += k_warps) {
            visits[step]++;
            uint32_t a[4][32][4];
            for (int lane = 0; lane < 32; ++lane) {
              const int g = lane / 4, t = lane % 4;
              const int64_t last = p.out_features - 1;
              const int64_t row_g = std::min(row0 + g, last), row_g8 = std::min(row0 + g + 8, last);
              NMChunk<M_, K_> cg, cg8;
              load_nm_chunk(values, p.codes, p.kept_per_row, p.code_width, row_g, step * 4 + t, cg);
              load_nm_chunk(values, p.codes, p.kept_per_row, p.code_width, row_g8, step * 4 + t, cg8);
              uint32_t dg[8], dg8[8], af[4][4];
              decode_nm_chunk(cg, table, dg);
              decode_nm_chunk(cg8, table, dg8);
              a_fragments(dg, dg8, af);
              for (int s = 0; s < 4; ++s) for (int i = 0; i < 4; ++i) a[s][lane][i] = af[s][i];
            }
            for (int nb = 0; nb < plan.row_blocks; ++nb) {
              uint32_t b[4][32][2];
              for (int lane = 0; lane < 32; ++lane) {
                uint32_t bf[4][2];
                load_b_fragments(x, p.rows, p.in_features, int64_t(nb) * 8 + lane / 4, step, lane % 4, bf);
                for (int s = 0; s < 4; ++s) { b[s][lane][0] = bf[s][0]; b[s][lane][1] = bf[s][1]; }
              }
              for (int s = 0; s < 4; ++s) emulate_mma<T>(a[s], b[s], acc[nb]);
            }
          }
        }
        for (int nb = 0; nb < plan.row_blocks; ++nb)
          for (int lane = 0; lane < 32; ++lane)
            for (int i = 0; i < 4; ++i) {
              const int64_t o = row0 + fragment_feature(lane / 4, i), n = int64_t(nb) * 8 + fragment_x_row(lane % 4, i);
              if (o < p.out_features && n < p.rows) y[n * p.out_features + o] += acc[nb][lane][i];
            }
      }
      for (int64_t s = 0; s < steps; ++s)
        if (visits[s] != 1) {
          printf("row tile %ld: step %ld visited %d times\n", long(row0), long(s), visits[s]);
          exit(5);
        }
    }
  }
  const T* bias = static_cast<const T*>(p.bias);
  if (bias)
    for (int64_t n = 0; n < p.rows; ++n)
      for (int64_t o = 0; o < p.out_features; ++o) y[n * p.out_features + o] += as_float(bias[o]);
}

// bitmap_gemv_kernel's passes over rows of x, x slices, warps (output features) and lanes (tiles).
template <typename T, int MR, bool kVec>
void run_bitmap_pass(const BitmapArgs& p, int64_t n0, float* y) {
  const T* x = static_cast<const T*>(p.x);
  const T* values = static_cast<const T*>(p.values);
  std::vector<T> xs(kBitmapChunkCols * MR);
  for (int64_t o = 0; o < p.out_features; ++o) {
    // the kernel's device-side asserts on row_offsets, as NaN outputs of the row here
    if (!bitmap_span_ok(p.row_offsets, o, p.out_features, p.nnz)) {
      for (int r = 0; r < MR; ++r)
        if (n0 + r < p.rows) y[(n0 + r) * p.out_features + o] = NAN;
      continue;
    }
    float acc[32][MR] = {};
    int64_t base = p.row_offsets[o];
    for (int64_t c0 = 0; c0 < p.in_features; c0 += kBitmapChunkCols) {
      for (int i = 0; i < kBitmapChunkCols * MR; ++i) {
        const int r = i / kBitmapChunkCols, col = i % kBitmapChunkCols;
        const int64_t n = n0 + r, c = c0 + col;
        xs[col * MR + r] = n < p.rows && c < p.in_features ? x[n * p.in_features + c] : from_float<T>(0.0f);
      }
      int count[32], inclusive[32];
      uint64_t bits[32];
      for (int lane = 0; lane < 32; ++lane) {
        const int64_t tile = c0 / kTile + lane;
        bits[lane] = tile < p.tiles ? p.bitmask[o * p.tiles + tile] : 0ull;
        if (tile == p.tiles - 1 && p.in_features % kTile != 0) bits[lane] &= (1ull << (p.in_features % kTile)) - 1;
        count[lane] = popcount64(bits[lane]);
        inclusive[lane] = count[lane] + (lane ? inclusive[lane - 1] : 0);
      }
      for (int lane = 0; lane < 32; ++lane)
        bitmap_tile_dot<T, MR, kVec>(values, p.nnz, base + inclusive[lane] - count[lane], bits[lane],
                                     xs.data() + lane * kTile * MR, acc[lane]);
      base += inclusive[31];
    }
    const float b = p.bias ? as_float(static_cast<const T*>(p.bias)[o]) : 0.0f;
    const bool consumed_span = base == p.row_offsets[o + 1];
    for (int r = 0; r < MR; ++r) {
      float s = 0;
      for (int lane = 0; lane < 32; ++lane) s += acc[lane][r];
      if (n0 + r < p.rows) y[(n0 + r) * p.out_features + o] = consumed_span ? s + b : NAN;
    }
  }
}

template <typename T, bool kVec>
void run_bitmap(const BitmapArgs& p, float* y) {
  constexpr int kMaxMR = 16 / int(sizeof(T));
  int mr = 1;
  while (mr < kMaxMR && mr < p.rows) mr *= 2;
  for (int64_t n0 = 0; n0 < p.rows; n0 += mr) {
    if (mr == 1) run_bitmap_pass<T, 1, kVec>(p, n0, y);
    else if (mr == 2) run_bitmap_pass<T, 2, kVec>(p, n0, y);
    else if constexpr (kMaxMR >= 4) {
      if (mr == 4) run_bitmap_pass<T, 4, kVec>(p, n0, y);
      else if constexpr (kMaxMR >= 8) run_bitmap_pass<T, 8, kVec>(p, n0, y);
    }
  }
}

// header: kind (0 nm, 1 bitmap), dtype (0 f32, 1 bf16, 2 f16), rows, out, in, m, kept, nnz, has_bias, num_sms,
// aligned (bitmap: 0 puts values one element past a 16-byte boundary), 0.
int run_case(const char* case_path, const char* out_path) {
  std::vector<char> buf = read_all(case_path);
  const int64_t* h = reinterpret_cast<const int64_t*>(buf.data());
  const int64_t kind = h[0], dt = h[1], rows = h[2], out = h[3], in = h[4], m = h[5], kept = h[6], nnz = h[7],
                has_bias = h[8], sms = h[9], aligned = h[10];
  const size_t es = dt == 0 ? 4 : 2;
  const char* q = buf.data() + 12 * 8;
  auto take = [&](size_t n) { const char* r = q; q += (n + 15) / 16 * 16; return r; };
  const void* x = take(rows * in * es);
  std::vector<float> y(rows * out);
  if (kind == 0) {
    const int64_t kpr = in / m * kept, cw = (kpr * (m <= 4 ? 2 : 4) + 7) / 8;
    const void* values = take(out * kpr * es);
    const uint8_t* codes = reinterpret_cast<const uint8_t*>(take(out * cw));
    NMArgs a{};
    a.x = x; a.values = values; a.codes = codes; a.bias = has_bias ? take(out * es) : nullptr;
    a.rows = rows; a.out_features = out; a.in_features = in; a.kept_per_row = kpr; a.code_width = cw;
    const bool supported = dt == 1 ? nm_mma_supported<__nv_bfloat16>(m, kept, rows, in, x, values, codes, 8)
                                   : nm_mma_supported<__half>(m, kept, rows, in, x, values, codes, 8);
    if (!supported) { printf("not supported\n"); return 4; }
#define SPARSEKIT_EMULATE(M_, K_)                        \
    if (m == M_ && kept == K_) {                         \
      if (dt == 1) run_nm<__nv_bfloat16, M_, K_>(a, sms, y.data()); \
      else run_nm<__half, M_, K_>(a, sms, y.data());     \
    }
    SPARSEKIT_NM_MMA_PATTERNS(SPARSEKIT_EMULATE)
  } else {
    const int64_t tiles = (in + 63) / 64;
    const char* values = take((nnz + (aligned ? 0 : 1)) * es) + (aligned ? 0 : es);
    BitmapArgs a{};
    a.x = x; a.values = values;
    a.bitmask = reinterpret_cast<const uint64_t*>(take(out * tiles * 8));
    a.row_offsets = reinterpret_cast<const int64_t*>(take((out + 1) * 8));
    a.bias = has_bias ? take(out * es) : nullptr;
    a.rows = rows; a.out_features = out; a.in_features = in; a.tiles = tiles; a.nnz = nnz;
    if (dt == 0) aligned ? run_bitmap<float, true>(a, y.data()) : run_bitmap<float, false>(a, y.data());
    else if (dt == 1) aligned ? run_bitmap<__nv_bfloat16, true>(a, y.data())
                              : run_bitmap<__nv_bfloat16, false>(a, y.data());
    else aligned ? run_bitmap<__half, true>(a, y.data()) : run_bitmap<__half, false>(a, y.data());
  }
  FILE* f = fopen(out_path, "wb");
  fwrite(y.data(), 4, y.size(), f);
  fclose(f);
  return 0;
}

int main(int argc, char** argv) {
  for (int i = 1; i + 1 < argc; i += 2) {
    const int rc = run_case(argv[i], argv[i + 1]);
    if (rc) return rc;
  }
  return 0;
}
"""

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if _NVCC is None:
        pytest.skip("nvcc not found: the host emulation of the CUDA kernels needs it")
    folder = tmp_path_factory.mktemp("sparse_gemv_emulation")
    src, exe = folder / "emulate.cu", folder / "emulate"
    src.write_text(_EMULATION_SOURCE)
    # The flags the real build uses for half/bf16 (no implicit conversions); sm_80 for the mma asm the header has.
    flags = ["-std=c++20", "-O1", "-arch=sm_80", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
             "-D__CUDA_NO_HALF2_OPERATORS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", f"-I{_CSRC}"]
    build = subprocess.run([_NVCC, *flags, str(src), "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    return folder, exe


def _write_case(path, kind, dtype, rows, out_f, in_f, m, kept, nnz, bias, num_sms, aligned, arrays):
    header = [kind, _DTYPE_CODE[dtype], rows, out_f, in_f, m, kept, nnz, bias is not None, num_sms, aligned, 0]
    with open(path, "wb") as f:
        f.write(np.array(header, dtype=np.int64).tobytes())
        for t in arrays + ([bias] if bias is not None else []):
            raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
            f.write(raw + b"\0" * (-len(raw) % 16))


def _run_emulator(emulator, cases):
    """cases: list of (writer args, x, weight, bias); returns nothing, asserts each y against float64."""
    folder, exe = emulator
    argv = []
    for i, (args, *_rest) in enumerate(cases):
        _write_case(folder / f"case{i}.bin", *args)
        argv += [str(folder / f"case{i}.bin"), str(folder / f"y{i}.bin")]
    done = subprocess.run([str(exe), *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    for i, (args, x, weight, bias) in enumerate(cases):
        rows, out_f = args[2], args[3]
        y = torch.from_numpy(np.fromfile(folder / f"y{i}.bin", dtype=np.float32).reshape(rows, out_f))
        exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
        scale = x.double().abs() @ weight.double().abs().T + (0 if bias is None else bias.double().abs())
        # The emulation returns the float32 sums before the kernels' one rounding to x's dtype.
        worst = ((y.double() - exact).abs() / (1e-5 * scale + 1e-30)).max().item()
        assert worst <= 1.0, f"case {i} {args[:7]}: {worst:.2f}x the float32 bound"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_emulated_nm_mma_lanes(emulator, dtype):
    """Every built N:M pattern, rows 1..64 (1 to 8 blocks of 8), 1 and many SMs (with and without split-K),
    groups sparser than N:M (zero-filled slots)."""
    cases = []
    patterns = [(2, 1), (4, 1), (4, 2), (8, 1), (8, 2), (8, 3), (8, 4), (16, 8)]  # (M, kept)
    for (m, kept), rows, (out_f, in_f), num_sms in itertools.product(
            patterns, [1, 9, 64], [(17, 64), (40, 448)], [132, 3]):
        n = m - kept
        w = torch.randn(out_f, in_f) * R.nm_mask_reference(torch.rand(out_f, in_f), n, m)
        w[torch.rand(out_f, in_f) < 0.1] = 0
        w = w.to(dtype)
        p = pack_nm(w, n, m)
        x = torch.randn(rows, in_f).to(dtype)
        b = torch.randn(out_f).to(dtype) if rows != 9 else None
        args = (0, dtype, rows, out_f, in_f, m, kept, 0, b, num_sms, 1, [x, p.values, nm_index_codes(p.indices, m)])
        cases.append((args, x, w, b))
    for rows in (3, 17, 33):  # the other row-block counts, 2:4 only
        w = _nm_weight(24, 192, 2, 4, dtype)
        p = pack_nm(w, 2, 4)
        x = torch.randn(rows, 192).to(dtype)
        cases.append(((0, dtype, rows, 24, 192, 4, 2, 0, None, 8, 1, [x, p.values, nm_index_codes(p.indices, 4)]),
                      x, w, None))
    _run_emulator(emulator, cases)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_emulated_bitmap_lanes(emulator, dtype):
    """Rows 1..64 (passes of up to 16 / sizeof(T) rows), partial tiles, several 2048-column slices, empty and
    full weights, values aligned and one element off."""
    cases = []
    for rows, (out_f, in_f), sparsity, aligned in itertools.product(
            [1, 3, 17, 64], [(5, 64), (9, 200), (3, 4160)], [0.0, 0.5, 0.8, 1.0], [1, 0]):
        if (sparsity in (0.0, 1.0)) and rows != 3:
            continue
        w = _bitmap_weight(out_f, in_f, sparsity, dtype)
        p = pack_bitmap(w)
        x = torch.randn(rows, in_f).to(dtype)
        b = torch.randn(out_f).to(dtype) if rows % 2 else None
        values = p.values if aligned else torch.cat([torch.zeros(1, dtype=dtype), p.values])
        args = (1, dtype, rows, out_f, in_f, 0, 0, p.values.numel(), b, 132, aligned,
                [x, values, p.bitmask, p.row_offsets])
        cases.append((args, x, w, b))
    _run_emulator(emulator, cases)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_bitmap_row_offsets_checks(emulator, dtype):
    """The CUDA bitmap kernel's row_offsets checks (bitmap_span_ok before a row is read, its popcount against
    its span after), emulated as NaN rows where the kernel asserts: exactly the broken rows, the others exact."""
    folder, exe = emulator
    out_f, in_f, rows = 12, 300, 3
    w = _bitmap_weight(out_f, in_f, 0.6, dtype)
    p = pack_bitmap(w)
    x = torch.randn(rows, in_f).to(dtype)
    cases = [("good", p.values, p.row_offsets, set())] + bad_row_offsets_cases(p.values, p.row_offsets)
    argv = []
    for i, (_label, values, offsets, _nan) in enumerate(cases):
        _write_case(folder / f"offsets{i}.bin", 1, dtype, rows, out_f, in_f, 0, 0, values.numel(), None, 132, 1,
                    [x, values, p.bitmask, offsets])
        argv += [str(folder / f"offsets{i}.bin"), str(folder / f"offsets_y{i}.bin")]
    done = subprocess.run([str(exe), *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    ys = [torch.from_numpy(np.fromfile(folder / f"offsets_y{i}.bin", dtype=np.float32).reshape(rows, out_f))
          for i in range(len(cases))]
    assert torch.isfinite(ys[0]).all()
    for (label, _values, _offsets, nan_rows), y in zip(cases, ys):
        assert set(torch.nonzero(torch.isnan(y).all(dim=0)).flatten().tolist()) == nan_rows, label
        keep = [r for r in range(out_f) if r not in nan_rows]
        assert torch.equal(y[:, keep], ys[0][:, keep]), label
