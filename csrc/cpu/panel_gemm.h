// bfloat16 F.linear(x, W, bias) for a packed W at 17..kPanelMaxRows rows of x on CPUs with AVX512-BF16: the
// "panel" path of unpack_linear_blocked (unpack_linear.h), used by sparsekit::nm_unpack_linear and
// sparsekit::bitmap_unpack_linear, and so by nm_linear / bitmap_linear above their streamed limit.
//
// Why: at these row counts a bfloat16 layer is compute-bound, so the packed weight saves little time, and the
// block decode + BLAS path pays the decode on top: it wrote 4-32 MiB blocks of dense weight to memory for
// oneDNN to read back and repack (Llama-3-8B mlp.down at M = 64, 2 threads: 0.82x dense; SmolLM2's 576x576
// at M = 32: 0.71x). Here the weight never leaves L2 as dense:
//
//   * x is packed once per call into VNNI pairs: panel[k / 2][m][2] (bfloat16), m padded to a multiple of 16
//     with zeros, in chunks of up to 64 rows of x (one gather per 16 rows and pair of columns);
//   * the weight is decoded kTileRows (24) rows at a time into a per-thread row-major buffer, by the same
//     decode_rows callback as the block path (kTileRows * in_features * 2 bytes: 672 KiB at K = 14336);
//   * a register-blocked micro-kernel multiplies Or decoded rows by a chunk of x: per pair of columns it
//     loads the chunk's Mz = rows / 16 vectors of x once and, for each of the Or rows, broadcasts the
//     row's two weights and issues Mz vdpbf16ps (Or * Mz = 12 to 24 float32 accumulators; Or = 12, 12, 8, 6
//     for Mz = 1..4). The accumulators hold y^T; they are written to y transposed, bias added in float32,
//     rounded to bfloat16 once (as at::addmm does).
//
// The products are those of the dense layer (pruned weights are decoded as zeros), so inf/NaN in x behave as
// in F.linear; the sums are float32 in a different order than oneDNN's. One parallel region per call, over
// tiles of output rows (see unpack_linear.h for why only one).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include "cpu/cpu_isa.h"
#include "cpu/sgemm.h"
#include "cpu/thread_buffer.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>

namespace sparsekit {

namespace panel {

constexpr int64_t kTileRows = 24;   // weight rows decoded at once: a multiple of every Or below
constexpr int64_t kChunkRows = 64;  // rows of x per micro-kernel call (Mz <= 4)
// Above this many rows of x the block decode + BLAS path is used (see the dispatch benchmark).
constexpr int64_t kPanelMaxRows = 128;
// Past a multiple of 16 rows of x (and above 16), up to this many rows go to tail_times_tile instead of a padded
// 16-row vector of the micro-kernel. Development runs (eighth session, 1 thread, bfloat16, cold weights, op time
// against dense): on 4096x14336 2:4 at M = 17 / 18 / 19 / 33 / 34 / 35 went from 0.88 / 0.87 / 0.92 / 0.90 / 0.91 /
// 0.93x to 0.95 / 0.97 / 0.95 / 1.07 / 1.05 / 1.04x (4:8 alike), M = 20 was level (0.93 / 0.94x), and 8 tail rows
// (M = 24) fell from 1.06x to 0.87x: the tail's x rows and tile rows are read from L2 for every pair of tile rows.
// On 4096x4096 2:4 went from 0.92 / 0.95 / 0.97x to 1.09 / 1.08 / 1.15x at M = 17 / 20 / 33, on 576x1536 from 0.98 /
// 1.04 / 0.99x to 1.23 / 1.23 / 1.22x.
constexpr int64_t kTailRowsMax = 4;
// nm_linear (2:4) and bitmap_linear hand bfloat16 calls with at least this many rows to the panel path instead
// of their streamed kernels. Development runs (1 and 2 threads, Llama-3-8B and SmolLM2 shapes, 2026-11-24): at
// M = 12 the 2:4 streamed kernel won on five of six shapes, at M = 16 the panel on five of six with 2 threads; the
// bitmap streamed kernel kept the Llama-3-8B shapes at M = 16 (1.24-1.31x dense against the panel's 1.06-1.18x,
// 1 thread) and lost the SmolLM2 ones (576x576: 0.98x against 1.28x), so small bitmap layers switch earlier.
// Sixth session (2 threads, warm-ish weights, development runs over M = 8..13): for weights of at most
// kSmallWeight elements the panel matched or beat the streamed kernels from M = 9 on (a 9-row call is two passes
// over the weight; 576x576 2:4 at M = 12: 1.48x dense against 1.05x, bitmap 1.58x against 1.13x), while on
// 4096x4096 the 2:4 streamed kernel still won at M = 12 (1.32x against 1.21x); the dispatch benchmark had shown
// 576x576 bfloat16 at M = 12 at 0.72-0.92x through the streamed kernels. Half-density N:M (2:4, 4:8, 1:2, 8:16)
// share the 2:4 limits.
// Eighth session (development runs, cold weights, M = 13..48, 1 thread on the three Llama-3-8B shapes, 2 threads on
// down): the panel pays for x's rows in steps of 16, so M = 17 costs what 32 does. The bitmap streamed kernel beat
// it at M = 17 (1.02-1.16x dense against 0.83-0.93x) and 20 (1.04-1.39x against 0.91-1.15x) on every one, and
// ran level at 24 (1.05-1.35x against 0.98-1.23x), so large bitmap layers switch at 25 (17 before). For 2:4 and
// 4:8 the panel stays: at M = 17 the 2:4 streamed kernel was ahead by 3-8% but also below dense on Llama down
// (0.92x), and 4:8's streamed kernel is slower than its panel. Small weights: the panel won at every M.
constexpr int64_t kPanelMinRows24 = 13;
constexpr int64_t kPanelMinRows24Small = 9;  // weights of at most kSmallWeight elements
constexpr int64_t kPanelMinRowsBitmap = 25;
constexpr int64_t kPanelMinRowsBitmapSmall = 9;  // weights of at most kSmallWeight elements
constexpr int64_t kSmallWeight = int64_t(1) << 20;

// Where the packed bytes of some weight rows lie (up to two contiguous ranges: values, and codes or bitmask),
// so that the next tile's can be prefetched while the current one is multiplied.
struct Ranges {
  const char* begin[2] = {nullptr, nullptr};
  int64_t bytes[2] = {0, 0};
};

// Part `part` of `parts` of the ranges' cache lines, as one span [begin, begin + 64 * lines) per range.
struct Span {
  const char* begin[2] = {nullptr, nullptr};
  int64_t lines[2] = {0, 0};
};
inline Span span_part(const Ranges& r, int64_t part, int64_t parts) {
  Span s;
  for (int i = 0; i < 2; ++i) {
    if (!r.begin[i] || r.bytes[i] <= 0) continue;
    const int64_t lines = (r.bytes[i] + 63) / 64;
    const int64_t l0 = lines * part / parts;
    s.begin[i] = r.begin[i] + l0 * 64;
    s.lines[i] = lines * (part + 1) / parts - l0;
  }
  return s;
}

// The caller's buffer for the packed x (thread_buffer.h).
struct XPanelTag;

#if SPARSEKIT_HAVE_X86
SPARSEKIT_INTRINSICS_BEGIN

// c[r][0 .. 16 * Mz) (+)= sum over pairs p < pairs of w[r * ldw + 2p .. +2) . xp[p][.][0..2), r < Or: stored,
// or added to c when `accumulate`.
// Meanwhile it prefetches the lines of `next` into L2, one per pair of columns (prefetches never fault): a
// burst of them before the call stalled on the miss queue, and the next tile's decode then waited on memory.
template <int Mz, int Or>
SPARSEKIT_AVX512_BF16 __attribute__((noinline)) void micro(const uint16_t* xp, const uint16_t* w, int64_t ldw,
                                                            int64_t pairs, float* c, bool accumulate,
                                                            const Span& next) {
  __m512 acc[Or][Mz];
  for (int r = 0; r < Or; ++r)
    for (int j = 0; j < Mz; ++j) acc[r][j] = accumulate ? _mm512_loadu_ps(c + (r * Mz + j) * 16) : _mm512_setzero_ps();
  const char* pf = next.begin[0];
  int64_t pf_left = next.lines[0];
  for (int64_t l = 0; l < next.lines[1]; ++l) __builtin_prefetch(next.begin[1] + l * 64, 0, 2);
  for (int64_t p = 0; p < pairs; ++p) {
    if (pf_left > 0) {
      __builtin_prefetch(pf, 0, 2);
      pf += 64;
      --pf_left;
    }
    __m512i xv[Mz];
    for (int j = 0; j < Mz; ++j) xv[j] = _mm512_loadu_si512(xp + (p * Mz * 16 + 16 * j) * 2);
    for (int r = 0; r < Or; ++r) {
      int32_t pair;
      std::memcpy(&pair, w + r * ldw + 2 * p, sizeof(pair));
      const __m512bh wb = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < Mz; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wb, (__m512bh)xv[j]);
    }
  }
  for (; pf_left > 0; --pf_left, pf += 64) __builtin_prefetch(pf, 0, 2);  // a short K block: the rest now
  for (int r = 0; r < Or; ++r)
    for (int j = 0; j < Mz; ++j) _mm512_storeu_ps(c + (r * Mz + j) * 16, acc[r][j]);
}

// Rows [0, rows) of x (row-major, in_features = 2 * pairs columns) to the VNNI panel xp[p][Mz * 16][2], rows
// past `rows` zero.
SPARSEKIT_AVX512_BF16 inline void pack_x(const uint16_t* x, int64_t rows, int64_t pairs, int mz, uint16_t* xp) {
  const auto* x32 = reinterpret_cast<const int*>(x);
  auto* xp32 = reinterpret_cast<int*>(xp);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int g = 0; g < mz; ++g) {
    const int64_t n = std::clamp<int64_t>(rows - 16 * g, 0, 16);
    const __mmask16 live = static_cast<__mmask16>((uint32_t(1) << n) - 1);
    // word offsets of rows 16g.. from the chunk's first word; rows * pairs < 2^31 is checked by the caller
    const __m512i idx = _mm512_mullo_epi32(_mm512_add_epi32(lanes, _mm512_set1_epi32(16 * g)),
                                           _mm512_set1_epi32(static_cast<int>(pairs)));
    for (int64_t p = 0; p < pairs; ++p) {
      const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, idx, x32 + p, 4);
      _mm512_storeu_si512(xp32 + p * mz * 16 + 16 * g, v);
    }
  }
}

// 16 floats to bfloat16 as c10::BFloat16(float) rounds them: to nearest even, any NaN to 0x7FC0.
SPARSEKIT_AVX512_BF16 inline __m256i round_to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0)));
}

// y[m][r] = bfloat16(c[r * ld + m] + bias[r]) for r < rows, m < cols (y's rows ldy apart): 16x16 blocks of c
// transposed in registers, then one store of up to 16 outputs per row of y (a gather per row of y cost 10% of
// the call on a 576x576 layer at M = 64).
SPARSEKIT_AVX512_BF16 __attribute__((noinline)) inline void store_tile(const float* c, int64_t ld, int64_t rows,
                                                                        int64_t cols, const float* bias,
                                                                        c10::BFloat16* y, int64_t ldy) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t nr = std::min<int64_t>(16, rows - r0);
    const __mmask16 live = static_cast<__mmask16>((uint32_t(1) << nr) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(live, bias + r0) : _mm512_setzero_ps();
    for (int64_t m0 = 0; m0 < cols; m0 += 16) {
      const int64_t nm = std::min<int64_t>(16, cols - m0);
      __m512 v[16];
      for (int64_t i = 0; i < 16; ++i) v[i] = i < nr ? _mm512_loadu_ps(c + (r0 + i) * ld + m0) : _mm512_setzero_ps();
      sgemm::transpose16(v);
      for (int64_t j = 0; j < nm; ++j) {
        _mm256_mask_storeu_epi16(y + (m0 + j) * ldy + r0, live, round_to_bf16(_mm512_add_ps(v[j], b)));
      }
    }
  }
}

// Rows of the micro-kernel's tile for Mz vectors of x rows (Or * Mz accumulators, 12 to 24 of 32 registers).
constexpr int64_t or_of(int64_t mz) { return mz <= 2 ? 12 : mz == 3 ? 8 : 6; }
// Pairs of columns per K block: x's panel block is 256 KiB, a quarter of the 1 MiB L2 of the development machine.
constexpr int64_t block_pairs(int64_t mz) { return (int64_t(1) << 16) / (mz * 16) / 64 * 64; }

// One chunk of x against the tile's decoded rows: sub-tiles of Or rows into a float32 tile of results, then
// to y (rows m0.., columns r0..) one row of y at a time, so that each row's kTileRows outputs are written
// together (storing each sub-tile's Or outputs per row of y touched a cache line per element: a third of
// the time at K = 4096), bias (float32, or nullptr) added before the rounding.
template <int Mz, int Or>
inline void chunk_times_tile(const uint16_t* xp, const uint16_t* tile, int64_t in_features, int64_t rows_in_tile,
                             int64_t m0, int64_t chunk_rows, int64_t r0, const float* bias, int64_t out_features,
                             c10::BFloat16* y, const Ranges& next, int64_t& part, int64_t parts) {
  constexpr int64_t kLd = Mz * 16;
  alignas(64) float c[kTileRows * kLd];
  const int64_t pairs = in_features / 2;
  const int64_t block = block_pairs(Mz);
  // K blocks outside the sub-tiles: a block of x's panel is read from L2 by every sub-tile
  for (int64_t p0 = 0; p0 < pairs; p0 += block) {
    const int64_t n = std::min(block, pairs - p0);
    for (int64_t s = 0; s * Or < rows_in_tile; ++s) {
      micro<Mz, Or>(xp + p0 * kLd * 2, tile + s * Or * in_features + 2 * p0, in_features, n, c + s * Or * kLd,
                    p0 > 0, span_part(next, part++, parts));
    }
  }
  store_tile(c, kLd, rows_in_tile, chunk_rows, bias ? bias + r0 : nullptr, y + m0 * out_features + r0,
             out_features);
}

// The last r = rows_x % 16 rows of x (1..kTailRowsMax) against the tile's decoded rows, without padding them to
// 16: y[m][o] = bfloat16(sum_k tile[o][k] * xt[m][k] + bias[o]) for m < R, o < rows_in_tile (y's rows ldy apart),
// rounded once as store_tile rounds. Two tile rows at a time: per 32 columns one load of each of the two rows and of
// each of the R rows of x (row-major, in L1/L2), and 2R vdpbf16ps; the 16 lanes of each sum are added at the end.
// The micro-kernel would spend a whole 16-row vector on them: a 17-row call cost what a 32-row one does
// (0.83-0.96x dense on the Llama-3-8B shapes, 1 thread). See kTailRowsMax for when this pays.
template <int R>
SPARSEKIT_AVX512_BF16 __attribute__((noinline)) void tail_times_tile(const uint16_t* xt, const uint16_t* tile,
                                                                      int64_t in_features, int64_t rows_in_tile,
                                                                      const float* bias, c10::BFloat16* y,
                                                                      int64_t ldy) {
  const int64_t steps = in_features / 32;
  const int64_t rest = in_features - steps * 32;  // even, < 32
  const __mmask16 rest_mask = static_cast<__mmask16>((1u << (rest / 2)) - 1);
  for (int64_t o0 = 0; o0 < rows_in_tile; o0 += 2) {
    const uint16_t* w0 = tile + o0 * in_features;
    const uint16_t* w1 = w0 + in_features;  // a zeroed row past the last weight row when rows_in_tile is odd
    __m512 a0[R], a1[R];
    for (int m = 0; m < R; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
    for (int64_t s = 0; s < steps; ++s) {
      const __m512bh v0 = (__m512bh)_mm512_loadu_si512(w0 + 32 * s);
      const __m512bh v1 = (__m512bh)_mm512_loadu_si512(w1 + 32 * s);
      for (int m = 0; m < R; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(xt + m * in_features + 32 * s);
        a0[m] = _mm512_dpbf16_ps(a0[m], v0, xv);
        a1[m] = _mm512_dpbf16_ps(a1[m], v1, xv);
      }
    }
    if (rest) {
      const __m512bh v0 = (__m512bh)_mm512_maskz_loadu_epi32(rest_mask, w0 + 32 * steps);
      const __m512bh v1 = (__m512bh)_mm512_maskz_loadu_epi32(rest_mask, w1 + 32 * steps);
      for (int m = 0; m < R; ++m) {
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi32(rest_mask, xt + m * in_features + 32 * steps);
        a0[m] = _mm512_dpbf16_ps(a0[m], v0, xv);
        a1[m] = _mm512_dpbf16_ps(a1[m], v1, xv);
      }
    }
    const float b0 = bias ? bias[o0] : 0.0f;
    const float b1 = bias && o0 + 1 < rows_in_tile ? bias[o0 + 1] : 0.0f;
    for (int m = 0; m < R; ++m) {
      y[m * ldy + o0] = c10::BFloat16(_mm512_reduce_add_ps(a0[m]) + b0);
      if (o0 + 1 < rows_in_tile) y[m * ldy + o0 + 1] = c10::BFloat16(_mm512_reduce_add_ps(a1[m]) + b1);
    }
  }
}

SPARSEKIT_INTRINSICS_END
#endif  // SPARSEKIT_HAVE_X86

// False when SPARSEKIT_CPU_PANEL=0: the block decode + BLAS path instead (tests and benchmarks compare them).
inline bool panel_enabled() {
  const char* v = std::getenv("SPARSEKIT_CPU_PANEL");
  return !(v && std::strcmp(v, "0") == 0);
}

// True when the panel path takes x (rows_x x in_features, contiguous) of this dtype on this CPU.
inline bool applies(at::ScalarType dtype, int64_t rows_x, int64_t in_features) {
#if SPARSEKIT_HAVE_X86
  return dtype == at::kBFloat16 && rows_x > 0 && rows_x <= kPanelMaxRows && in_features > 0 &&
         in_features % 2 == 0 && kChunkRows * (in_features / 2) < (int64_t(1) << 31) && use_avx512_bf16() &&
         panel_enabled();
#else
  (void)dtype, (void)rows_x, (void)in_features;
  return false;
#endif
}

// True when the block path's float32 GEMMs run sgemm.h's AVX-512 kernel on this CPU instead of at::addmm
// (SPARSEKIT_CPU_PANEL=0 or SPARSEKIT_CPU_ISA=scalar: at::addmm, as for bfloat16 above).
inline bool float32_applies() {
#if SPARSEKIT_HAVE_X86
  return use_avx512() && panel_enabled();
#else
  return false;
#endif
}

// True when a packed op (nm_linear, bitmap_linear) hands a call of rows_x rows to the panel path instead of its
// streamed kernels: from min_rows rows on (min_rows_small for weights of at most kSmallWeight elements), where
// applies().
inline bool takes_rows(at::ScalarType dtype, int64_t rows_x, int64_t out_features, int64_t in_features,
                       int64_t min_rows, int64_t min_rows_small) {
  return rows_x >= (out_features * in_features <= kSmallWeight ? min_rows_small : min_rows) &&
         applies(dtype, rows_x, in_features);
}

// y (rows_x, out_features), bfloat16, contiguous = x2 @ W^T + bias; applies() must hold.
// decode_rows(r_begin, r_end, dst): dense rows [r_begin, r_end) of W, row-major, to dst (unpack_linear.h).
// ranges_of(r_begin, r_end): the Ranges of those rows' packed bytes (only prefetched).
template <typename DecodeRows, typename RangesOf>
void linear(const at::Tensor& x2, at::Tensor& y, int64_t out_features, int64_t in_features,
            const std::optional<at::Tensor>& bias, DecodeRows& decode_rows, RangesOf& ranges_of) {
#if SPARSEKIT_HAVE_X86
  const int64_t rows_x = x2.size(0);
  const int64_t pairs = in_features / 2;
  // the last rows_x % 16 rows, when few, go to tail_times_tile; the micro-kernel takes the rest
  const int64_t tail = rows_x > 16 && rows_x % 16 <= kTailRowsMax ? rows_x % 16 : 0;
  const int64_t main_rows = rows_x - tail;
  // x in chunks of up to kChunkRows rows, each packed as [pairs][mz * 16][2] (mz = its rows / 16 rounded up)
  struct Chunk {
    int64_t m0, rows, mz, offset;
  };
  std::array<Chunk, (kPanelMaxRows + kChunkRows - 1) / kChunkRows> chunk{};
  const int64_t chunks = (main_rows + kChunkRows - 1) / kChunkRows;
  int64_t panel_elems = 0;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t rows = std::min(kChunkRows, main_rows - ch * kChunkRows);
    chunk[ch] = {ch * kChunkRows, rows, (rows + 15) / 16, panel_elems};
    panel_elems += pairs * chunk[ch].mz * 32;
  }
  auto* xp = static_cast<uint16_t*>(thread_buffer<XPanelTag>(static_cast<size_t>(panel_elems) * 2));
  const auto* x = reinterpret_cast<const uint16_t*>(x2.const_data_ptr());
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const Chunk& c = chunk[ch];
    pack_x(x + c.m0 * in_features, c.rows, pairs, static_cast<int>(c.mz), xp + c.offset);
  }
  at::Tensor bias_f;
  const float* b = nullptr;
  if (bias.has_value()) {
    bias_f = bias->to(at::kFloat).contiguous();
    b = bias_f.const_data_ptr<float>();
  }
  auto* yp = reinterpret_cast<c10::BFloat16*>(y.data_ptr());
  const int64_t tiles = (out_features + kTileRows - 1) / kTileRows;
  at::parallel_for(0, tiles, 1, [&](int64_t t_begin, int64_t t_end) {
    auto* tile = static_cast<uint16_t*>(unpack_scratch(static_cast<size_t>(kTileRows * in_features * 2)));
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t r0 = t * kTileRows;
      const int64_t count = std::min(kTileRows, out_features - r0);
      decode_rows(r0, r0 + count, tile);
      // rows past the last weight row: zeros, so the last sub-tile reads defined values (its results for
      // those rows are not stored)
      if (count < kTileRows) std::memset(tile + count * in_features, 0, (kTileRows - count) * in_features * 2);
      // the next tile's packed rows, prefetched a slice before each micro-kernel call of this tile
      const Ranges next = t + 1 < t_end ? ranges_of(r0 + kTileRows, std::min(out_features, r0 + 2 * kTileRows))
                                        : Ranges{};
      int64_t parts = 0;  // micro-kernel calls in this tile
      for (int64_t ch = 0; ch < chunks; ++ch) {
        const int64_t mz = chunk[ch].mz;
        parts += (count + or_of(mz) - 1) / or_of(mz) * ((pairs + block_pairs(mz) - 1) / block_pairs(mz));
      }
      int64_t part = 0;
      for (int64_t ch = 0; ch < chunks; ++ch) {
        const Chunk& c = chunk[ch];
        const uint16_t* xc = xp + c.offset;
        switch (c.mz) {
          case 1: chunk_times_tile<1, 12>(xc, tile, in_features, count, c.m0, c.rows, r0, b, out_features, yp, next, part, parts); break;
          case 2: chunk_times_tile<2, 12>(xc, tile, in_features, count, c.m0, c.rows, r0, b, out_features, yp, next, part, parts); break;
          case 3: chunk_times_tile<3, 8>(xc, tile, in_features, count, c.m0, c.rows, r0, b, out_features, yp, next, part, parts); break;
          default: chunk_times_tile<4, 6>(xc, tile, in_features, count, c.m0, c.rows, r0, b, out_features, yp, next, part, parts); break;
        }
      }
      if (tail > 0) {
        const uint16_t* xt = x + main_rows * in_features;
        const float* bt = b ? b + r0 : nullptr;
        c10::BFloat16* yt = yp + main_rows * out_features + r0;
        static_assert(kTailRowsMax == 4, "one case per tail size");
        switch (tail) {
          case 1: tail_times_tile<1>(xt, tile, in_features, count, bt, yt, out_features); break;
          case 2: tail_times_tile<2>(xt, tile, in_features, count, bt, yt, out_features); break;
          case 3: tail_times_tile<3>(xt, tile, in_features, count, bt, yt, out_features); break;
          default: tail_times_tile<4>(xt, tile, in_features, count, bt, yt, out_features); break;
        }
      }
    }
  });
#else
  (void)x2, (void)y, (void)out_features, (void)in_features, (void)bias, (void)decode_rows, (void)ranges_of;
  TORCH_CHECK(false, "sparsekit: the panel path needs x86-64");
#endif
}

}  // namespace panel
}  // namespace sparsekit
