// sparsekit::wanda_score on the CUDA dispatch key (schema: sparsekit/ops/__init__.py; kernels:
// kernels/wanda.cuh).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/cuda_type.h"
#include "cuda/kernels/wanda.cuh"

namespace sparsekit {
namespace {

at::Tensor wanda_score_cuda(const at::Tensor& weight, const at::Tensor& sq_norm) {
  TORCH_CHECK(weight.is_cuda(), "wanda_score: weight must be a CUDA tensor, got ", weight.device());
  TORCH_CHECK(weight.dim() == 2, "wanda_score: weight must be 2-D (out, in), got shape ", weight.sizes());
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "wanda_score: weight must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(sq_norm.dim() == 1 && sq_norm.size(0) == weight.size(1), "wanda_score: sq_norm must have shape (",
              weight.size(1), ",) to match weight ", weight.sizes(), ", got ", sq_norm.sizes());
  TORCH_CHECK(sq_norm.scalar_type() == at::kFloat, "wanda_score: sq_norm must be float32 (an accumulator), got ",
              sq_norm.scalar_type());
  TORCH_CHECK(sq_norm.device() == weight.device(), "wanda_score: weight is on ", weight.device(),
              " but sq_norm is on ", sq_norm.device());

  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const at::Tensor q = sq_norm.contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(at::kFloat));
  if (w.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(w.get_device()).stream();
  const int num_sms = cuda::multiprocessor_count(w.get_device());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "wanda_score_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    cuda::launch_wanda_score<T>(reinterpret_cast<const T*>(w.const_data_ptr<scalar_t>()), q.const_data_ptr<float>(),
                                out.mutable_data_ptr<float>(), w.size(0), w.size(1), num_sms, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace sparsekit

TORCH_LIBRARY_IMPL(sparsekit, CUDA, m) { m.impl("wanda_score", TORCH_FN(sparsekit::wanda_score_cuda)); }
