// CPU kernel for sparsekit::nm_linear: y = x @ W^T (+ bias) with W stored N:M packed
// (sparsekit/formats/sparse24.py): values (out, G * K) and uint8 index codes, b = 2 bits per kept value
// for M <= 4 and 4 bits for M <= 16, little-endian within a row.
//
// Decode is memory-bound: the packed weight is read once per pass of up to 8 rows of x, and x stays in L1
// (pass-chunked layout and K blocks with prefetch: streamed.h). x is copied once, zero padded; outputs
// accumulate in float32 and are rounded to x's dtype once, bias included.
//
// * Half-density patterns (K = M / 2 kept per group of M = 2, 4, 8 or 16: 1:2, 2:4, 4:8, 8:16) with AVX-512
//   (checked at run time), float32 and bfloat16: 16 kept values cover 32 inputs; their positions (16 code fields
//   of b bits -> + group base (lane / K) * M) select the matching inputs from two 16-float registers with one
//   vpermt2ps, then one FMA per row of x. No gathers.
// * The same in bfloat16 with AVX512-BF16 + VBMI2: 32 kept values, vpermt2w on bfloat16 inputs and one
//   vdpbf16ps per row of x (nm_row_bf16dp): half the instructions. SPARSEKIT_CPU_ISA=avx512 forces the path above.
// * Every other case (other N:M, float16, no AVX-512, SPARSEKIT_CPU_ISA=scalar): portable scalar loop.
// * More than streamed::max_rows rows of x (2048 for float32 on the AVX-512 lanes, 64 otherwise), or for
//   half-density bfloat16 with AVX512-BF16 from panel::kPanelMinRows24 rows on (kPanelMinRows24Small for weights
//   of at most panel::kSmallWeight elements): nm_unpack_linear_cpu (sparse24_unpack.cpp), the panel path
//   (panel_gemm.h) or block decode + BLAS.
// A code >= M (possible for M = 1, 2, 3, 5..15) is an error, as in the reference and nm_unpack; the streamed loops
// check it on the fly (one OR per step) and raise after the pass.
//
// In the streamed kernels products with pruned weights are skipped, so an inf/NaN of x at a pruned position
// does not reach y (dense F.linear would give NaN there). The decode + GEMM paths (above streamed::max_rows
// rows, and half-density bfloat16 from panel::kPanelMinRows24 rows with AVX512-BF16) multiply by the decoded
// zeros, as F.linear does.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "cpu/cpu_isa.h"
#include "cpu/panel_gemm.h"
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

constexpr int64_t kInputPad = 64;          // x copy padded to this many columns (vector loads past the end)
constexpr int64_t kWeightsPerTask = 1 << 15;

struct NMProblem {
  int64_t out_features, in_features, in_padded;
  int64_t m, kept_per_group, kept_per_row, code_width, bits;
  const uint8_t* codes;
  const float* x;     // float32, zero padded: (rows, in_padded), pass-chunked on the vector path (streamed.h)
  const uint16_t* x_bf16;  // the bfloat16 dot path's x instead: bfloat16, zero padded, pass-chunked
  const float* bias;  // (out_features,) float32 or nullptr
  float* y;           // (rows, out_features) float32
  int64_t rows;
  // Half-density patterns (vector paths): log2 of K and M; code bits that make a field >= M (M = 2, 8), repeated.
  int log2_kept, log2_m;
  uint64_t invalid_bits;
  std::atomic<bool>* bad_code;  // set when a code >= M was read
};

// Whether the vector kernels take this N:M pattern: K = M / 2 with M a power of two up to 16.
inline bool half_density(int64_t n, int64_t m) {
  return n * 2 == m && (m == 2 || m == 4 || m == 8 || m == 16);
}

// The bits of a code field that make it >= M, for a power-of-two M, repeated over 64 bits of b-bit fields.
inline uint64_t invalid_code_bits(int64_t m, int64_t bits) {
  uint64_t field = ((uint64_t(1) << bits) - 1) & ~uint64_t(m - 1);
  uint64_t out = 0;
  for (int64_t s = 0; s < 64; s += bits) out |= field << s;
  return out;
}

inline int code_at(const uint8_t* row_codes, int64_t j, int64_t bits) {
  const int64_t bit = j * bits;
  return (row_codes[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1);
}

// One weight row against rows [i0, i0 + count) of x, portable.
template <typename scalar_t>
void nm_row_scalar(const NMProblem& p, const scalar_t* values, int64_t r, int64_t i0, int64_t count) {
  const scalar_t* v = values + r * p.kept_per_row;
  const uint8_t* c = p.codes + r * p.code_width;
  const float b = p.bias ? p.bias[r] : 0.0f;
  for (int64_t i = i0; i < i0 + count; ++i) {
    const float* xr = p.x + i * p.in_padded;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};  // independent chains: the adds are not one long dependency
    for (int64_t j = 0; j < p.kept_per_row; ++j) {
      const int code = code_at(c, j, p.bits);
      if (code >= p.m) {  // would read another group's input, or past the row
        p.bad_code->store(true, std::memory_order_relaxed);
        return;
      }
      acc[j & 3] += to_float(v[j]) * xr[(j / p.kept_per_group) * p.m + code];
    }
    p.y[i * p.out_features + r] = (acc[0] + acc[1]) + (acc[2] + acc[3]) + b;
  }
}

#if SPARSEKIT_HAVE_X86
SPARSEKIT_INTRINSICS_BEGIN
// Where the row kPrefetchRows ahead (or the last row) keeps its values and codes, as addresses for prefetch.
struct Ahead {
  uintptr_t values, codes;
};
template <typename scalar_t>
inline Ahead rows_ahead(const NMProblem& p, const scalar_t* v, const uint8_t* c, int64_t r) {
  const int64_t rows = std::min(streamed::kPrefetchRows, p.out_features - 1 - r);
  return {reinterpret_cast<uintptr_t>(v) + static_cast<uintptr_t>(rows * p.kept_per_row * sizeof(scalar_t)),
          reinterpret_cast<uintptr_t>(c) + static_cast<uintptr_t>(rows * p.code_width)};
}

template <typename scalar_t>
SPARSEKIT_AVX512 inline __m512 load16_as_float(const scalar_t* v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_loadu_ps(v);
  } else {  // bfloat16: the float with the same upper 16 bits
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// The 16 lanes' group bases for 16 kept values from a multiple of 16 on: (lane / K) * M, relative to column 2j.
SPARSEKIT_AVX512 inline __m512i group_base32(const NMProblem& p) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_sll_epi32(_mm512_srl_epi32(lane, _mm_cvtsi32_si128(p.log2_kept)), _mm_cvtsi32_si128(p.log2_m));
}

// Half-density N:M with b = kBits-bit codes, one weight row against kRows rows of x starting at i0, over kept
// values [j0, j1) (columns [2 * j0, 2 * j1)); j0 is a multiple of 16. The first K block stores into y, later ones
// add to it.
template <int kRows, int kBits, typename scalar_t>
SPARSEKIT_AVX512 void nm_row_avx512(const NMProblem& p, const scalar_t* values, int64_t r, int64_t i0, int64_t j0,
                                    int64_t j1) {
  static_assert(kBits == 2 || kBits == 4, "2- or 4-bit codes");
  const scalar_t* v = values + r * p.kept_per_row;
  const uint8_t* c = p.codes + r * p.code_width;
  const float* x0 = p.x + i0 * p.in_padded;  // this pass's x, chunked (streamed.h)
  constexpr int64_t chunk_stride = kRows * 16;
  // 16 fields: 2-bit ones from one 32-bit word, 4-bit ones from two (lanes 8..15 read the high word)
  const __m512i shifts = kBits == 2 ? _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
                                    : _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  const __m512i base = group_base32(p);
  const __m512i field_mask = _mm512_set1_epi32((1 << kBits) - 1);
  __m512 acc[kRows];
  for (int i = 0; i < kRows; ++i) acc[i] = _mm512_setzero_ps();
  const Ahead ahead = rows_ahead(p, v, c, r);  // the same K block of a later weight row (streamed.h)
  uint64_t bad = 0;
  int64_t j = j0;
  for (; j + 16 <= j1; j += 16) {
    streamed::prefetch(ahead.values, j * static_cast<int64_t>(sizeof(scalar_t)));
    if ((j & (512 / kBits - 1)) == 0 || j == j0) streamed::prefetch(ahead.codes, j * kBits / 8);  // a line per step
    uint64_t word = 0;
    std::memcpy(&word, c + j * kBits / 8, 2 * kBits);
    bad |= word & p.invalid_bits;
    const __m512i words =
        kBits == 2 ? _mm512_set1_epi32(static_cast<int>(word))
                   : _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(static_cast<int>(word)),
                                             _mm512_set1_epi32(static_cast<int>(word >> 32)));
    const __m512i pos = _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(words, shifts), field_mask), base);
    const __m512 w = load16_as_float(v + j);
    // kept value j lives in the 32 columns from 2j: chunks 2j / 16 and the next
    const float* xs = x0 + (j / 8) * chunk_stride;
    for (int i = 0; i < kRows; ++i) {
      const float* xi = xs + 16 * i;
      const __m512 picked = _mm512_permutex2var_ps(_mm512_loadu_ps(xi), pos, _mm512_loadu_ps(xi + chunk_stride));
      acc[i] = _mm512_fmadd_ps(w, picked, acc[i]);
    }
  }
  float tail[kRows] = {};
  for (; j < j1; ++j) {
    const int code = code_at(c, j, kBits);
    bad |= code >= p.m;
    const int64_t col = ((j >> p.log2_kept) << p.log2_m) + (code & (p.m - 1));  // in the row even when bad
    const float wj = to_float(v[j]);
    for (int i = 0; i < kRows; ++i) tail[i] += wj * x0[(col / 16) * chunk_stride + 16 * i + col % 16];
  }
  if (bad) p.bad_code->store(true, std::memory_order_relaxed);
  float sums[kRows];
  for (int i = 0; i < kRows; ++i) sums[i] = _mm512_reduce_add_ps(acc[i]);
  streamed::finish_block<kRows>(p.y + i0 * p.out_features + r, p.out_features, sums, tail, j0 == 0,
                                p.bias ? p.bias[r] : 0.0f);
}

// Half-density N:M in bfloat16 with AVX512-BF16: 32 kept values (one register) cover 64 inputs; their positions
// (32 fields of b bits in 16-bit lanes -> + group base) pick the matching bfloat16 inputs from two 32-input
// registers with one vpermt2w, then one vdpbf16ps per row of x: products are exact in float32 and summed in
// pairs into float32 lanes (inputs and results below 2^-126 are flushed to zero). Half the instructions of the
// float32-lane path per kept value.
template <int kRows, int kBits>
SPARSEKIT_AVX512_BF16 void nm_row_bf16dp(const NMProblem& p, const c10::BFloat16* values, int64_t r, int64_t i0,
                                         int64_t j0, int64_t j1) {
  static_assert(kBits == 2 || kBits == 4, "2- or 4-bit codes");
  const c10::BFloat16* v = values + r * p.kept_per_row;
  const uint8_t* c = p.codes + r * p.code_width;
  const uint16_t* x0 = p.x_bf16 + i0 * p.in_padded;  // this pass's x, chunked by 32 bfloat16 (streamed.h)
  constexpr int64_t chunk_stride = kRows * 32;
  const Ahead ahead = rows_ahead(p, v, c, r);
  // lane j: 16-bit word j / (16 / b) of the step's 4b code bytes, shifted right by b * (j % (16 / b))
  alignas(64) static constexpr uint16_t kLane[32] = {0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15,
                                                     16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31};
  constexpr int kPerWord = 16 / kBits;
  const __m512i lane = _mm512_load_si512(kLane);
  const __m512i word_idx = _mm512_srli_epi16(lane, kBits == 2 ? 3 : 2);
  const __m512i shifts = _mm512_mullo_epi16(_mm512_and_si512(lane, _mm512_set1_epi16(kPerWord - 1)),
                                            _mm512_set1_epi16(kBits));
  const __m512i base =
      _mm512_sll_epi16(_mm512_srl_epi16(lane, _mm_cvtsi32_si128(p.log2_kept)), _mm_cvtsi32_si128(p.log2_m));
  const __m512i field_mask = _mm512_set1_epi16((1 << kBits) - 1);
  __m512 acc[kRows];
  for (int i = 0; i < kRows; ++i) acc[i] = _mm512_setzero_ps();
  uint64_t bad = 0;
  int64_t j = j0;
  for (; j + 32 <= j1; j += 32) {
    streamed::prefetch(ahead.values, j * 2);
    if ((j & (512 / kBits - 1)) == 0 || j == j0) streamed::prefetch(ahead.codes, j * kBits / 8);
    uint64_t lo = 0, hi = 0;
    std::memcpy(&lo, c + j * kBits / 8, 8);
    if constexpr (kBits == 4) std::memcpy(&hi, c + j / 2 + 8, 8);
    bad |= (lo | hi) & p.invalid_bits;
    const __m512i fields = _mm512_permutexvar_epi16(
        word_idx, _mm512_castsi128_si512(_mm_set_epi64x(static_cast<long long>(hi), static_cast<long long>(lo))));
    const __m512i pos = _mm512_add_epi16(_mm512_and_si512(_mm512_srlv_epi16(fields, shifts), field_mask), base);
    const __m512bh w = (__m512bh)_mm512_loadu_si512(v + j);
    const uint16_t* xs = x0 + (j / 16) * chunk_stride;  // kept value j: column 2j.., chunk 2j / 32 and the next
    for (int i = 0; i < kRows; ++i) {
      const uint16_t* xi = xs + 32 * i;
      const __m512i picked =
          _mm512_permutex2var_epi16(_mm512_loadu_si512(xi), pos, _mm512_loadu_si512(xi + chunk_stride));
      acc[i] = _mm512_dpbf16_ps(acc[i], w, (__m512bh)picked);
    }
  }
  float tail[kRows] = {};
  for (; j < j1; ++j) {
    const int code = code_at(c, j, kBits);
    bad |= code >= p.m;
    const int64_t col = ((j >> p.log2_kept) << p.log2_m) + (code & (p.m - 1));  // in the row even when bad
    const float wj = to_float(v[j]);
    for (int i = 0; i < kRows; ++i) {
      const uint32_t bits = static_cast<uint32_t>(x0[(col / 32) * chunk_stride + 32 * i + col % 32]) << 16;
      tail[i] += wj * bits_to_float(bits);
    }
  }
  if (bad) p.bad_code->store(true, std::memory_order_relaxed);
  float sums[kRows];
  for (int i = 0; i < kRows; ++i) sums[i] = _mm512_reduce_add_ps(acc[i]);
  streamed::finish_block<kRows>(p.y + i0 * p.out_features + r, p.out_features, sums, tail, j0 == 0,
                                p.bias ? p.bias[r] : 0.0f);
}

// Rows [r_begin, r_end) of W against every row of x: pass by pass, K block by K block (streamed.h).
template <bool kDot, int kBits, typename scalar_t>
void nm_rows_avx512(const NMProblem& p, const scalar_t* values, int64_t r_begin, int64_t r_end) {
  for (int64_t i0 = 0; i0 < p.rows; i0 += streamed::kRowsPerPass) {
    const int64_t n = std::min(streamed::kRowsPerPass, p.rows - i0);
    const int64_t kc = streamed::k_block_columns(n, 64, kDot ? 2 : 4);  // whole 16- or 32-value steps
    for (int64_t c0 = 0; c0 < std::max<int64_t>(p.in_features, 1); c0 += kc) {  // once when in_features == 0
      const int64_t j0 = c0 / 2, j1 = std::min(p.kept_per_row, (c0 + kc) / 2);
      for (int64_t r = r_begin; r < r_end; ++r) {
        streamed::with_pass_rows(n, [&](auto rows) {
          constexpr int K = decltype(rows)::value;
          if constexpr (!kDot) {
            nm_row_avx512<K, kBits>(p, values, r, i0, j0, j1);
          } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
            nm_row_bf16dp<K, kBits>(p, values, r, i0, j0, j1);
          }
        });
      }
    }
  }
}
SPARSEKIT_INTRINSICS_END
#endif

at::Tensor nm_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& index_codes, int64_t n,
                         int64_t m, int64_t in_features, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu() && index_codes.device().is_cpu(),
              "sparsekit::nm_linear: the CPU kernel got x on ", x.device(), ", values on ", values.device(),
              ", index_codes on ", index_codes.device());
  TORCH_CHECK(1 <= m && m <= 16 && 0 <= n && n < m, "sparsekit::nm_linear: N:M needs 0 <= N < M <= 16, got ", n,
              ":", m);
  TORCH_CHECK(in_features >= 0 && in_features % m == 0, "sparsekit::nm_linear: M=", m,
              " does not divide in_features=", in_features);
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "sparsekit::nm_linear: x must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(values.scalar_type() == dt, "sparsekit::nm_linear: values must have x's dtype ", dt, ", got ",
              values.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "sparsekit::nm_linear: x must have in_features=",
              in_features, " in its last dim, got shape ", x.sizes());
  const int64_t kept_per_group = m - n;
  const int64_t kept_per_row = in_features / m * kept_per_group;
  TORCH_CHECK(values.dim() == 2 && values.size(1) == kept_per_row, "sparsekit::nm_linear: values must be (out, ",
              kept_per_row, "), got ", values.sizes());
  const int64_t out_features = values.size(0);
  const int64_t bits = m <= 4 ? 2 : 4;
  const int64_t code_width = (kept_per_row * bits + 7) / 8;
  TORCH_CHECK(index_codes.scalar_type() == at::kByte && index_codes.dim() == 2 &&
                  index_codes.size(0) == out_features && index_codes.size(1) == code_width,
              "sparsekit::nm_linear: index_codes must be uint8 (", out_features, ", ", code_width, "), got ",
              index_codes.scalar_type(), " ", index_codes.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == dt && bias->dim() == 1 &&
                    bias->size(0) == out_features,
                "sparsekit::nm_linear: bias must be (", out_features, ",) ", dt, ", got ", bias->scalar_type(), " ",
                bias->sizes());
  }

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  // Leading dims multiplied out, not reshape(-1, in_features): that fails for in_features == 0 (y = bias).
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const at::Tensor xs = x.reshape({rows, in_features});
  const at::Tensor vals = values.contiguous();
  const at::Tensor codes = index_codes.contiguous();

  NMProblem p{};
  p.out_features = out_features;
  p.in_features = in_features;
  p.in_padded = (in_features + kInputPad - 1) / kInputPad * kInputPad;
  p.m = m;
  p.kept_per_group = kept_per_group;
  p.kept_per_row = kept_per_row;
  p.code_width = code_width;
  p.bits = bits;
  p.codes = codes.const_data_ptr<uint8_t>();
  p.rows = rows;

  const bool half = half_density(n, m);
  const streamed::Path path = streamed::choose_path(dt, half);
  // Many rows: decode + GEMM (the bfloat16 panel path from kPanelMinRows24 rows on, else decode + BLAS).
  if (rows > streamed::max_rows(path, dt) ||
      (half && panel::takes_rows(dt, rows, out_features, in_features, panel::kPanelMinRows24,
                                 panel::kPanelMinRows24Small))) {
    return nm_unpack_linear_cpu(x, vals, codes, n, m, in_features, bias);
  }

  std::atomic<bool> bad_code{false};
  p.bad_code = &bad_code;
  if (half) {
    p.log2_kept = __builtin_ctzll(static_cast<uint64_t>(kept_per_group));
    p.log2_m = __builtin_ctzll(static_cast<uint64_t>(m));
    p.invalid_bits = invalid_code_bits(m, bits);
  }
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
  // Name the first code >= M (the reference raises on one whatever x is): after the pass when a loop flagged one,
  // and here when no loop runs.
  auto check_codes = [&] {
    for (int64_t r = 0; r < out_features; ++r) {
      for (int64_t j = 0; j < kept_per_row; ++j) {
        const int code = code_at(p.codes + r * code_width, j, bits);
        TORCH_CHECK(code < m, "sparsekit::nm_linear: index code ", code, " >= M=", m, " at row ", r,
                    ", kept value ", j);
      }
    }
  };
  if (rows == 0 || out_features == 0) {
    check_codes();
    return yf.to(dt).reshape(out_shape);
  }

  const int64_t grain = std::max<int64_t>(1, kWeightsPerTask / std::max<int64_t>(1, in_features));
  auto run = [&](auto* v) {
    using scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(v)>>;
#if SPARSEKIT_HAVE_X86
    if constexpr (!std::is_same_v<scalar_t, c10::Half>) {  // float16 always takes the scalar path
      if (path != streamed::Path::kScalar) {
        const bool dot = path == streamed::Path::kBf16Dot;
        at::parallel_for(0, out_features, grain, [&](int64_t b, int64_t e) {
          if (dot) {
            bits == 2 ? nm_rows_avx512<true, 2>(p, v, b, e) : nm_rows_avx512<true, 4>(p, v, b, e);
          } else {
            bits == 2 ? nm_rows_avx512<false, 2>(p, v, b, e) : nm_rows_avx512<false, 4>(p, v, b, e);
          }
        });
        return;
      }
    }
#endif
    at::parallel_for(0, out_features, grain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) nm_row_scalar(p, v, r, 0, rows);
    });
  };
  AT_DISPATCH_SWITCH(dt, "sparsekit_nm_linear",
      AT_DISPATCH_CASE(at::kFloat, [&] { run(vals.const_data_ptr<float>()); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { run(vals.const_data_ptr<c10::BFloat16>()); })
      AT_DISPATCH_CASE(at::kHalf, [&] { run(vals.const_data_ptr<c10::Half>()); }));
  if (bad_code.load()) check_codes();  // a second pass, on the error path only
  return yf.to(dt).reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("nm_linear", TORCH_FN(nm_linear_cpu));
}

}  // namespace sparsekit
