// sparsekit::channel_sqnorm_accumulate_ on the CUDA dispatch key (schema: sparsekit/ops/__init__.py;
// kernels: kernels/channel_stats.cuh). acc is declared Tensor(a!) and updated in place.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/cuda_type.h"
#include "cuda/kernels/channel_stats.cuh"

namespace sparsekit {
namespace {

void channel_sqnorm_accumulate_cuda(at::Tensor& acc, const at::Tensor& x) {
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
  const at::Tensor x2 = x.reshape({-1, channels}).contiguous();
  if (x2.numel() == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x2.get_device()).stream();
  const int num_sms = cuda::multiprocessor_count(x2.get_device());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "channel_sqnorm_accumulate_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    cuda::launch_channel_sqnorm<T>(reinterpret_cast<const T*>(x2.const_data_ptr<scalar_t>()),
                                   acc.mutable_data_ptr<float>(), x2.size(0), channels, num_sms, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace sparsekit

TORCH_LIBRARY_IMPL(sparsekit, CUDA, m) {
  m.impl("channel_sqnorm_accumulate_", TORCH_FN(sparsekit::channel_sqnorm_accumulate_cuda));
}
