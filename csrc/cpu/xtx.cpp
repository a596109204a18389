// CPU kernel for SparseGPT's Hessian statistic:
//   sparsekit::xtx_lower_accumulate_(xtx, x):  xtx[i, j] += sum over all rows of float(x[..., i]) * float(x[..., j])
//                                              for every j <= i (on and below the diagonal).
//
// xtx: (C, C) float32 contiguous, updated in place. x: (..., C) float32/float16/bfloat16, any strides.
// Entries above the diagonal are left to the caller (calibrate.mirror_lower_ overwrites them); the kernel
// may add partial products to those that share a tile with the diagonal.
//
// Why a kernel of its own: torch's float32 GEMM on CPU is MKL's sgemm, which takes its AVX2 code path on
// AMD CPUs. On this Zen 5 core it runs 112-114 GFLOP/s against an AVX-512 FMA peak of ~285 (a plain FMA loop),
// and a full `xtx.addmm_(x.t(), x)` also spends half of its FLOPs on the upper triangle. Here every FMA is
// AVX-512 and only tiles touching the lower triangle are computed: about 4x a full addmm_ and 2.4x the
// reference's lower-block addmm_ calls (benchmarks/results/xtx_cpu_1t.md).
//
// Layout. Rows of x are taken kKc at a time. Each block is packed once into panels of 16 channels
// (panel p holds x[t, 16p .. 16p + 16) for the block's rows t, zero past C), converting fp16/bf16 to
// float32 on the way. A micro-kernel then keeps an 8-row x (16 * kPanels)-column tile of xtx in 24 zmm
// registers: per row t, it loads the tile's column panels (x[t, j..j+48)) and broadcasts its 8 rows'
// values (x[t, i..i+8)), 24 FMAs. The tile is added to xtx once per block of rows.
//
// bfloat16 x on a CPU with AVX512-BF16 (a bfloat16 model): the same tiles over pairs of rows, with
// vdpbf16ps (two products per float32 lane and instruction, 1.7-2.0x the FMA path); see xtx_tile_bf16.
//
// Rounding: products are exact (float32 FMA; bfloat16 products fit float32); each tile sums kKc rows in
// float32 registers (in row order on the FMA path; by pairs on the bfloat16 path), then adds that partial
// to xtx. This is the summation a blocked float32
// GEMM does, so the error is of the reference's order (the tests bound it by float32 summation of the same
// terms). The result does not depend on the thread count: each tile is computed by one thread, blocks of
// rows in order.
//
// Threads split the 8-row blocks of xtx; row block r has about r / 6 tiles (the triangle), so a thread takes
// every T-th block from the bottom, which balances the work. Without AVX-512 (or with
// SPARSEKIT_CPU_ISA=scalar) the op runs the plain-PyTorch reference's lower-block addmm_ calls instead;
// SPARSEKIT_CPU_ISA=avx512 keeps bfloat16 on the FMA path.

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/cpu_isa.h"
#include "cpu/sgemm.h"
#include "cpu/to_float.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace sparsekit {
namespace {

constexpr int64_t kKc = 256;     // rows of x per packed block: 16 * 256 * 4 B = 16 KB per panel
constexpr int64_t kPanel = 16;   // channels per panel: one zmm of float32
constexpr int64_t kRows = 8;     // rows of xtx per micro-kernel tile (8 broadcasts x 3 panels = 24 accumulators)

// The reference's column blocks (sparsekit/ops/reference.py xtx_lower_blocks): at most 8, none narrower
// than 32 channels, widths rounded up to a multiple of 8. Used by the path without AVX-512.
void xtx_lower_blocks_addmm(const at::Tensor& xtx, const at::Tensor& x2) {
  const int64_t channels = xtx.size(0);
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(8, channels / 32));
  int64_t step = (channels + blocks - 1) / blocks;
  step = std::max<int64_t>(8, (step + 7) / 8 * 8);
  const at::Tensor xf = x2.scalar_type() == at::kFloat ? x2 : x2.to(at::kFloat);
  for (int64_t s = 0; s < channels; s += step) {
    const int64_t e = std::min(s + step, channels);
    xtx.narrow(0, s, e - s).narrow(1, 0, e).addmm_(xf.narrow(1, s, e - s).t(), xf.narrow(1, 0, e));
  }
}

// pack[p * kKc * kPanel + t * kPanel + l] = float(x[t0 + t, p * kPanel + l]), 0 for channels >= C, for the
// panels [p_begin, p_end) and rows t < kc. x: contiguous (rows, C).
template <typename scalar_t>
void pack_panels(const scalar_t* x, int64_t channels, int64_t t0, int64_t kc, int64_t p_begin, int64_t p_end,
                 float* pack) {
  for (int64_t p = p_begin; p < p_end; ++p) {
    float* dst = pack + p * kKc * kPanel;
    const int64_t c0 = p * kPanel;
    const int64_t width = std::min<int64_t>(kPanel, channels - c0);
    for (int64_t t = 0; t < kc; ++t) {
      const scalar_t* src = x + (t0 + t) * channels + c0;
      float* d = dst + t * kPanel;
      for (int64_t l = 0; l < width; ++l) d[l] = to_float(src[l]);
      for (int64_t l = width; l < kPanel; ++l) d[l] = 0.0f;
    }
  }
}

// Calls tile(p, std::integral_constant<int, n>) for the column panels [p, p + n) of the 8-row block at row i0:
// the panels of columns [0, min(C, i0 + 8)), three at a time, then the one or two left (sgemm.h's
// for_each_panel_group, shared with the float32 GEMM's tiles).
template <typename Tile>
void for_each_tile(int64_t i0, int64_t channels, const Tile& tile) {
  const int64_t col_end = std::min<int64_t>(channels, i0 + kRows);
  sgemm::for_each_panel_group((col_end + kPanel - 1) / kPanel, tile);
}

#if SPARSEKIT_HAVE_X86
SPARSEKIT_INTRINSICS_BEGIN

// c[r * ldc + j] += acc[r][j / 16][j % 16] for r < rows, j < cols: the tile's columns past cols (past C) are not
// stored, not even as +0: their addresses belong to the next row or lie past the end of xtx.
template <int kPanels>
SPARSEKIT_AVX512 inline void add_tile(const __m512 (&acc)[kRows][kPanels], float* c, int64_t ldc, int64_t rows,
                                      int64_t cols) {
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    if (r >= rows) break;
    float* cr = c + r * ldc;
#pragma GCC unroll 3
    for (int p = 0; p < kPanels; ++p) {
      const int64_t left = cols - p * kPanel;
      if (left >= kPanel) {
        _mm512_storeu_ps(cr + p * kPanel, _mm512_add_ps(_mm512_loadu_ps(cr + p * kPanel), acc[r][p]));
      } else if (left > 0) {
        const __mmask16 m = static_cast<__mmask16>((1u << left) - 1u);
        _mm512_mask_storeu_ps(cr + p * kPanel, m,
                              _mm512_add_ps(_mm512_maskz_loadu_ps(m, cr + p * kPanel), acc[r][p]));
      }
    }
  }
}

// c[r * ldc + j] += sum over t < kc of a[t * kPanel + r] * b[p * kKc * kPanel + t * kPanel + (j - 16 p)] for
// r < rows, j < cols (cols <= 16 * kPanels; columns past cols are computed but not stored).
template <int kPanels>
SPARSEKIT_AVX512 inline void xtx_tile(const float* __restrict a, const float* __restrict b, int64_t kc, float* c,
                                      int64_t ldc, int64_t rows, int64_t cols) {
  __m512 acc[kRows][kPanels] = {};  // zeros; kept in registers (24 of 32 zmm)
  for (int64_t t = 0; t < kc; ++t) {
    __m512 bv[kPanels];
#pragma GCC unroll 3
    for (int p = 0; p < kPanels; ++p) bv[p] = _mm512_loadu_ps(b + p * kKc * kPanel + t * kPanel);
    const float* at = a + t * kPanel;
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512 av = _mm512_set1_ps(at[r]);
#pragma GCC unroll 3
      for (int p = 0; p < kPanels; ++p) acc[r][p] = _mm512_fmadd_ps(av, bv[p], acc[r][p]);
    }
  }
  add_tile<kPanels>(acc, c, ldc, rows, cols);
}

// One 8-row block of xtx (rows [i0, i0 + 8)), columns [0, min(C, i0 + 8)), from the packed block of kc rows.
SPARSEKIT_AVX512 void xtx_row_block(const float* pack, int64_t kc, int64_t i0, float* xtx, int64_t channels) {
  const int64_t rows = std::min<int64_t>(kRows, channels - i0);
  const float* a = pack + (i0 / kPanel) * kKc * kPanel + (i0 % kPanel);
  float* c = xtx + i0 * channels;
  for_each_tile(i0, channels, [&](int64_t p, auto n) {
    xtx_tile<decltype(n)::value>(a, pack + p * kKc * kPanel, kc, c + p * kPanel, channels, rows,
                                 channels - p * kPanel);
  });
}

// bfloat16 x on a CPU with AVX512-BF16: the same tiles, two rows of x per instruction. vdpbf16ps adds, per
// float32 lane, the two products of a pair of bfloat16 values to the accumulator. Pairs run along the rows of
// x: lane l of a packed pair row holds (x[t, c], x[t + 1, c]) for its channel c, so one instruction adds
// x[t, i] x[t, j] + x[t + 1, i] x[t + 1, j] to xtx[i, j]'s accumulator. Products of bfloat16 values are exact
// in float32; on this Zen 5 the instruction adds them to the accumulator one at a time (row t + 1 first),
// rounding to nearest even after each, as a float32 FMA loop would in another order. It also flushes
// subnormal inputs and results (|x| < 1.2e-38) to zero, which the float32 path does not.
//
// pack16[p * kKc * kPanel + q * 2 * kPanel + 2 * l + h] = x[t0 + 2 q + h, p * kPanel + l] (bits), 0 past the
// rows (odd kc) and past C.
void pack_pairs_bf16(const c10::BFloat16* x, int64_t channels, int64_t t0, int64_t kc, int64_t p_begin,
                     int64_t p_end, uint16_t* pack16) {
  const int64_t pairs = (kc + 1) / 2;
  for (int64_t p = p_begin; p < p_end; ++p) {
    uint16_t* dst = pack16 + p * kKc * kPanel;
    const int64_t c0 = p * kPanel;
    const int64_t width = std::min<int64_t>(kPanel, channels - c0);
    for (int64_t q = 0; q < pairs; ++q) {
      uint16_t* d = dst + q * 2 * kPanel;
      for (int64_t h = 0; h < 2; ++h) {
        const int64_t t = 2 * q + h;
        if (t < kc) {
          const c10::BFloat16* src = x + (t0 + t) * channels + c0;
          for (int64_t l = 0; l < width; ++l) d[2 * l + h] = src[l].x;
          for (int64_t l = width; l < kPanel; ++l) d[2 * l + h] = 0;
        } else {
          for (int64_t l = 0; l < kPanel; ++l) d[2 * l + h] = 0;
        }
      }
    }
  }
}

// xtx_tile over pairs of rows: a and b point into pack16 (see pack_pairs_bf16); pairs = ceil(kc / 2).
template <int kPanels>
SPARSEKIT_AVX512_BF16 inline void xtx_tile_bf16(const uint16_t* __restrict a, const uint16_t* __restrict b,
                                                int64_t pairs, float* c, int64_t ldc, int64_t rows, int64_t cols) {
  __m512 acc[kRows][kPanels] = {};  // zeros; kept in registers (24 of 32 zmm)
  for (int64_t q = 0; q < pairs; ++q) {
    __m512bh bv[kPanels];
#pragma GCC unroll 3
    for (int p = 0; p < kPanels; ++p) {
      bv[p] = (__m512bh)_mm512_loadu_si512(b + p * kKc * kPanel + q * 2 * kPanel);
    }
    const uint16_t* aq = a + q * 2 * kPanel;
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      int32_t pair;
      std::memcpy(&pair, aq + 2 * r, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 3
      for (int p = 0; p < kPanels; ++p) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], av, bv[p]);
    }
  }
  add_tile<kPanels>(acc, c, ldc, rows, cols);
}

SPARSEKIT_AVX512_BF16 void xtx_row_block_bf16(const uint16_t* pack16, int64_t kc, int64_t i0, float* xtx,
                                              int64_t channels) {
  const int64_t rows = std::min<int64_t>(kRows, channels - i0);
  const int64_t pairs = (kc + 1) / 2;
  const uint16_t* a = pack16 + (i0 / kPanel) * kKc * kPanel + 2 * (i0 % kPanel);
  float* c = xtx + i0 * channels;
  for_each_tile(i0, channels, [&](int64_t p, auto n) {
    xtx_tile_bf16<decltype(n)::value>(a, pack16 + p * kKc * kPanel, pairs, c + p * kPanel, channels, rows,
                                      channels - p * kPanel);
  });
}

SPARSEKIT_INTRINSICS_END

// The driver: blocks of kKc rows, each packed by all threads, then its tiles split among them (see the top).
// kPairs: bfloat16 x packed in pairs of rows for vdpbf16ps; otherwise float32 panels for FMAs.
template <typename scalar_t, bool kPairs>
void xtx_lower_driver(const at::Tensor& xtx, const at::Tensor& x2) {
  const int64_t channels = xtx.size(0);
  const int64_t rows = x2.size(0);
  const int64_t panels = (channels + kPanel - 1) / kPanel;
  const int64_t row_blocks = (channels + kRows - 1) / kRows;
  // 64-byte aligned (c10's CPU allocator), one slab per panel (16 KB float32, 8 KB bfloat16 pairs).
  const at::Tensor pack_buf =
      at::empty({panels * kKc * kPanel}, x2.options().dtype(kPairs ? at::kBFloat16 : at::kFloat));
  float* out = xtx.data_ptr<float>();
  const scalar_t* src = x2.const_data_ptr<scalar_t>();
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), row_blocks));
  for (int64_t t0 = 0; t0 < rows; t0 += kKc) {
    const int64_t kc = std::min(kKc, rows - t0);
    at::parallel_for(0, panels, std::max<int64_t>(1, 4096 / kc), [&](int64_t begin, int64_t end) {
      if constexpr (kPairs) {
        pack_pairs_bf16(src, channels, t0, kc, begin, end, static_cast<uint16_t*>(pack_buf.data_ptr()));
      } else {
        pack_panels<scalar_t>(src, channels, t0, kc, begin, end, pack_buf.data_ptr<float>());
      }
    });
    // Worker k takes row blocks row_blocks-1-k, row_blocks-1-k-threads, ...: near-equal shares of the triangle.
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        for (int64_t rb = row_blocks - 1 - k; rb >= 0; rb -= threads) {
          if constexpr (kPairs) {
            xtx_row_block_bf16(static_cast<const uint16_t*>(pack_buf.const_data_ptr()), kc, rb * kRows, out,
                               channels);
          } else {
            xtx_row_block(pack_buf.const_data_ptr<float>(), kc, rb * kRows, out, channels);
          }
        }
      }
    });
  }
}
#endif


void xtx_lower_accumulate_cpu(const at::Tensor& xtx, const at::Tensor& x) {
  constexpr const char* kOp = "xtx_lower_accumulate_";
  TORCH_CHECK(xtx.device().is_cpu(), "sparsekit::", kOp, ": the CPU kernel got xtx on ", xtx.device());
  TORCH_CHECK(x.device().is_cpu(), "sparsekit::", kOp, ": the CPU kernel got x on ", x.device());
  TORCH_CHECK(xtx.dim() == 2 && xtx.size(0) == xtx.size(1) && xtx.scalar_type() == at::kFloat, "sparsekit::",
              kOp, ": xtx must be a square 2-D float32 accumulator, got shape ", xtx.sizes(), " dtype ",
              xtx.scalar_type());
  TORCH_CHECK(xtx.is_contiguous(), "sparsekit::", kOp, ": xtx must be contiguous");
  const int64_t channels = xtx.size(0);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == channels, "sparsekit::", kOp, ": x must have ", channels,
              " channels in its last dim, got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "sparsekit::", kOp,
              ": x must be float32, float16 or bfloat16, got ", dt);
  if (channels == 0 || x.numel() == 0) return;
  const at::Tensor x2 = x.reshape({-1, channels}).contiguous();
  // x is read while xtx is written (packed block by block), so they must not share memory.
  TORCH_CHECK(at::get_overlap_status(xtx, x2) == at::MemOverlapStatus::No, "sparsekit::", kOp,
              ": x overlaps xtx in memory");
#if SPARSEKIT_HAVE_X86
  if (dt == at::kBFloat16 && use_avx512_bf16()) {
    xtx_lower_driver<c10::BFloat16, true>(xtx, x2);
    return;
  }
  if (use_avx512()) {
    AT_DISPATCH_SWITCH(dt, "sparsekit_xtx_lower",
        AT_DISPATCH_CASE(at::kFloat, [&] { xtx_lower_driver<scalar_t, false>(xtx, x2); })
        AT_DISPATCH_CASE(at::kHalf, [&] { xtx_lower_driver<scalar_t, false>(xtx, x2); })
        AT_DISPATCH_CASE(at::kBFloat16, [&] { xtx_lower_driver<scalar_t, false>(xtx, x2); }));
    return;
  }
#endif
  xtx_lower_blocks_addmm(xtx, x2);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("xtx_lower_accumulate_", TORCH_FN(xtx_lower_accumulate_cpu));
}

}  // namespace sparsekit
