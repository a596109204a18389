// CPU kernel for sparsekit::channel_sqnorm_accumulate_: acc[c] += sum over all rows of float(x[..., c])^2.
//
// acc: (C,) float32 contiguous, updated in place. x: (..., C) float32/float16/bfloat16.
//
// The rows are cut into at most one block per thread; each block reads its rows once, in memory order, and
// accumulates into its own partial sums in float64. The partials are added up in block order and each
// channel's total is rounded to float32 once before it is added to acc, as the reference
// `acc.add_(x.float().pow(2).sum(0))` does. Squares of fp16/bf16/fp32 values are exact in float64, so the
// only error is the float64 summation (negligible at calibration sizes) plus two float32 roundings:
// never worse than the float32 reference. The block cut depends on the thread count, so results can
// differ in the last bit between thread counts; for a given thread count they are deterministic.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/to_float.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace sparsekit {
namespace {


// Fewer elements than this per block and the threading costs more than it saves.
constexpr int64_t kMinElementsPerBlock = 65536;

// x: contiguous (rows, channels) data. partial[b * channels + c] = sum over the rows of block b of
// float(x[r, c])^2, in float64. Block b is rows [b * ceil(rows / blocks), ...), read once in memory order.
template <typename scalar_t>
void sum_squares_by_block(const at::Tensor& x, int64_t blocks, double* partial) {
  const int64_t channels = x.size(-1);
  const int64_t rows = x.numel() / channels;
  const scalar_t* src = x.const_data_ptr<scalar_t>();
  const int64_t rows_per_block = (rows + blocks - 1) / blocks;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double* p = partial + b * channels;
      const int64_t r_end = std::min(rows, (b + 1) * rows_per_block);
      for (int64_t r = b * rows_per_block; r < r_end; ++r) {
        const scalar_t* xr = src + r * channels;
        for (int64_t c = 0; c < channels; ++c) {
          const double v = to_float(xr[c]);  // squares of fp16/bf16/fp32 values are exact in float64
          p[c] += v * v;
        }
      }
    }
  });
}

void channel_sqnorm_accumulate_cpu(const at::Tensor& acc, const at::Tensor& x) {
  TORCH_CHECK(acc.device().is_cpu() && x.device().is_cpu(),
              "sparsekit::channel_sqnorm_accumulate_: the CPU kernel got acc on ", acc.device(), " and x on ",
              x.device());
  TORCH_CHECK(acc.dim() == 1 && acc.scalar_type() == at::kFloat,
              "sparsekit::channel_sqnorm_accumulate_: acc must be a 1-D float32 accumulator, got shape ",
              acc.sizes(), " dtype ", acc.scalar_type());
  TORCH_CHECK(acc.is_contiguous(), "sparsekit::channel_sqnorm_accumulate_: acc must be contiguous");
  const int64_t channels = acc.size(0);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == channels, "sparsekit::channel_sqnorm_accumulate_: x must have ",
              channels, " channels in its last dim, got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "sparsekit::channel_sqnorm_accumulate_: x must be float32, float16 or bfloat16, got ", dt);

  if (channels == 0 || x.numel() == 0) return;
  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.numel() / channels;
  const int64_t blocks = std::max<int64_t>(
      1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), rows,
                            (rows * channels + kMinElementsPerBlock - 1) / kMinElementsPerBlock}));
  std::vector<double> partial(static_cast<size_t>(blocks * channels), 0.0);

  // float64 inputs are refused above, so only the three accepted dtypes are instantiated.
  AT_DISPATCH_SWITCH(dt, "sparsekit_channel_sqnorm_accumulate_",
      AT_DISPATCH_CASE(at::kFloat, [&] { sum_squares_by_block<scalar_t>(xc, blocks, partial.data()); })
      AT_DISPATCH_CASE(at::kHalf, [&] { sum_squares_by_block<scalar_t>(xc, blocks, partial.data()); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { sum_squares_by_block<scalar_t>(xc, blocks, partial.data()); }));

  float* a = acc.data_ptr<float>();
  for (int64_t c = 0; c < channels; ++c) {
    double total = 0.0;
    for (int64_t b = 0; b < blocks; ++b) total += partial[b * channels + c];
    a[c] += static_cast<float>(total);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("channel_sqnorm_accumulate_", TORCH_FN(channel_sqnorm_accumulate_cpu));
}

}  // namespace sparsekit
