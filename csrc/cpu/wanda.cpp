// CPU kernel for sparsekit::wanda_score: the Wanda importance |W_ij| * ||X_j||_2 (Sun et al. 2023, eq. 1).
//
// weight: (out, in) float32/float16/bfloat16/float64; sq_norm: (in,) float32, the per-channel sum of x^2.
// Returns float32 (out, in), computed as the reference `weight.abs().float() * sq_norm.sqrt()` is: the
// weight is rounded to float32 first (exact for fp16/bf16, one rounding for fp64, as .float() does), then
// one float32 multiply by the float32 sqrt. Here that sqrt is correctly rounded (std::sqrt); torch's
// vectorised CPU sqrt is not always (one ulp off for some inputs), so the two can differ by one ulp.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/to_float.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace sparsekit {
namespace {

constexpr int64_t kScoresPerTask = 32768;


at::Tensor wanda_score_cpu(const at::Tensor& weight, const at::Tensor& sq_norm) {
  TORCH_CHECK(weight.device().is_cpu() && sq_norm.device().is_cpu(),
              "sparsekit::wanda_score: the CPU kernel got weight on ", weight.device(), " and sq_norm on ",
              sq_norm.device());
  TORCH_CHECK(weight.dim() == 2, "sparsekit::wanda_score: weight must be 2-D (out, in), got shape ",
              weight.sizes());
  const auto dt = weight.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              "sparsekit::wanda_score: weight must be float32, float16, bfloat16 or float64, got ", dt);
  const int64_t rows = weight.size(0), cols = weight.size(1);
  TORCH_CHECK(sq_norm.dim() == 1 && sq_norm.size(0) == cols, "sparsekit::wanda_score: sq_norm must have shape (",
              cols, ",) to match weight ", weight.sizes(), ", got ", sq_norm.sizes());
  TORCH_CHECK(sq_norm.scalar_type() == at::kFloat,
              "sparsekit::wanda_score: sq_norm must be float32 (an accumulator), got ", sq_norm.scalar_type());

  const at::Tensor w = weight.contiguous();
  const at::Tensor s = sq_norm.contiguous();
  at::Tensor out = at::empty({rows, cols}, w.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;

  // The column norms are shared by every row: take the square roots once.
  std::vector<float> norm(static_cast<size_t>(cols));
  const float* sq = s.const_data_ptr<float>();
  for (int64_t j = 0; j < cols; ++j) norm[j] = std::sqrt(sq[j]);
  const float* nrm = norm.data();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "sparsekit_wanda_score", [&] {
    const scalar_t* src = w.const_data_ptr<scalar_t>();
    float* dst = out.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, kScoresPerTask / cols);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* wr = src + r * cols;
        float* o = dst + r * cols;
        for (int64_t j = 0; j < cols; ++j) o[j] = std::abs(to_float(wr[j])) * nrm[j];
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("wanda_score", TORCH_FN(wanda_score_cpu));
}

}  // namespace sparsekit
