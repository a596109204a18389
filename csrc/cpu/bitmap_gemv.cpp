// CPU kernel for sparsekit::bitmap_linear: y = x @ W^T (+ bias) with W stored as a bitmap
// (sparsekit/formats/bitmap.py): int64 bitmask (out, T) over 64-column tiles, the non-zeros packed
// row-major, and row_offsets (out + 1) into them.
//
// Decode is memory-bound: the packed weight is read once per pass of up to 8 rows of x, and x stays in L1
// (pass-chunked layout and K blocks with prefetch: streamed.h). x is copied once, zero padded; outputs
// accumulate in float32 and are rounded to x's dtype once.
//
// * AVX-512 (checked at run time), float32 and bfloat16: each 16-bit quarter of a tile mask expands its
//   packed values into their 16 lanes (masked load + vexpandps, zeros elsewhere; bfloat16 widened first),
//   then one FMA per row of x against 16 contiguous inputs. The lanes of pruned weights multiply x by 0.
// * bfloat16 with AVX512-BF16 + VBMI2: each 32-bit half of a tile mask expands 32 packed bfloat16 with one
//   vpexpandw, then one vdpbf16ps per row of x (kept in bfloat16): half the instructions.
//   SPARSEKIT_CPU_ISA=avx512 forces the float32-lane path (tests).
// * Otherwise (float16, no AVX-512, SPARSEKIT_CPU_ISA=scalar): walk the set bits with ctz; pruned weights are
//   skipped, so an inf/NaN of x at a pruned position does not reach y there.
// * More than streamed::max_rows rows of x (2048 for float32 on the AVX-512 lanes, 64 otherwise), or bfloat16
//   with AVX512-BF16 from panel::kPanelMinRowsBitmap rows on (kPanelMinRowsBitmapSmall for weights of at most
//   panel::kSmallWeight elements): bitmap_unpack_linear_cpu (bitmap_unpack.cpp), the panel path (panel_gemm.h) or
//   block decode + BLAS.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "cpu/cpu_isa.h"
#include "cpu/panel_gemm.h"
#include "cpu/expand_row.h"
#include "cpu/streamed.h"
#include "cpu/to_float.h"
#include "cpu/unpack.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace sparsekit {
namespace {

constexpr int64_t kTile = 64;
constexpr int64_t kWeightsPerTask = 1 << 15;

struct BitmapProblem {
  int64_t out_features, in_features, in_padded, tiles, rows;
  const uint64_t* bitmask;
  const int64_t* row_offsets;
  const float* x;     // float32, zero padded: (rows, in_padded), pass-chunked on the vector path (streamed.h)
  const uint16_t* x_bf16;  // the bfloat16 dot path's x instead: bfloat16, zero padded, pass-chunked
  const float* bias;  // (out_features,) float32 or nullptr
  float* y;           // (rows, out_features) float32
  // The first row whose bits did not consume exactly its row_offsets' values (out_features if none): set by the
  // kernels after each row, checked once after the parallel region.
  std::atomic<int64_t>* bad_row;
};

inline void flag_bad_row(const BitmapProblem& p, int64_t r) {
  int64_t seen = p.bad_row->load(std::memory_order_relaxed);
  while (r < seen && !p.bad_row->compare_exchange_weak(seen, r, std::memory_order_relaxed)) {
  }
}

template <typename scalar_t>
void bitmap_row_scalar(const BitmapProblem& p, const scalar_t* values, int64_t r, int64_t i0, int64_t count) {
  const uint64_t* mk = p.bitmask + r * p.tiles;
  const float b = p.bias ? p.bias[r] : 0.0f;
  for (int64_t i = i0; i < i0 + count; ++i) {
    const scalar_t* v = values + p.row_offsets[r];
    const float* xr = p.x + i * p.in_padded;
    float acc[2] = {0.f, 0.f};
    int64_t k = 0;
    for (int64_t t = 0; t < p.tiles; ++t) {
      const float* xt = xr + t * kTile;
      for (uint64_t bits = mk[t]; bits; bits &= bits - 1, ++k) {
        acc[k & 1] += to_float(v[k]) * xt[__builtin_ctzll(bits)];
      }
    }
    p.y[i * p.out_features + r] = acc[0] + acc[1] + b;
    if (i == i0 && k != p.row_offsets[r + 1] - p.row_offsets[r]) flag_bad_row(p, r);
  }
}

#if SPARSEKIT_HAVE_X86
SPARSEKIT_INTRINSICS_BEGIN
// The 16 weights of one tile quarter as floats: the popcount(mask16) packed values at v spread to the set
// lanes (zeros elsewhere). Register-form expand after a masked load, which reads only those values.
SPARSEKIT_AVX512 inline __m512 expand16(const float* v, uint32_t mask16) {
  const auto first = static_cast<__mmask16>((1u << __builtin_popcount(mask16)) - 1);
  return _mm512_maskz_expand_ps(static_cast<__mmask16>(mask16), _mm512_maskz_loadu_ps(first, v));
}
SPARSEKIT_AVX512 inline __m512 expand16(const c10::BFloat16* v, uint32_t mask16) {
  // widen the packed values first (a bf16 is the top half of its float), then expand 32-bit lanes
  const auto first = static_cast<__mmask16>((1u << __builtin_popcount(mask16)) - 1);
  const __m256i h = _mm256_maskz_loadu_epi16(first, v);
  return _mm512_maskz_expand_ps(static_cast<__mmask16>(mask16),
                                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
}

// Prefetch of the same K block kPrefetchRows weight rows ahead (streamed.h): its values start about where
// this row's do, shifted by the rows' offsets (an address hint only; prefetches never fault).
struct RowPrefetch {
  uintptr_t values, mask;
};
template <typename scalar_t>
inline RowPrefetch row_prefetch(const BitmapProblem& p, const scalar_t* v, int64_t r, int64_t t0) {
  const int64_t ahead = std::min(r + streamed::kPrefetchRows, p.out_features - 1);
  const int64_t shift = (p.row_offsets[ahead] - p.row_offsets[r]) * static_cast<int64_t>(sizeof(scalar_t));
  return {reinterpret_cast<uintptr_t>(v) + static_cast<uintptr_t>(shift),
          reinterpret_cast<uintptr_t>(p.bitmask + ahead * p.tiles + t0)};
}

// One weight row against the kRows rows of x of the pass at i0, over tiles [t0, t1); v = the row's first
// value at tile t0. Returns the first value past t1. The first K block stores y, later ones add to it.
// Within a tile the four quarters find their values from popcounts of the tile's lower bits, so the only
// chain from tile to tile is one popcount add.
template <int kRows, typename scalar_t>
SPARSEKIT_AVX512 const scalar_t* bitmap_row_avx512(const BitmapProblem& p, const scalar_t* v, int64_t r,
                                                   int64_t i0, int64_t t0, int64_t t1) {
  const uint64_t* mk = p.bitmask + r * p.tiles;
  const RowPrefetch pf = row_prefetch(p, v, r, t0);
  const scalar_t* const v_begin = v;
  const float* x0 = p.x + i0 * p.in_padded;  // this pass's x, chunked by 16 floats (streamed.h)
  constexpr int64_t chunk_stride = kRows * 16;
#define SPARSEKIT_ACC_INIT(i) __m512 a##i = _mm512_setzero_ps();
  SPARSEKIT_FOR_PASS_ROWS(SPARSEKIT_ACC_INIT)  // named accumulators (streamed.h); unused ones are dropped
#undef SPARSEKIT_ACC_INIT
  for (int64_t t = t0; t < t1; ++t) {
    const uint64_t bits = mk[t];
    const int64_t done = (v - v_begin) * static_cast<int64_t>(sizeof(scalar_t));
    streamed::prefetch(pf.values, done);
    if constexpr (sizeof(scalar_t) == 4) streamed::prefetch(pf.values, done + 64);
    if (((t - t0) & 7) == 0) streamed::prefetch(pf.mask, (t - t0) * 8);
    const __m512 w[4] = {
        expand16(v, static_cast<uint32_t>(bits) & 0xFFFFu),
        expand16(v + __builtin_popcountll(bits & 0xFFFFull), static_cast<uint32_t>(bits >> 16) & 0xFFFFu),
        expand16(v + __builtin_popcountll(bits & 0xFFFFFFFFull), static_cast<uint32_t>(bits >> 32) & 0xFFFFu),
        expand16(v + __builtin_popcountll(bits & 0xFFFFFFFFFFFFull), static_cast<uint32_t>(bits >> 48))};
    v += __builtin_popcountll(bits);
    const float* xs = x0 + 4 * t * chunk_stride;
    for (int q = 0; q < 4; ++q) {
#define SPARSEKIT_ACC_FMA(i) \
  if constexpr (i < kRows) a##i = _mm512_fmadd_ps(w[q], _mm512_loadu_ps(xs + q * chunk_stride + 16 * i), a##i);
      SPARSEKIT_FOR_PASS_ROWS(SPARSEKIT_ACC_FMA)
#undef SPARSEKIT_ACC_FMA
    }
  }
  float sums[kRows];
#define SPARSEKIT_ACC_SUM(i) if constexpr (i < kRows) sums[i] = _mm512_reduce_add_ps(a##i);
  SPARSEKIT_FOR_PASS_ROWS(SPARSEKIT_ACC_SUM)
#undef SPARSEKIT_ACC_SUM
  streamed::finish_block<kRows>(p.y + i0 * p.out_features + r, p.out_features, sums, nullptr, t0 == 0,
                                p.bias ? p.bias[r] : 0.0f);
  return v;
}

// bfloat16 values as the 16-bit lanes load_expand32_vbmi2 (expand_row.h) moves.
inline const uint16_t* as_bits(const c10::BFloat16* v) { return reinterpret_cast<const uint16_t*>(v); }

// bfloat16 with AVX512-BF16 + VBMI2: each half of a tile expands 32 packed bfloat16 with one vpexpandw and
// meets x (kept in bfloat16, chunked by 32) in one vdpbf16ps per row of x: products are exact in float32 and
// summed in pairs into float32 lanes (inputs and results below 2^-126 are flushed to zero by the instruction).
template <int kRows>
SPARSEKIT_AVX512_BF16 const c10::BFloat16* bitmap_row_bf16dp(const BitmapProblem& p, const c10::BFloat16* v,
                                                            int64_t r, int64_t i0, int64_t t0, int64_t t1) {
  const uint64_t* mk = p.bitmask + r * p.tiles;
  const RowPrefetch pf = row_prefetch(p, v, r, t0);
  const c10::BFloat16* const v_begin = v;
  const uint16_t* x0 = p.x_bf16 + i0 * p.in_padded;  // this pass's x, chunked by 32 bfloat16
  constexpr int64_t chunk_stride = kRows * 32;
  // named accumulators (streamed.h), two per row of x (a: the tile's lower half, b: its upper half), so the
  // chain from tile to tile is one vdpbf16ps; unused ones are dropped
#define SPARSEKIT_ACC_INIT(i) __m512 a##i = _mm512_setzero_ps(), b##i = _mm512_setzero_ps();
  SPARSEKIT_FOR_PASS_ROWS(SPARSEKIT_ACC_INIT)
#undef SPARSEKIT_ACC_INIT
  for (int64_t t = t0; t < t1; ++t) {
    const uint64_t bits = mk[t];
    const int64_t done = (v - v_begin) * 2;
    streamed::prefetch(pf.values, done);
    if (((t - t0) & 7) == 0) streamed::prefetch(pf.mask, (t - t0) * 8);
    const auto lo = static_cast<uint32_t>(bits), hi = static_cast<uint32_t>(bits >> 32);
    const int nlo = __builtin_popcount(lo), nhi = __builtin_popcount(hi);
    const __m512i w0 = load_expand32_vbmi2(lo, as_bits(v));
    const __m512i w1 = load_expand32_vbmi2(hi, as_bits(v + nlo));
    v += nlo + nhi;
    const uint16_t* xs = x0 + 2 * t * chunk_stride;
#define SPARSEKIT_ACC_DP(i)                                                                              \
  if constexpr (i < kRows) {                                                                              \
    a##i = _mm512_dpbf16_ps(a##i, (__m512bh)w0, (__m512bh)_mm512_loadu_si512(xs + 32 * i));                \
    b##i = _mm512_dpbf16_ps(b##i, (__m512bh)w1, (__m512bh)_mm512_loadu_si512(xs + chunk_stride + 32 * i)); \
  }
    SPARSEKIT_FOR_PASS_ROWS(SPARSEKIT_ACC_DP)
#undef SPARSEKIT_ACC_DP
  }
  float sums[kRows];
#define SPARSEKIT_ACC_SUM(i) if constexpr (i < kRows) sums[i] = _mm512_reduce_add_ps(_mm512_add_ps(a##i, b##i));
  SPARSEKIT_FOR_PASS_ROWS(SPARSEKIT_ACC_SUM)
#undef SPARSEKIT_ACC_SUM
  streamed::finish_block<kRows>(p.y + i0 * p.out_features + r, p.out_features, sums, nullptr, t0 == 0,
                                p.bias ? p.bias[r] : 0.0f);
  return v;
}

// Two weight rows (r, r + 1) at once on the bfloat16 dot path: each chunk of x loaded feeds both rows, so a tile
// costs 16 loads of x for 32 vdpbf16ps instead of 16 for 16. One accumulator per (row of W, row of x) takes the
// tile's lower and upper halves in turn. va, vb: the rows' first values at tile t0; their first values past t1
// are returned in next_a, next_b.
// Used from kPairMinRows rows of x and kPairMinColumns columns. A/B runs on the development machine (Zen 5, 1
// thread, cold weights, bitmap 50/70/80%): 1.06-1.20x on Llama-3-8B q and down at M = 8-32 and 1.04-1.08x on
// SmolLM2 down (576x1536), but 0.89-0.95x at M = 1 and 0.65-1.05x on SmolLM2 up (1536x576) at every M.
constexpr int64_t kPairMinRows = 8;
constexpr int64_t kPairMinColumns = 1024;
template <int kRows>
SPARSEKIT_AVX512_BF16 void bitmap_row_pair_bf16dp(const BitmapProblem& p, const c10::BFloat16* va,
                                                  const c10::BFloat16* vb, int64_t r, int64_t i0, int64_t t0,
                                                  int64_t t1, const c10::BFloat16** next_a,
                                                  const c10::BFloat16** next_b) {
  const uint64_t* mka = p.bitmask + r * p.tiles;
  const uint64_t* mkb = mka + p.tiles;
  const RowPrefetch pfa = row_prefetch(p, va, r, t0);
  const RowPrefetch pfb = row_prefetch(p, vb, r + 1, t0);
  const c10::BFloat16* const va_begin = va;
  const c10::BFloat16* const vb_begin = vb;
  const uint16_t* x0 = p.x_bf16 + i0 * p.in_padded;  // this pass's x, chunked by 32 bfloat16
  constexpr int64_t chunk_stride = kRows * 32;
#define SPARSEKIT_ACC_INIT(i) __m512 a##i = _mm512_setzero_ps(), b##i = _mm512_setzero_ps();
  SPARSEKIT_FOR_PASS_ROWS(SPARSEKIT_ACC_INIT)  // a: row r, b: row r + 1 (named accumulators, streamed.h)
#undef SPARSEKIT_ACC_INIT
  for (int64_t t = t0; t < t1; ++t) {
    const uint64_t bits_a = mka[t], bits_b = mkb[t];
    streamed::prefetch(pfa.values, (va - va_begin) * 2);
    streamed::prefetch(pfb.values, (vb - vb_begin) * 2);
    if (((t - t0) & 7) == 0) {
      streamed::prefetch(pfa.mask, (t - t0) * 8);
      streamed::prefetch(pfb.mask, (t - t0) * 8);
    }
    const auto alo = static_cast<uint32_t>(bits_a), ahi = static_cast<uint32_t>(bits_a >> 32);
    const auto blo = static_cast<uint32_t>(bits_b), bhi = static_cast<uint32_t>(bits_b >> 32);
    const int nalo = __builtin_popcount(alo), nahi = __builtin_popcount(ahi);
    const int nblo = __builtin_popcount(blo), nbhi = __builtin_popcount(bhi);
    const __m512i wa0 = load_expand32_vbmi2(alo, as_bits(va));
    const __m512i wa1 = load_expand32_vbmi2(ahi, as_bits(va + nalo));
    const __m512i wb0 = load_expand32_vbmi2(blo, as_bits(vb));
    const __m512i wb1 = load_expand32_vbmi2(bhi, as_bits(vb + nblo));
    va += nalo + nahi;
    vb += nblo + nbhi;
    const uint16_t* xs = x0 + 2 * t * chunk_stride;
#define SPARSEKIT_ACC_DP(i)                                                                   \
  if constexpr (i < kRows) {                                                                   \
    const __m512bh x_lo = (__m512bh)_mm512_loadu_si512(xs + 32 * i);                           \
    const __m512bh x_hi = (__m512bh)_mm512_loadu_si512(xs + chunk_stride + 32 * i);            \
    a##i = _mm512_dpbf16_ps(_mm512_dpbf16_ps(a##i, (__m512bh)wa0, x_lo), (__m512bh)wa1, x_hi);  \
    b##i = _mm512_dpbf16_ps(_mm512_dpbf16_ps(b##i, (__m512bh)wb0, x_lo), (__m512bh)wb1, x_hi);  \
  }
    SPARSEKIT_FOR_PASS_ROWS(SPARSEKIT_ACC_DP)
#undef SPARSEKIT_ACC_DP
  }
  float sums_a[kRows], sums_b[kRows];
#define SPARSEKIT_ACC_SUM(i)                \
  if constexpr (i < kRows) {                \
    sums_a[i] = _mm512_reduce_add_ps(a##i); \
    sums_b[i] = _mm512_reduce_add_ps(b##i); \
  }
  SPARSEKIT_FOR_PASS_ROWS(SPARSEKIT_ACC_SUM)
#undef SPARSEKIT_ACC_SUM
  float* y = p.y + i0 * p.out_features + r;
  streamed::finish_block<kRows>(y, p.out_features, sums_a, nullptr, t0 == 0, p.bias ? p.bias[r] : 0.0f);
  streamed::finish_block<kRows>(y + 1, p.out_features, sums_b, nullptr, t0 == 0, p.bias ? p.bias[r + 1] : 0.0f);
  *next_a = va;
  *next_b = vb;
}

// Rows [r_begin, r_end) of W against every row of x, K block by K block (streamed.h); within a K block, weight
// rows kRowBlock at a time go through every pass of x before the next rows, so a weight row block is read from
// memory once and from L2 by the later passes. Each row's position in its values is carried from block to block.
template <bool kDot, typename scalar_t>
void bitmap_rows_avx512(const BitmapProblem& p, const scalar_t* values, int64_t r_begin, int64_t r_end) {
  std::vector<const scalar_t*> cursor(static_cast<size_t>(r_end - r_begin));
  for (int64_t r = r_begin; r < r_end; ++r) cursor[r - r_begin] = values + p.row_offsets[r];
  const int64_t kt = streamed::k_block_columns(std::min(streamed::kRowsPerPass, p.rows), kTile, kDot ? 2 : 4) /
                     kTile;  // tiles per K block
  for (int64_t t0 = 0; t0 < std::max<int64_t>(p.tiles, 1); t0 += kt) {  // once when in_features == 0
    const int64_t t1 = std::min(p.tiles, t0 + kt);
    for (int64_t rb = r_begin; rb < r_end; rb += streamed::kRowBlock) {
      const int64_t re = std::min(r_end, rb + streamed::kRowBlock);
      for (int64_t i0 = 0; i0 < p.rows; i0 += streamed::kRowsPerPass) {
        const int64_t n = std::min(streamed::kRowsPerPass, p.rows - i0);
        const bool last_pass = i0 + n >= p.rows;
        int64_t r = rb;
        if constexpr (kDot && std::is_same_v<scalar_t, c10::BFloat16>) {
          const bool pairs = p.rows >= kPairMinRows && p.in_features >= kPairMinColumns;
          for (; pairs && r + 1 < re; r += 2) {  // rows in pairs (bitmap_row_pair_bf16dp); an odd last row below
            const scalar_t*& va = cursor[r - r_begin];
            const scalar_t*& vb = cursor[r + 1 - r_begin];
            streamed::with_pass_rows(n, [&](auto rows) {
              constexpr int K = decltype(rows)::value;
              const scalar_t *next_a = va, *next_b = vb;
              bitmap_row_pair_bf16dp<K>(p, va, vb, r, i0, t0, t1, &next_a, &next_b);
              if (last_pass) {
                va = next_a;
                vb = next_b;
              }
            });
          }
        }
        for (; r < re; ++r) {
          const scalar_t*& v = cursor[r - r_begin];
          streamed::with_pass_rows(n, [&](auto rows) {
            constexpr int K = decltype(rows)::value;
            const scalar_t* next = v;
            if constexpr (!kDot) {
              next = bitmap_row_avx512<K>(p, v, r, i0, t0, t1);
            } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
              next = bitmap_row_bf16dp<K>(p, v, r, i0, t0, t1);
            }
            if (last_pass) v = next;
          });
        }
      }
    }
  }
  for (int64_t r = r_begin; r < r_end; ++r) {  // each row's bits consumed exactly its row_offsets' values
    if (cursor[r - r_begin] != values + p.row_offsets[r + 1]) flag_bad_row(p, r);
  }
}
SPARSEKIT_INTRINSICS_END
#endif

template <typename scalar_t>
void run_streamed(const BitmapProblem& p, const scalar_t* values, streamed::Path path) {
  const int64_t grain = std::max<int64_t>(1, kWeightsPerTask / std::max<int64_t>(1, p.in_features));
#if SPARSEKIT_HAVE_X86
  if constexpr (!std::is_same_v<scalar_t, c10::Half>) {  // float16 always takes the scalar path
    if (path == streamed::Path::kBf16Dot) {
      at::parallel_for(0, p.out_features, grain, [&](int64_t b, int64_t e) { bitmap_rows_avx512<true>(p, values, b, e); });
      return;
    }
    if (path == streamed::Path::kAvx512) {
      at::parallel_for(0, p.out_features, grain, [&](int64_t b, int64_t e) { bitmap_rows_avx512<false>(p, values, b, e); });
      return;
    }
  }
#endif
  at::parallel_for(0, p.out_features, grain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) bitmap_row_scalar(p, values, r, 0, p.rows);
  });
}

at::Tensor bitmap_linear_cpu(const at::Tensor& x, const at::Tensor& bitmask, const at::Tensor& values,
                             const at::Tensor& row_offsets, int64_t in_features,
                             const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && bitmask.device().is_cpu() && values.device().is_cpu() &&
                  row_offsets.device().is_cpu(),
              "sparsekit::bitmap_linear: the CPU kernel got a tensor off the CPU (x on ", x.device(), ")");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "sparsekit::bitmap_linear: x must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(values.scalar_type() == dt && values.dim() == 1, "sparsekit::bitmap_linear: values must be 1-D ", dt,
              ", got ", values.scalar_type(), " ", values.sizes());
  TORCH_CHECK(in_features >= 0 && x.dim() >= 1 && x.size(-1) == in_features,
              "sparsekit::bitmap_linear: x must have in_features=", in_features, " in its last dim, got shape ",
              x.sizes());
  const int64_t tiles = (in_features + kTile - 1) / kTile;
  TORCH_CHECK(bitmask.scalar_type() == at::kLong && bitmask.dim() == 2 && bitmask.size(1) == tiles,
              "sparsekit::bitmap_linear: bitmask must be int64 (out, ", tiles, "), got ", bitmask.scalar_type(), " ",
              bitmask.sizes());
  const int64_t out_features = bitmask.size(0);
  TORCH_CHECK(row_offsets.scalar_type() == at::kLong && row_offsets.dim() == 1 &&
                  row_offsets.size(0) == out_features + 1,
              "sparsekit::bitmap_linear: row_offsets must be int64 (", out_features + 1, ",), got ",
              row_offsets.scalar_type(), " ", row_offsets.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == dt && bias->dim() == 1 &&
                    bias->size(0) == out_features,
                "sparsekit::bitmap_linear: bias must be (", out_features, ",) ", dt, ", got ", bias->scalar_type(),
                " ", bias->sizes());
  }
  const at::Tensor offsets = row_offsets.contiguous();
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[out_features] == values.numel(), "sparsekit::bitmap_linear: row_offsets must run "
              "from 0 to nnz=", values.numel(), ", got ", off[0], " .. ", off[out_features]);

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  // Leading dims multiplied out, not reshape(-1, in_features): that fails for in_features == 0 (y = bias).
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const at::Tensor xs = x.reshape({rows, in_features});
  const at::Tensor vals = values.contiguous();
  // More rows than the streamed kernel takes: decode + BLAS, which checks every row's bits against row_offsets
  // (and ignores bits past in_features) itself.
  const streamed::Path path = streamed::choose_path(dt, /*vector_kernel=*/true);
  if (rows > streamed::max_rows(path, dt) ||
      panel::takes_rows(dt, rows, out_features, in_features, panel::kPanelMinRowsBitmap,
                        panel::kPanelMinRowsBitmapSmall)) {
    return bitmap_unpack_linear_cpu(x, bitmask.contiguous(), vals, offsets, in_features, bias);
  }
  // The streamed kernels trust row_offsets to match the bits: check what memory safety needs before they run
  // (O(out) plus the rows near the end), and the rest as they go (each row's values consumed exactly; checked
  // after).
  for (int64_t r = 0; r < out_features; ++r) {
    TORCH_CHECK(off[r] <= off[r + 1], "sparsekit::bitmap_linear: row_offsets must not decrease, got ", off[r],
                " then ", off[r + 1], " at row ", r);
  }
  at::Tensor mask = bitmask.contiguous();
  if (in_features % kTile != 0) {
    // Bits past in_features in a row's last tile name no column: the reference ignores them, and the kernels
    // would take one more value each for them (the last row's from past nnz). Packers never set them; such a
    // mask is cleared in a copy (a scan of one word per row, only for widths that are not a multiple of 64).
    const uint64_t keep = (uint64_t(1) << (in_features % kTile)) - 1;
    const auto* words = reinterpret_cast<const uint64_t*>(mask.const_data_ptr<int64_t>());
    bool stray = false;
    for (int64_t r = 0; r < out_features && !stray; ++r) stray = (words[r * tiles + tiles - 1] & ~keep) != 0;
    if (stray) {
      mask = mask.clone();
      mask.select(1, tiles - 1).bitwise_and_(static_cast<int64_t>(keep));
    }
  }
  // A row that takes more values than row_offsets gives it reads past nnz only if it starts within in_features
  // values of the end: check those rows' bits exactly before any kernel reads them.
  const auto* mask_words = reinterpret_cast<const uint64_t*>(mask.const_data_ptr<int64_t>());
  const int64_t nnz = values.numel();
  for (int64_t r = out_features - 1; r >= 0 && off[r] + in_features > nnz; --r) {
    const int64_t count = popcount_words(mask_words + r * tiles, tiles, unpack_isa());
    TORCH_CHECK(count == off[r + 1] - off[r], "sparsekit::bitmap_linear: row ", r, " has ", count,
                " bits set but row_offsets gives it values ", off[r], " .. ", off[r + 1]);
  }

  BitmapProblem p{};
  p.out_features = out_features;
  p.in_features = in_features;
  p.in_padded = tiles * kTile;
  p.tiles = tiles;
  p.rows = rows;
  p.bitmask = reinterpret_cast<const uint64_t*>(mask.const_data_ptr<int64_t>());
  p.row_offsets = off;

  const at::Tensor xf = streamed::padded_x(xs, p.in_padded, path);
  at::Tensor yf = at::empty({rows, out_features}, xs.options().dtype(at::kFloat));
  at::Tensor bf;
  if (bias.has_value()) bf = bias->to(at::kFloat).contiguous();
  if (path == streamed::Path::kBf16Dot) {
    p.x_bf16 = reinterpret_cast<const uint16_t*>(xf.const_data_ptr<c10::BFloat16>());
  } else {
    p.x = xf.const_data_ptr<float>();
  }
  p.bias = bias.has_value() ? bf.const_data_ptr<float>() : nullptr;
  p.y = yf.data_ptr<float>();
  if (rows == 0 || out_features == 0) return yf.to(dt).reshape(out_shape);

  std::atomic<int64_t> bad_row{out_features};
  p.bad_row = &bad_row;
  AT_DISPATCH_SWITCH(dt, "sparsekit_bitmap_linear",
      AT_DISPATCH_CASE(at::kFloat, [&] { run_streamed(p, vals.const_data_ptr<float>(), path); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { run_streamed(p, vals.const_data_ptr<c10::BFloat16>(), path); })
      AT_DISPATCH_CASE(at::kHalf, [&] { run_streamed(p, vals.const_data_ptr<c10::Half>(), path); }));
  const int64_t bad = bad_row.load();
  TORCH_CHECK(bad == out_features, "sparsekit::bitmap_linear: row ", bad, " has a different number of bits set "
              "than the values row_offsets gives it (", off[bad], " .. ", off[bad + 1], ")");
  return yf.to(dt).reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("bitmap_linear", TORCH_FN(bitmap_linear_cpu));
}

}  // namespace sparsekit
