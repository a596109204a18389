// CPU kernel for sparsekit::nm_linear: y = x @ W^T (+ bias) with W stored N:M packed
// (sparsekit/formats/sparse24.py): values (out, G * K) and uint8 index codes, b = 2 bits per kept value
// for M <= 4 and 4 bits for M <= 16, little-endian within a row.
//
// Decode is memory-bound: each weight row is read once from memory and serves up to kRowsPerPass rows of x
// while it sits in L1. x is widened once to a zero-padded float32 copy (a few KiB to a few MiB; chunked by
// 16 columns for the vector path), outputs accumulate in float32 and are rounded to x's dtype once, bias
// included.
//
// * 2:4 with AVX-512 (checked at run time): 16 kept values cover 8 groups = 32 inputs; their positions
//   (4 bytes of codes -> 16 two-bit fields -> + group base 0,0,4,4,...,28,28) select the matching inputs
//   from two 16-float registers with one vpermt2ps, then one FMA per row of x. No gathers.
// * Every other case (other N:M, float16, no AVX-512, SPARSEKIT_CPU_ISA=scalar): portable scalar loop.
// * More than kMaxRowsStreamed rows of x: the weight is decoded to dense block by block and
//   BLAS runs on each block (nm_unpack_linear_cpu, sparse24_unpack.cpp).
//
// Products with pruned weights are skipped, so an inf/NaN of x at a pruned position does not reach y
// (dense F.linear would give NaN there).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/cpu_isa.h"
#include "cpu/to_float.h"
#include "cpu/unpack.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace sparsekit {
namespace {

constexpr int64_t kRowsPerPass = 8;        // rows of x one pass over a weight row serves (accumulators)
constexpr int64_t kMaxRowsStreamed = 64;   // above: dense decode + BLAS wins
constexpr int64_t kInputPad = 64;          // x copy padded to this many columns (vector loads past the end)
constexpr int64_t kWeightsPerTask = 1 << 15;

struct NMProblem {
  int64_t out_features, in_features, in_padded;
  int64_t m, kept_per_group, kept_per_row, code_width, bits;
  const uint8_t* codes;
  const float* x;     // float32, zero padded: (rows, in_padded), or (in_padded / 16, rows, 16) on the vector path
  const float* bias;  // (out_features,) float32 or nullptr
  float* y;           // (rows, out_features) float32
  int64_t rows;
};

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
      const int64_t col = (j / p.kept_per_group) * p.m + code_at(c, j, p.bits);
      acc[j & 3] += to_float(v[j]) * xr[col];
    }
    p.y[i * p.out_features + r] = (acc[0] + acc[1]) + (acc[2] + acc[3]) + b;
  }
}

#if SPARSEKIT_HAVE_X86
template <typename scalar_t>
SPARSEKIT_AVX512 inline __m512 load16_as_float(const scalar_t* v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_loadu_ps(v);
  } else {  // bfloat16: the float with the same upper 16 bits
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// 2:4, one weight row against kRows rows of x starting at i0.
template <int kRows, typename scalar_t>
SPARSEKIT_AVX512 void sparse24_row_avx512(const NMProblem& p, const scalar_t* values, int64_t r, int64_t i0) {
  const scalar_t* v = values + r * p.kept_per_row;
  const uint8_t* c = p.codes + r * p.code_width;
  const float* x0 = p.x + i0 * 16;  // x chunked: 16 columns of all rows, then the next 16 columns
  const int64_t chunk_stride = p.rows * 16;
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i group_base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i two_bits = _mm512_set1_epi32(3);
  __m512 acc[kRows];
  for (int i = 0; i < kRows; ++i) acc[i] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= p.kept_per_row; j += 16) {
    uint32_t word;
    std::memcpy(&word, c + j / 4, sizeof(word));
    const __m512i pos = _mm512_add_epi32(
        _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(word)), shifts), two_bits),
        group_base);
    const __m512 w = load16_as_float(v + j);
    // kept value j lives in group j / 2, columns 4 * (j / 2) ...: chunks 2j / 16 and the next
    const float* xs = x0 + (j / 8) * chunk_stride;
    for (int i = 0; i < kRows; ++i) {
      const float* xi = xs + 16 * i;
      const __m512 picked = _mm512_permutex2var_ps(_mm512_loadu_ps(xi), pos, _mm512_loadu_ps(xi + chunk_stride));
      acc[i] = _mm512_fmadd_ps(w, picked, acc[i]);
    }
  }
  float tail[kRows] = {};
  for (; j < p.kept_per_row; ++j) {
    const float wj = to_float(v[j]);
    const int64_t col = (j / 2) * 4 + code_at(c, j, 2);
    for (int i = 0; i < kRows; ++i) tail[i] += wj * x0[(col / 16) * chunk_stride + 16 * i + col % 16];
  }
  const float b = p.bias ? p.bias[r] : 0.0f;
  for (int i = 0; i < kRows; ++i) p.y[(i0 + i) * p.out_features + r] = _mm512_reduce_add_ps(acc[i]) + tail[i] + b;
}

template <typename scalar_t>
SPARSEKIT_AVX512 void sparse24_rows_avx512(const NMProblem& p, const scalar_t* values, int64_t r_begin,
                                           int64_t r_end) {
  for (int64_t r = r_begin; r < r_end; ++r) {
    for (int64_t i0 = 0; i0 < p.rows; i0 += kRowsPerPass) {
      switch (std::min(kRowsPerPass, p.rows - i0)) {
        case 1: sparse24_row_avx512<1>(p, values, r, i0); break;
        case 2: sparse24_row_avx512<2>(p, values, r, i0); break;
        case 3: sparse24_row_avx512<3>(p, values, r, i0); break;
        case 4: sparse24_row_avx512<4>(p, values, r, i0); break;
        case 5: sparse24_row_avx512<5>(p, values, r, i0); break;
        case 6: sparse24_row_avx512<6>(p, values, r, i0); break;
        case 7: sparse24_row_avx512<7>(p, values, r, i0); break;
        default: sparse24_row_avx512<8>(p, values, r, i0); break;
      }
    }
  }
}
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
  const at::Tensor xs = x.reshape({-1, in_features});
  const int64_t rows = xs.size(0);
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

  if (rows > kMaxRowsStreamed) return nm_unpack_linear_cpu(x, vals, codes, n, m, in_features, bias);

  const bool fast24 = n == 2 && m == 4 && dt != at::kHalf && use_avx512();
  at::Tensor xf = at::zeros({rows, p.in_padded}, xs.options().dtype(at::kFloat));
  xf.narrow(1, 0, in_features).copy_(xs);
  // The vector path reads x chunked, (in_padded / 16, rows, 16): the rows a weight chunk meets are adjacent
  // in memory instead of in_padded * 4 bytes apart (a multiple of 4 KiB: they would share L1 sets).
  if (fast24) xf = xf.view({rows, p.in_padded / 16, 16}).transpose(0, 1).contiguous();
  at::Tensor yf = at::empty({rows, out_features}, xs.options().dtype(at::kFloat));
  at::Tensor bf;
  if (bias.has_value()) bf = bias->to(at::kFloat).contiguous();
  p.x = xf.const_data_ptr<float>();
  p.bias = bias.has_value() ? bf.const_data_ptr<float>() : nullptr;
  p.y = yf.data_ptr<float>();
  if (rows == 0 || out_features == 0) return yf.to(dt).reshape(out_shape);

  const int64_t grain = std::max<int64_t>(1, kWeightsPerTask / std::max<int64_t>(1, in_features));
  AT_DISPATCH_SWITCH(dt, "sparsekit_nm_linear",
      AT_DISPATCH_CASE(at::kFloat, [&] {
#if SPARSEKIT_HAVE_X86
        if (fast24) {
          at::parallel_for(0, out_features, grain, [&](int64_t b, int64_t e) {
            sparse24_rows_avx512<float>(p, vals.const_data_ptr<float>(), b, e);
          });
          return;
        }
#endif
        at::parallel_for(0, out_features, grain, [&](int64_t b, int64_t e) {
          for (int64_t r = b; r < e; ++r) nm_row_scalar<float>(p, vals.const_data_ptr<float>(), r, 0, rows);
        });
      })
      AT_DISPATCH_CASE(at::kBFloat16, [&] {
        const auto* v = vals.const_data_ptr<c10::BFloat16>();
#if SPARSEKIT_HAVE_X86
        if (fast24) {
          at::parallel_for(0, out_features, grain, [&](int64_t b, int64_t e) { sparse24_rows_avx512(p, v, b, e); });
          return;
        }
#endif
        at::parallel_for(0, out_features, grain, [&](int64_t b, int64_t e) {
          for (int64_t r = b; r < e; ++r) nm_row_scalar(p, v, r, 0, rows);
        });
      })
      AT_DISPATCH_CASE(at::kHalf, [&] {
        const auto* v = vals.const_data_ptr<c10::Half>();
        at::parallel_for(0, out_features, grain, [&](int64_t b, int64_t e) {
          for (int64_t r = b; r < e; ++r) nm_row_scalar(p, v, r, 0, rows);
        });
      }));
  return yf.to(dt).reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("nm_linear", TORCH_FN(nm_linear_cpu));
}

}  // namespace sparsekit
