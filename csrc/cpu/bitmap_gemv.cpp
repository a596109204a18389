// CPU kernel for sparsekit::bitmap_linear: y = x @ W^T (+ bias) with W stored as a bitmap
// (sparsekit/formats/bitmap.py): int64 bitmask (out, T) over 64-column tiles, the non-zeros packed
// row-major, and row_offsets (out + 1) into them.
//
// Decode is memory-bound: each weight row (mask words + its non-zeros) is read once from memory and serves
// up to kRowsPerPass rows of x from L1. x is widened once to a zero-padded float32 copy (so vector loads of
// the last tile stay in bounds; chunked by 16 columns for the vector path), outputs accumulate in float32
// and are rounded to x's dtype once.
//
// * AVX-512 (checked at run time): each 16-bit quarter of a tile mask expands the next popcount(bits)
//   packed values into their 16 lanes (vexpandps, zeros elsewhere), then one FMA
//   per row of x against 16 contiguous inputs. The lanes of pruned weights multiply x by 0.
// * Otherwise (float16, no AVX-512, SPARSEKIT_CPU_ISA=scalar): walk the set bits with ctz; pruned weights are
//   skipped, so an inf/NaN of x at a pruned position does not reach y there.
// * More than kMaxRowsStreamed rows of x: the weight is decoded to dense block by block and
//   BLAS runs on each block (bitmap_unpack_linear_cpu, bitmap_unpack.cpp).

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

constexpr int64_t kTile = 64;
constexpr int64_t kRowsPerPass = 8;
constexpr int64_t kMaxRowsStreamed = 64;
constexpr int64_t kWeightsPerTask = 1 << 15;

struct BitmapProblem {
  int64_t out_features, in_features, in_padded, tiles, rows;
  const uint64_t* bitmask;
  const int64_t* row_offsets;
  const float* x;     // float32, zero padded: (rows, in_padded), or (in_padded / 16, rows, 16) on the vector path
  const float* bias;  // (out_features,) float32 or nullptr
  float* y;           // (rows, out_features) float32
};

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
  }
}

#if SPARSEKIT_HAVE_X86
// The 16 weights of one tile quarter as floats: the next popcount(mask16) packed values spread to the set
// lanes. Advances v. Masked loads never touch memory past the row's last value.
template <typename scalar_t>
SPARSEKIT_AVX512 inline __m512 expand16(const scalar_t*& v, uint32_t mask16) {
  const int count = __builtin_popcount(mask16);
  __m512 w;
  if constexpr (std::is_same_v<scalar_t, float>) {
    w = _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(mask16), v);
  } else {
    // bfloat16: widen the next 16 values first (a bf16 is the top half of its float), then expand 32-bit
    // lanes; vpexpandw on 16-bit lanes measured 2.5x slower on Zen 4.
    const uint32_t first = static_cast<uint32_t>((1ull << count) - 1);
    const __m256i h = _mm256_maskz_loadu_epi16(static_cast<__mmask16>(first), v);
    w = _mm512_maskz_expand_ps(static_cast<__mmask16>(mask16),
                               _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
  v += count;
  return w;
}

template <int kRows, typename scalar_t>
SPARSEKIT_AVX512 void bitmap_row_avx512(const BitmapProblem& p, const scalar_t* values, int64_t r, int64_t i0) {
  const uint64_t* mk = p.bitmask + r * p.tiles;
  const scalar_t* v = values + p.row_offsets[r];
  const float* x0 = p.x + i0 * 16;  // x chunked: 16 columns of all rows, then the next 16 columns
  const int64_t chunk_stride = p.rows * 16;
  __m512 acc[kRows];
  for (int i = 0; i < kRows; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t t = 0; t < p.tiles; ++t) {
    const uint64_t bits = mk[t];
    for (int q = 0; q < 4; ++q) {
      const __m512 w = expand16(v, static_cast<uint32_t>(bits >> (16 * q)) & 0xFFFFu);
      const float* xs = x0 + (4 * t + q) * chunk_stride;
      for (int i = 0; i < kRows; ++i) acc[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xs + 16 * i), acc[i]);
    }
  }
  const float b = p.bias ? p.bias[r] : 0.0f;
  for (int i = 0; i < kRows; ++i) p.y[(i0 + i) * p.out_features + r] = _mm512_reduce_add_ps(acc[i]) + b;
}

template <typename scalar_t>
SPARSEKIT_AVX512 void bitmap_rows_avx512(const BitmapProblem& p, const scalar_t* values, int64_t r_begin,
                                         int64_t r_end) {
  for (int64_t r = r_begin; r < r_end; ++r) {
    for (int64_t i0 = 0; i0 < p.rows; i0 += kRowsPerPass) {
      switch (std::min(kRowsPerPass, p.rows - i0)) {
        case 1: bitmap_row_avx512<1>(p, values, r, i0); break;
        case 2: bitmap_row_avx512<2>(p, values, r, i0); break;
        case 3: bitmap_row_avx512<3>(p, values, r, i0); break;
        case 4: bitmap_row_avx512<4>(p, values, r, i0); break;
        case 5: bitmap_row_avx512<5>(p, values, r, i0); break;
        case 6: bitmap_row_avx512<6>(p, values, r, i0); break;
        case 7: bitmap_row_avx512<7>(p, values, r, i0); break;
        default: bitmap_row_avx512<8>(p, values, r, i0); break;
      }
    }
  }
}
#endif

template <typename scalar_t>
void run_streamed(const BitmapProblem& p, const scalar_t* values, bool fast) {
  const int64_t grain = std::max<int64_t>(1, kWeightsPerTask / std::max<int64_t>(1, p.in_features));
#if SPARSEKIT_HAVE_X86
  if constexpr (!std::is_same_v<scalar_t, c10::Half>) {  // fast is false for float16
    if (fast) {
      at::parallel_for(0, p.out_features, grain, [&](int64_t b, int64_t e) { bitmap_rows_avx512(p, values, b, e); });
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
  const at::Tensor xs = x.reshape({-1, in_features});
  const int64_t rows = xs.size(0);
  const at::Tensor vals = values.contiguous();
  const at::Tensor mask = bitmask.contiguous();

  BitmapProblem p{};
  p.out_features = out_features;
  p.in_features = in_features;
  p.in_padded = tiles * kTile;
  p.tiles = tiles;
  p.rows = rows;
  p.bitmask = reinterpret_cast<const uint64_t*>(mask.const_data_ptr<int64_t>());
  p.row_offsets = off;

  if (rows > kMaxRowsStreamed) return bitmap_unpack_linear_cpu(x, mask, vals, offsets, in_features, bias);

  const bool fast = use_avx512() && dt != at::kHalf;
  at::Tensor xf = at::zeros({rows, p.in_padded}, xs.options().dtype(at::kFloat));
  xf.narrow(1, 0, in_features).copy_(xs);
  // The vector path reads x chunked, (in_padded / 16, rows, 16): the rows a weight chunk meets are adjacent
  // in memory instead of in_padded * 4 bytes apart (a multiple of 4 KiB: they would share L1 sets).
  if (fast) xf = xf.view({rows, p.in_padded / 16, 16}).transpose(0, 1).contiguous();
  at::Tensor yf = at::empty({rows, out_features}, xs.options().dtype(at::kFloat));
  at::Tensor bf;
  if (bias.has_value()) bf = bias->to(at::kFloat).contiguous();
  p.x = xf.const_data_ptr<float>();
  p.bias = bias.has_value() ? bf.const_data_ptr<float>() : nullptr;
  p.y = yf.data_ptr<float>();
  if (rows == 0 || out_features == 0) return yf.to(dt).reshape(out_shape);

  AT_DISPATCH_SWITCH(dt, "sparsekit_bitmap_linear",
      AT_DISPATCH_CASE(at::kFloat, [&] { run_streamed(p, vals.const_data_ptr<float>(), fast); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { run_streamed(p, vals.const_data_ptr<c10::BFloat16>(), fast); })
      AT_DISPATCH_CASE(at::kHalf, [&] { run_streamed(p, vals.const_data_ptr<c10::Half>(), fast); }));
  return yf.to(dt).reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("bitmap_linear", TORCH_FN(bitmap_linear_cpu));
}

}  // namespace sparsekit
