// float32 y = x W^T + bias on a block of decoded weight rows, with AVX-512 FMAs: the GEMM of
// unpack_linear.h's block path for float32 (sparsekit::nm_unpack_linear, bitmap_unpack_linear, and so
// nm_linear / bitmap_linear above their streamed kernels' rows).
//
// Why not at::addmm_out: torch's float32 GEMM on CPU is MKL's sgemm, which takes its AVX2 code path on AMD
// CPUs: 112-114 GFLOP/s per core on the development machine's Zen 5 against an AVX-512 FMA peak of ~285
// (benchmarks/results/xtx_cpu_1t.md). The sparse layer's float32 decode + GEMM path then ran at 0.95-1.17x the
// dense F.linear (the same MKL) with 1 thread and 0.87-1.54x with 2 (eighth session, M = 64-2048), 0.94-1.08x on
// SmolLM2's layers above M = 256 with 2 threads, where the streamed kernels had stopped paying. The XᵀX kernel's
// tile (csrc/cpu/xtx.cpp: 8 rows x 48 columns in 24 zmm) reached 79-85% of the peak; this is the same tile.
//
// Layout (the usual blocked GEMM, one thread):
//   * rows of x are taken kMc (1024) at a time, output features kNc (384) and K kKc (384) at a time; each
//     (kNc x kKc) block of the decoded weight is packed into panels of 16 features, pack[p][t][16] (a 16x16
//     transpose in registers), 576 KiB that stay in L2 (1 MiB per core on the development machine);
//   * the micro-kernel keeps 8 rows of y x 48 output features in 24 registers: per column t of the K block it
//     loads three panel vectors and broadcasts x[m][t] for its 8 rows m, straight from x's rows (12 KiB per K
//     block, in L1 across the block's eight tiles), 24 FMAs; the first tile prefetches the next 8 rows;
//   * the tile is stored to y at the first K block (plus the bias) and added to y at the others, so y (float32)
//     is the accumulator; its lanes are output features, so the stores are rows of y, no transpose.
// Products are those of the dense layer (pruned weights are decoded as zeros, so inf/NaN in x behave as in
// F.linear); the sums are float32 in K-block order, not MKL's.
#pragma once

#include "cpu/cpu_isa.h"
#include "cpu/thread_buffer.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace sparsekit {
namespace sgemm {

// Block sizes: development runs (eleventh session, 2 threads, 2:4 on the Llama-3-8B shapes at M = 256-4096) had
// 192 x 256 blocks at 317-363 GFLOP/s at M = 4096 (the strip of y re-read per K block, and x per 192 features, from
// memory); 384 x 384 blocks and kMc = 1024 took that to 360-404, against 410-430 at M = 256-1024.
constexpr int64_t kKc = 384;   // columns of x / W per packed block
constexpr int64_t kNc = 384;   // output features per packed block: 8 tiles of 48; 576 KiB packed, in L2
constexpr int64_t kMc = 1024;  // rows of x per pass over the weight block (see linear_block)
constexpr int64_t kMr = 8;    // rows of y per micro-kernel tile (8 broadcasts x 3 panels = 24 accumulators)
constexpr int64_t kLanes = 16;

struct PackTag;

// Calls tile(p, std::integral_constant<int, n>{}) for the 16-lane panels [p, p + n) of `panels`: three at a time
// (the 8 x 48 tiles), then the one or two left. Shared with the XᵀX kernel (xtx.cpp), whose tiles are the same.
template <typename Tile>
inline void for_each_panel_group(int64_t panels, const Tile& tile) {
  int64_t p = 0;
  for (; p + 3 <= panels; p += 3) tile(p, std::integral_constant<int, 3>{});
  if (panels - p == 2) {
    tile(p, std::integral_constant<int, 2>{});
  } else if (panels - p == 1) {
    tile(p, std::integral_constant<int, 1>{});
  }
}

#if SPARSEKIT_HAVE_X86
SPARSEKIT_INTRINSICS_BEGIN

// v[i] = row i of a 16x16 block of floats -> v[j] = column j (the usual unpack / shuffle transpose).
SPARSEKIT_AVX512 inline void transpose16(__m512* v) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    v[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    v[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    v[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    v[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int h = 0; h < 16; h += 8) {
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(v[h + i], v[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(v[h + i], v[h + i + 4], 0xDD);
    }
  }
  for (int i = 0; i < 8; ++i) {
    v[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    v[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}

// pack[p * kc * 16 + t * 16 + l] = w[(16 p + l) * ldw + t] for t < kc, 16 p + l < nc; 0 for the lanes past nc.
// Only w's rows < nc and columns < kc are read.
SPARSEKIT_AVX512 inline void pack_w(const float* w, int64_t ldw, int64_t nc, int64_t kc, float* pack) {
  for (int64_t p = 0; p * kLanes < nc; ++p) {
    const int64_t rows = std::min(kLanes, nc - p * kLanes);
    const float* wp = w + p * kLanes * ldw;
    float* dst = pack + p * kc * kLanes;
    for (int64_t t0 = 0; t0 < kc; t0 += kLanes) {
      const int64_t cols = std::min(kLanes, kc - t0);
      const __mmask16 live = static_cast<__mmask16>((uint32_t(1) << cols) - 1);
      __m512 v[16];
      for (int64_t i = 0; i < 16; ++i) {
        v[i] = i < rows ? _mm512_maskz_loadu_ps(live, wp + i * ldw + t0) : _mm512_setzero_ps();
      }
      transpose16(v);
      for (int64_t j = 0; j < cols; ++j) _mm512_storeu_ps(dst + (t0 + j) * kLanes, v[j]);
    }
  }
}

// y[r * ldy + j] = (first ? bias[j] (0 without bias) : y[r * ldy + j]) + sum over t < kc of x_r[t] *
// pack[(j / 16) * kc * 16 + t * 16 + j % 16], for r < rows (<= 8), j < cols, j < 16 * P. x_r = x + r * ldx;
// rows past `rows` repeat the last one (computed, not stored), columns past cols are not stored.
// next (or nullptr): the next 8-row group's columns [0, kc) (rows ldx apart, up to next_rows of them), prefetched
// into L2 one cache line per column t (8 rows of at most kc / 16 + 1 lines each): each row's segment is only
// kc * 4 bytes (1.5 KiB) of a long row, too short a stream for the hardware prefetcher, and at 2048-4096 rows x
// no longer fits in L3 (development run, 2 threads, M = 4096, 192 x 256 blocks: 4096 x 4096 from 440 to 378 ms,
// 4096 x 14336 from 1483 to 1431 ms).
template <int P>
SPARSEKIT_AVX512 __attribute__((noinline)) void tile(const float* x, int64_t ldx, int64_t rows, const float* pack,
                                                     int64_t kc, float* y, int64_t ldy, int64_t cols,
                                                     const float* bias, bool first, const float* next,
                                                     int64_t next_rows) {
  const float* xr[kMr];
  for (int64_t r = 0; r < kMr; ++r) xr[r] = x + std::min(r, rows - 1) * ldx;
  __m512 acc[kMr][P];
#pragma GCC unroll 8
  for (int r = 0; r < kMr; ++r)
#pragma GCC unroll 3
    for (int p = 0; p < P; ++p) acc[r][p] = _mm512_setzero_ps();
  // the prefetch cursor: the cache lines of row pf_row of next, from its first line (pf_line) to its last
  const uintptr_t row_bytes = static_cast<uintptr_t>(kc) * sizeof(float);
  int64_t pf_row = next ? 0 : next_rows;
  uintptr_t pf_line = 0, pf_end = 0;
  const auto start_row = [&] {
    const auto begin = reinterpret_cast<uintptr_t>(next + pf_row * ldx);
    pf_line = begin & ~uintptr_t{63};
    pf_end = begin + row_bytes;
  };
  if (pf_row < next_rows) start_row();
  for (int64_t t = 0; t < kc; ++t) {
    if (pf_row < next_rows) {
      __builtin_prefetch(reinterpret_cast<const char*>(pf_line), 0, 2);
      pf_line += 64;
      if (pf_line >= pf_end && ++pf_row < next_rows) start_row();
    }
    __m512 b[P];
#pragma GCC unroll 3
    for (int p = 0; p < P; ++p) b[p] = _mm512_loadu_ps(pack + p * kc * kLanes + t * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < kMr; ++r) {
      const __m512 a = _mm512_set1_ps(xr[r][t]);
#pragma GCC unroll 3
      for (int p = 0; p < P; ++p) acc[r][p] = _mm512_fmadd_ps(a, b[p], acc[r][p]);
    }
  }
#pragma GCC unroll 3
  for (int p = 0; p < P; ++p) {
    const int64_t left = std::min(kLanes, cols - p * kLanes);
    if (left <= 0) break;
    const __mmask16 live = static_cast<__mmask16>((uint32_t(1) << left) - 1);
    const __m512 b0 = first && bias ? _mm512_maskz_loadu_ps(live, bias + p * kLanes) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < kMr; ++r) {
      if (r >= rows) break;
      float* yr = y + r * ldy + p * kLanes;
      const __m512 base = first ? b0 : _mm512_maskz_loadu_ps(live, yr);
      _mm512_mask_storeu_ps(yr, live, _mm512_add_ps(base, acc[r][p]));
    }
  }
}

// linear_block for at most kMc rows of x; pack: kNc * kKc floats of scratch.
SPARSEKIT_AVX512 inline void linear_rows(const float* x, int64_t M, int64_t K, const float* w, int64_t N,
                                         const float* bias, float* y, int64_t ldy, float* pack) {
  for (int64_t n0 = 0; n0 < N; n0 += kNc) {
    const int64_t nc = std::min(kNc, N - n0);
    const int64_t panels = (nc + kLanes - 1) / kLanes;
    for (int64_t k0 = 0; k0 < K; k0 += kKc) {
      const int64_t kc = std::min(kKc, K - k0);
      pack_w(w + n0 * K + k0, K, nc, kc, pack);
      const bool first = k0 == 0;
      for (int64_t m0 = 0; m0 < M; m0 += kMr) {
        const int64_t rows = std::min(kMr, M - m0);
        const float* xm = x + m0 * K + k0;
        float* ym = y + m0 * ldy + n0;
        // the first tile of this row group prefetches the next group's x (the others find this group's in L1)
        const int64_t next_rows = std::min(kMr, M - m0 - kMr);
        const float* next = next_rows > 0 ? xm + kMr * K : nullptr;
        for_each_panel_group(panels, [&](int64_t p, auto n) {
          tile<decltype(n)::value>(xm, K, rows, pack + p * kc * kLanes, kc, ym + p * kLanes, ldy, nc - p * kLanes,
                                   bias ? bias + n0 + p * kLanes : nullptr, first, p == 0 ? next : nullptr,
                                   next_rows);
        });
      }
    }
  }
}

// y[m * ldy + n] = bias[n] (0 without bias) + sum over k < K of x[m * K + k] * w[n * K + k], for m < M, n < N:
// one thread. x: (M, K) row-major, w: (N, K) row-major (a block of decoded weight rows), y: rows ldy apart.
// Rows of x are taken kMc at a time, so that the strip of y that the K blocks add to (kMc x kNc floats) stays in
// L3; the weight block is packed again for each (a 1/kMc share of the multiply-adds).
SPARSEKIT_AVX512 inline void linear_block(const float* x, int64_t M, int64_t K, const float* w, int64_t N,
                                          const float* bias, float* y, int64_t ldy) {
  auto* pack = static_cast<float*>(thread_buffer<PackTag>(static_cast<size_t>(kNc * kKc) * sizeof(float)));
  for (int64_t mb = 0; mb < M; mb += kMc) {
    linear_rows(x + mb * K, std::min(kMc, M - mb), K, w, N, bias, y + mb * ldy, ldy, pack);
  }
}

SPARSEKIT_INTRINSICS_END
#endif  // SPARSEKIT_HAVE_X86

}  // namespace sgemm
}  // namespace sparsekit
