// sparsekit::nm_mask on the CUDA dispatch key (schema: sparsekit/ops/__init__.py; kernels: kernels/masks.cuh).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "cuda/cuda_type.h"
#include "cuda/kernels/masks.cuh"

namespace sparsekit {
namespace {

at::Tensor nm_mask_cuda(const at::Tensor& score, int64_t n, int64_t m) {
  TORCH_CHECK(score.is_cuda(), "nm_mask: score must be a CUDA tensor, got ", score.device());
  TORCH_CHECK(score.dim() == 2, "nm_mask: score must be 2-D (rows, cols), got shape ", score.sizes());
  const auto dtype = score.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "nm_mask: score must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(m >= 1 && m <= std::numeric_limits<int>::max(), "nm_mask: N:M pattern needs M >= 1, got M=", m);
  TORCH_CHECK(0 <= n && n < m, "nm_mask: N:M pattern needs 0 <= N < M, got ", n, ":", m);
  TORCH_CHECK(score.size(1) % m == 0, "nm_mask: N:M pattern ", n, ":", m, ": M=", m, " does not divide the width ",
              score.size(1), " (shape ", score.sizes(), ")");

  const c10::cuda::CUDAGuard guard(score.device());
  const at::Tensor s = score.contiguous();  // groups are then runs of m consecutive elements
  at::Tensor keep = at::empty(s.sizes(), s.options().dtype(at::kBool));
  if (s.numel() == 0) return keep;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(s.get_device()).stream();
  const int num_sms = cuda::multiprocessor_count(s.get_device());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nm_mask_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    cuda::launch_nm_mask<T>(reinterpret_cast<const T*>(s.const_data_ptr<scalar_t>()),
                            reinterpret_cast<uint8_t*>(keep.mutable_data_ptr<bool>()), s.numel(),
                            static_cast<int>(n), static_cast<int>(m), num_sms, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return keep;
}

}  // namespace
}  // namespace sparsekit

TORCH_LIBRARY_IMPL(sparsekit, CUDA, m) { m.impl("nm_mask", TORCH_FN(sparsekit::nm_mask_cuda)); }
