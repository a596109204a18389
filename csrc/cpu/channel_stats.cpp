// CPU kernels for the per-channel calibration statistics:
//   sparsekit::channel_sqnorm_accumulate_(acc, x):            acc[c]    += sum over all rows of float(x[..., c])^2
//   sparsekit::channel_stats_accumulate_(sq_acc, abs_acc, x): sq_acc[c] += the same, abs_acc[c] += sum of |x|,
//                                                             from one read of x.
//
// Accumulators: (C,) float32 contiguous, updated in place. x: (..., C) float32/float16/bfloat16.
//
// The rows are cut into at most one block per thread; each block reads its rows once, in memory order, and
// accumulates into its own partial sums in float64. The partials are added up in block order and each
// channel's total is rounded to float32 once before it is added to the accumulator, as the reference
// `acc.add_(x.float().pow(2).sum(0))` does. Squares and magnitudes of fp16/bf16/fp32 values are exact in
// float64, so the only error is the float64 summation (negligible at calibration sizes) plus two float32
// roundings: never worse than the float32 reference. The block cut depends on the thread count, so results
// can differ in the last bit between thread counts; for a given thread count they are deterministic.
//
// The float64 arithmetic, not memory, bounds these loops: with the baseline x86-64 flags gcc vectorises them
// two doubles at a time. Where the CPU has AVX-512 (cpu_isa.h), the same loop is compiled for it (eight
// doubles per instruction); SPARSEKIT_CPU_ISA=scalar keeps the portable build. Both add the same terms in
// the same order per channel, so they agree to the bit.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/cpu_isa.h"
#include "cpu/to_float.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace sparsekit {
namespace {


// Fewer elements than this per block and the threading costs more than it saves.
constexpr int64_t kMinElementsPerBlock = 65536;

// ps[c] += sum over rows [r_begin, r_end) of float(x[r, c])^2 and, with kAbs, pa[c] += sum of |float(x[r, c])|,
// in float64, rows in memory order. x: contiguous rows of `channels` values.
template <typename scalar_t, bool kAbs>
inline void row_sums(const scalar_t* x, int64_t r_begin, int64_t r_end, int64_t channels, double* __restrict ps,
                     double* __restrict pa) {
  for (int64_t r = r_begin; r < r_end; ++r) {
    const scalar_t* xr = x + r * channels;
    for (int64_t c = 0; c < channels; ++c) {
      const double v = to_float(xr[c]);  // squares of fp16/bf16/fp32 values are exact in float64
      ps[c] += v * v;
      if constexpr (kAbs) pa[c] += std::fabs(v);
    }
  }
}

#if SPARSEKIT_HAVE_X86
// The same loop, compiled for AVX-512 (row_sums is inlined here and vectorised eight doubles wide).
template <typename scalar_t, bool kAbs>
SPARSEKIT_AVX512 void row_sums_avx512(const scalar_t* x, int64_t r_begin, int64_t r_end, int64_t channels,
                                      double* __restrict ps, double* __restrict pa) {
  row_sums<scalar_t, kAbs>(x, r_begin, r_end, channels, ps, pa);
}
#endif

// x: contiguous (rows, channels) data. For each block b (rows [b * ceil(rows / blocks), ...), read once in
// memory order): sq[b * channels + c] = sum of float(x[r, c])^2 and, with kAbs, abs[b * channels + c] = sum
// of |float(x[r, c])|, both in float64.
template <typename scalar_t, bool kAbs>
void sums_by_block(const at::Tensor& x, int64_t blocks, double* sq, double* abs) {
  const int64_t channels = x.size(-1);
  const int64_t rows = x.numel() / channels;
  const scalar_t* src = x.const_data_ptr<scalar_t>();
  const int64_t rows_per_block = (rows + blocks - 1) / blocks;
  [[maybe_unused]] const bool avx512 = use_avx512();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double* ps = sq + b * channels;
      double* pa = kAbs ? abs + b * channels : nullptr;
      const int64_t r_begin = b * rows_per_block;
      const int64_t r_end = std::min(rows, r_begin + rows_per_block);
#if SPARSEKIT_HAVE_X86
      if (avx512) {
        row_sums_avx512<scalar_t, kAbs>(src, r_begin, r_end, channels, ps, pa);
        continue;
      }
#endif
      row_sums<scalar_t, kAbs>(src, r_begin, r_end, channels, ps, pa);
    }
  });
}

// The number of row blocks (one per thread at most, none smaller than kMinElementsPerBlock elements).
int64_t row_blocks(int64_t rows, int64_t channels) {
  return std::max<int64_t>(
      1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), rows,
                            (rows * channels + kMinElementsPerBlock - 1) / kMinElementsPerBlock}));
}

// acc[c] += float32(sum over blocks b of partial[b * channels + c]), the blocks added in order.
void add_partials(const at::Tensor& acc, const std::vector<double>& partial, int64_t blocks) {
  const int64_t channels = acc.size(0);
  float* a = acc.data_ptr<float>();
  for (int64_t c = 0; c < channels; ++c) {
    double total = 0.0;
    for (int64_t b = 0; b < blocks; ++b) total += partial[b * channels + c];
    a[c] += static_cast<float>(total);
  }
}

void check_accumulator(const char* op, const char* what, const at::Tensor& acc) {
  TORCH_CHECK(acc.device().is_cpu(), "sparsekit::", op, ": the CPU kernel got ", what, " on ", acc.device());
  TORCH_CHECK(acc.dim() == 1 && acc.scalar_type() == at::kFloat, "sparsekit::", op, ": ", what,
              " must be a 1-D float32 accumulator, got shape ", acc.sizes(), " dtype ", acc.scalar_type());
  TORCH_CHECK(acc.is_contiguous(), "sparsekit::", op, ": ", what, " must be contiguous");
}

void check_input(const char* op, const at::Tensor& x, int64_t channels) {
  TORCH_CHECK(x.device().is_cpu(), "sparsekit::", op, ": the CPU kernel got x on ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == channels, "sparsekit::", op, ": x must have ", channels,
              " channels in its last dim, got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "sparsekit::", op,
              ": x must be float32, float16 or bfloat16, got ", dt);
}

// float64 inputs are refused by check_input, so only the three accepted dtypes are instantiated.
template <bool kAbs>
void dispatch_sums(const at::Tensor& xc, int64_t blocks, double* sq, double* abs) {
  AT_DISPATCH_SWITCH(xc.scalar_type(), "sparsekit_channel_stats",
      AT_DISPATCH_CASE(at::kFloat, [&] { sums_by_block<scalar_t, kAbs>(xc, blocks, sq, abs); })
      AT_DISPATCH_CASE(at::kHalf, [&] { sums_by_block<scalar_t, kAbs>(xc, blocks, sq, abs); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { sums_by_block<scalar_t, kAbs>(xc, blocks, sq, abs); }));
}

void channel_sqnorm_accumulate_cpu(const at::Tensor& acc, const at::Tensor& x) {
  constexpr const char* kOp = "channel_sqnorm_accumulate_";
  check_accumulator(kOp, "acc", acc);
  const int64_t channels = acc.size(0);
  check_input(kOp, x, channels);

  if (channels == 0 || x.numel() == 0) return;
  const at::Tensor xc = x.contiguous();
  const int64_t blocks = row_blocks(xc.numel() / channels, channels);
  std::vector<double> partial(static_cast<size_t>(blocks * channels), 0.0);
  dispatch_sums<false>(xc, blocks, partial.data(), nullptr);
  add_partials(acc, partial, blocks);
}

void channel_stats_accumulate_cpu(const at::Tensor& sq_acc, const at::Tensor& abs_acc, const at::Tensor& x) {
  constexpr const char* kOp = "channel_stats_accumulate_";
  check_accumulator(kOp, "sq_acc", sq_acc);
  check_accumulator(kOp, "abs_acc", abs_acc);
  TORCH_CHECK(abs_acc.sizes() == sq_acc.sizes(), "sparsekit::", kOp,
              ": sq_acc and abs_acc must have the same shape, got ", sq_acc.sizes(), " and ", abs_acc.sizes());
  // Both contiguous (checked above), so the answer is never TooHard: only disjoint memory passes.
  TORCH_CHECK(at::get_overlap_status(sq_acc, abs_acc) == at::MemOverlapStatus::No, "sparsekit::", kOp,
              ": sq_acc and abs_acc overlap in memory: they must be two separate accumulators");
  const int64_t channels = sq_acc.size(0);
  check_input(kOp, x, channels);

  if (channels == 0 || x.numel() == 0) return;
  const at::Tensor xc = x.contiguous();
  const int64_t blocks = row_blocks(xc.numel() / channels, channels);
  std::vector<double> sq(static_cast<size_t>(blocks * channels), 0.0);
  std::vector<double> abs(static_cast<size_t>(blocks * channels), 0.0);
  dispatch_sums<true>(xc, blocks, sq.data(), abs.data());
  add_partials(sq_acc, sq, blocks);
  add_partials(abs_acc, abs, blocks);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("channel_sqnorm_accumulate_", TORCH_FN(channel_sqnorm_accumulate_cpu));
  m.impl("channel_stats_accumulate_", TORCH_FN(channel_stats_accumulate_cpu));
}

}  // namespace sparsekit
