// sparsekit::channel_sqnorm_accumulate_ and sparsekit::channel_stats_accumulate_ on the CUDA dispatch key
// (schemas: sparsekit/ops/__init__.py; kernels: kernels/channel_stats.cuh). The accumulators are declared
// Tensor(a!) / Tensor(b!) and updated in place.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/cuda_type.h"
#include "cuda/kernels/channel_stats.cuh"

namespace sparsekit {
namespace {

void channel_sqnorm_accumulate_cuda(const at::Tensor& acc, const at::Tensor& x) {
  TORCH_CHECK(acc.is_cuda(), "channel_sqnorm_accumulate_: acc must be a CUDA tensor, got ", acc.device());
  TORCH_CHECK(acc.dim() == 1 && acc.scalar_type() == at::kFloat,
              "channel_sqnorm_accumulate_: acc must be a 1-D float32 accumulator, got shape ", acc.sizes(), " dtype ",
              acc.scalar_type());
  TORCH_CHECK(acc.is_contiguous(), "channel_sqnorm_accumulate_: acc must be contiguous");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == acc.size(0), "channel_sqnorm_accumulate_: x must have ", acc.size(0),
              " channels in its last dim, got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "channel_sqnorm_accumulate_: x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(x.device() == acc.device(), "channel_sqnorm_accumulate_: acc is on ", acc.device(), " but x is on ",
              x.device());

  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t channels = acc.size(0);
  if (channels == 0 || x.numel() == 0) return;  // before the reshape: (-1, 0) cannot be inferred
  const at::Tensor x2 = x.reshape({-1, channels}).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x2.get_device()).stream();
  const int num_sms = cuda::multiprocessor_count(x2.get_device());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "channel_sqnorm_accumulate_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    cuda::launch_channel_sqnorm<T>(reinterpret_cast<const T*>(x2.const_data_ptr<scalar_t>()),
                                   acc.mutable_data_ptr<float>(), x2.size(0), channels, num_sms, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_accumulator(const char* what, const at::Tensor& acc) {
  TORCH_CHECK(acc.is_cuda(), "channel_stats_accumulate_: ", what, " must be a CUDA tensor, got ", acc.device());
  TORCH_CHECK(acc.dim() == 1 && acc.scalar_type() == at::kFloat, "channel_stats_accumulate_: ", what,
              " must be a 1-D float32 accumulator, got shape ", acc.sizes(), " dtype ", acc.scalar_type());
  TORCH_CHECK(acc.is_contiguous(), "channel_stats_accumulate_: ", what, " must be contiguous");
}

void channel_stats_accumulate_cuda(const at::Tensor& sq_acc, const at::Tensor& abs_acc, const at::Tensor& x) {
  check_accumulator("sq_acc", sq_acc);
  check_accumulator("abs_acc", abs_acc);
  TORCH_CHECK(abs_acc.sizes() == sq_acc.sizes(), "channel_stats_accumulate_: sq_acc and abs_acc must have the same "
              "shape, got ", sq_acc.sizes(), " and ", abs_acc.sizes());
  TORCH_CHECK(abs_acc.device() == sq_acc.device(), "channel_stats_accumulate_: sq_acc is on ", sq_acc.device(),
              " but abs_acc is on ", abs_acc.device());
  // Both contiguous (checked above), so the answer is never TooHard: only disjoint memory passes.
  TORCH_CHECK(at::get_overlap_status(sq_acc, abs_acc) == at::MemOverlapStatus::No,
              "channel_stats_accumulate_: sq_acc and abs_acc overlap in memory: they must be two separate "
              "accumulators");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == sq_acc.size(0), "channel_stats_accumulate_: x must have ",
              sq_acc.size(0), " channels in its last dim, got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "channel_stats_accumulate_: x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(x.device() == sq_acc.device(), "channel_stats_accumulate_: sq_acc is on ", sq_acc.device(),
              " but x is on ", x.device());

  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t channels = sq_acc.size(0);
  if (channels == 0 || x.numel() == 0) return;  // before the reshape: (-1, 0) cannot be inferred
  const at::Tensor x2 = x.reshape({-1, channels}).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x2.get_device()).stream();
  const int num_sms = cuda::multiprocessor_count(x2.get_device());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "channel_stats_accumulate_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    cuda::launch_channel_stats<T>(reinterpret_cast<const T*>(x2.const_data_ptr<scalar_t>()),
                                  sq_acc.mutable_data_ptr<float>(), abs_acc.mutable_data_ptr<float>(), x2.size(0),
                                  channels, num_sms, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace sparsekit

TORCH_LIBRARY_IMPL(sparsekit, CUDA, m) {
  m.impl("channel_sqnorm_accumulate_", TORCH_FN(sparsekit::channel_sqnorm_accumulate_cuda));
  m.impl("channel_stats_accumulate_", TORCH_FN(sparsekit::channel_stats_accumulate_cuda));
}
