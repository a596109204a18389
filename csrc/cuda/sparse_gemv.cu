// sparsekit::nm_linear and sparsekit::bitmap_linear on the CUDA dispatch key (schemas: sparsekit/ops/__init__.py;
// kernels and their design: kernels/sparse_gemv.cuh).
//
// * nm_linear: 1..64 rows of x, bf16/fp16, an N:M pattern nm_mma_kernel is built for, in_features % 64 == 0,
//   16-byte aligned tensors and an sm_80+ device: the tensor-core decode kernel (plus a zeroed float32 workspace and a rounding
//   pass when it splits in_features over CTAs). Anything else (float32, other patterns, more rows): decode W
//   to dense, then at::linear (cuBLAS).
// * bitmap_linear: 1..64 rows of x, bf16/fp16/fp32: the CUDA-core kernel; more rows: decode + at::linear.
// * nm_unpack / bitmap_unpack: the decode kernels alone; *_unpack_linear: decode, then at::linear.
// Neither syncs with the host, so both can be captured in a CUDA graph. The bitmap kernels check row_offsets
// against the bitmask's popcounts per row and stop with a device-side assert on a mismatch (raising on the host,
// as the CPU kernel does, would need a sync); no row reads values outside its span.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/accumulate.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cuda/cuda_type.h"

// A bad row_offsets stops the bitmap kernels with torch's device-side assert (kernels/sparse_gemv.cuh).
#if defined(CUDA_KERNEL_ASSERT_MSG)
#define SPARSEKIT_DEVICE_FAIL(msg) CUDA_KERNEL_ASSERT_MSG(false, msg)
#else
#define SPARSEKIT_DEVICE_FAIL(msg) CUDA_KERNEL_ASSERT(false)
#endif
#include "cuda/kernels/sparse_gemv.cuh"

namespace sparsekit {
namespace {

namespace gemv = cuda::gemv;

void check_x_and_bias(const char* op, const at::Tensor& x, int64_t in_features, int64_t out_features,
                      const at::Tensor& weight_values, const std::optional<at::Tensor>& bias) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(in_features >= 0 && x.dim() >= 1 && x.size(-1) == in_features, op, ": x must have in_features=",
              in_features, " in its last dim, got shape ", x.sizes());
  TORCH_CHECK(weight_values.scalar_type() == dt, op, ": values must have x's dtype ", dt, ", got ",
              weight_values.scalar_type());
  TORCH_CHECK(weight_values.device() == x.device(), op, ": x is on ", x.device(), " but the packed weight is on ",
              weight_values.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device() && bias->scalar_type() == dt && bias->dim() == 1 &&
                    bias->size(0) == out_features,
                op, ": bias must be (", out_features, ",) ", dt, " on ", x.device(), ", got ", bias->scalar_type(),
                " ", bias->sizes(), " on ", bias->device());
  }
}

std::vector<int64_t> output_shape(const at::Tensor& x, int64_t out_features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return shape;
}

// The packed N:M weight's geometry, after the checks nm_linear and nm_unpack share.
struct NMGeometry {
  int64_t out_features, kept, kept_per_row, code_width;
};

NMGeometry check_nm_weight(const char* op, const at::Tensor& values, const at::Tensor& index_codes, int64_t n,
                           int64_t m, int64_t in_features) {
  TORCH_CHECK(1 <= m && m <= 16 && 0 <= n && n < m, op, ": N:M needs 0 <= N < M <= 16, got ", n, ":", m);
  TORCH_CHECK(in_features >= 0 && in_features % m == 0, op, ": M=", m, " does not divide in_features=",
              in_features);
  NMGeometry g{};
  g.kept = m - n;
  g.kept_per_row = in_features / m * g.kept;
  TORCH_CHECK(values.dim() == 2 && values.size(1) == g.kept_per_row, op, ": values must be (out, ", g.kept_per_row,
              "), got ", values.sizes());
  g.out_features = values.size(0);
  g.code_width = (g.kept_per_row * (m <= 4 ? 2 : 4) + 7) / 8;
  TORCH_CHECK(index_codes.scalar_type() == at::kByte && index_codes.dim() == 2 &&
                  index_codes.size(0) == g.out_features && index_codes.size(1) == g.code_width,
              op, ": index_codes must be uint8 (", g.out_features, ", ", g.code_width, "), got ",
              index_codes.scalar_type(), " ", index_codes.sizes());
  TORCH_CHECK(index_codes.device() == values.device(), op, ": values are on ", values.device(),
              " but index_codes on ", index_codes.device());
  return g;
}

// The checks bitmap_linear and bitmap_unpack share; returns out_features.
int64_t check_bitmap_weight(const char* op, const at::Tensor& bitmask, const at::Tensor& values,
                            const at::Tensor& row_offsets, int64_t in_features) {
  TORCH_CHECK(in_features >= 0, op, ": in_features must be >= 0, got ", in_features);
  const int64_t tiles = cuda::ceil_div(in_features, gemv::kTile);
  TORCH_CHECK(bitmask.scalar_type() == at::kLong && bitmask.dim() == 2 && bitmask.size(1) == tiles, op,
              ": bitmask must be int64 (out, ", tiles, "), got ", bitmask.scalar_type(), " ", bitmask.sizes());
  const int64_t out_features = bitmask.size(0);
  TORCH_CHECK(row_offsets.scalar_type() == at::kLong && row_offsets.dim() == 1 &&
                  row_offsets.size(0) == out_features + 1,
              op, ": row_offsets must be int64 (", out_features + 1, ",), got ", row_offsets.scalar_type(), " ",
              row_offsets.sizes());
  TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D (nnz,), got shape ", values.sizes());
  TORCH_CHECK(bitmask.device() == values.device() && row_offsets.device() == values.device(), op, ": bitmask (",
              bitmask.device(), "), values (", values.device(), ") and row_offsets (", row_offsets.device(),
              ") must share a device");
  return out_features;
}

// nm_decode_kernel into a zeroed dense (out, in) weight, on values' device (the caller holds its guard). The
// codes are trusted (checking them would need a host sync).
at::Tensor decode_nm_dense(const at::Tensor& values, const at::Tensor& index_codes, const NMGeometry& g, int64_t m,
                           int64_t in_features) {
  at::Tensor dense = at::zeros({g.out_features, in_features}, values.options());
  if (g.out_features == 0 || g.kept_per_row == 0) return dense;
  const at::Tensor vals = values.contiguous();
  const at::Tensor codes = index_codes.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(values.get_device()).stream();
  const int num_sms = cuda::multiprocessor_count(values.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "sparsekit_nm_decode_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    gemv::launch_nm_decode<T>(reinterpret_cast<const T*>(vals.const_data_ptr()), codes.const_data_ptr<uint8_t>(),
                              reinterpret_cast<T*>(dense.mutable_data_ptr()), g.out_features, in_features, m, g.kept,
                              num_sms, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dense;
}

// bitmap_decode_kernel into a zeroed dense (out, in) weight, on values' device (the caller holds its guard).
// Bits past in_features are cleared first: the CPU kernel and the reference ignore them, and the decode kernel
// would otherwise write past the row. row_offsets is checked by the kernel (a device-side assert).
at::Tensor decode_bitmap_dense(const at::Tensor& bitmask, const at::Tensor& values, const at::Tensor& row_offsets,
                               int64_t out_features, int64_t in_features) {
  at::Tensor dense = at::zeros({out_features, in_features}, values.options());
  const int64_t tiles = cuda::ceil_div(in_features, gemv::kTile);
  if (out_features == 0 || tiles == 0) return dense;
  at::Tensor mask = bitmask.contiguous();
  if (in_features % gemv::kTile) {
    mask = mask.clone();
    mask.select(1, tiles - 1).bitwise_and_((int64_t(1) << (in_features % gemv::kTile)) - 1);
  }
  const at::Tensor vals = values.contiguous();
  const at::Tensor offsets = row_offsets.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(values.get_device()).stream();
  const int num_sms = cuda::multiprocessor_count(values.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "sparsekit_bitmap_decode_cuda",
                                  [&] {
    using T = typename CudaType<scalar_t>::type;
    gemv::launch_bitmap_decode<T>(reinterpret_cast<const uint64_t*>(mask.const_data_ptr<int64_t>()),
                                  reinterpret_cast<const T*>(vals.const_data_ptr()),
                                  offsets.const_data_ptr<int64_t>(), reinterpret_cast<T*>(dense.mutable_data_ptr()),
                                  out_features, in_features, vals.numel(), num_sms, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dense;
}

at::Tensor nm_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& index_codes, int64_t n,
                          int64_t m, int64_t in_features, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "sparsekit::nm_linear";
  const NMGeometry g = check_nm_weight(op, values, index_codes, n, m, in_features);
  const int64_t kept = g.kept, kept_per_row = g.kept_per_row, out_features = g.out_features;
  const int64_t code_width = g.code_width;
  check_x_and_bias(op, x, in_features, out_features, values, bias);

  const c10::cuda::CUDAGuard guard(x.device());
  const auto shape = output_shape(x, out_features);
  // Leading dims multiplied out, not reshape(-1, in_features): that fails for in_features == 0.
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  if (rows == 0 || out_features == 0) return at::empty(shape, x.options());
  if (in_features == 0) {  // y = bias (or zeros), as F.linear with an empty weight
    // a fresh tensor: expand(shape).contiguous() of a 1-D bias would be the bias itself (output aliasing input)
    return bias.has_value() ? at::empty(shape, x.options()).copy_(*bias) : at::zeros(shape, x.options());
  }
  const at::Tensor x2 = x.reshape({rows, in_features}).contiguous();
  const at::Tensor vals = values.contiguous();
  const at::Tensor codes = index_codes.contiguous();
  const std::optional<at::Tensor> b =
      bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x2.get_device()).stream();
  const int num_sms = cuda::multiprocessor_count(x2.get_device());

  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparsekit_nm_linear_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    if (gemv::nm_mma_supported<T>(m, kept, rows, in_features, x2.const_data_ptr(), vals.const_data_ptr(),
                                  codes.const_data_ptr(), cuda::compute_capability_major(x2.get_device()))) {
      const gemv::NMPlan plan = gemv::plan_nm_linear(rows, out_features, in_features, num_sms);
      y = at::empty({rows, out_features}, x2.options());
      at::Tensor workspace;
      if (plan.splits > 1) {  // (out_features, rows rounded up to 8): see kernels/sparse_gemv.cuh
        workspace = at::zeros({out_features, int64_t(plan.row_blocks) * 8}, x2.options().dtype(at::kFloat));
      }
      gemv::NMArgs args{};
      args.x = x2.const_data_ptr();
      args.values = vals.const_data_ptr();
      args.codes = codes.const_data_ptr<uint8_t>();
      args.bias = b.has_value() ? b->const_data_ptr() : nullptr;
      args.y = y.mutable_data_ptr();
      args.workspace = workspace.defined() ? workspace.mutable_data_ptr<float>() : nullptr;
      args.rows = rows;
      args.out_features = out_features;
      args.in_features = in_features;
      args.kept_per_row = kept_per_row;
      args.code_width = code_width;
      TORCH_CHECK(gemv::launch_nm_linear<T>(args, m, kept, plan, stream), op,
                  ": internal error: no kernel for a supported pattern ", n, ":", m);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (workspace.defined()) {
        gemv::launch_finalize<T>(workspace.const_data_ptr<float>(), reinterpret_cast<T*>(y.mutable_data_ptr()),
                                 rows, out_features, workspace.size(1), num_sms, stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    } else {
      y = at::linear(x2, decode_nm_dense(vals, codes, g, m, in_features), b);
    }
  });
  return y.reshape(shape);
}

at::Tensor bitmap_linear_cuda(const at::Tensor& x, const at::Tensor& bitmask, const at::Tensor& values,
                              const at::Tensor& row_offsets, int64_t in_features,
                              const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "sparsekit::bitmap_linear";
  const int64_t out_features = check_bitmap_weight(op, bitmask, values, row_offsets, in_features);
  const int64_t tiles = cuda::ceil_div(in_features, gemv::kTile);
  check_x_and_bias(op, x, in_features, out_features, values, bias);

  const c10::cuda::CUDAGuard guard(x.device());
  const auto shape = output_shape(x, out_features);
  // Leading dims multiplied out, not reshape(-1, in_features): that fails for in_features == 0.
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  if (rows == 0 || out_features == 0) return at::empty(shape, x.options());
  if (in_features == 0) {  // y = bias (or zeros), as F.linear with an empty weight
    // a fresh tensor: expand(shape).contiguous() of a 1-D bias would be the bias itself (output aliasing input)
    return bias.has_value() ? at::empty(shape, x.options()).copy_(*bias) : at::zeros(shape, x.options());
  }
  const at::Tensor x2 = x.reshape({rows, in_features}).contiguous();
  const at::Tensor mask = bitmask.contiguous();
  const at::Tensor vals = values.contiguous();
  const at::Tensor offsets = row_offsets.contiguous();
  const std::optional<at::Tensor> b =
      bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x2.get_device()).stream();

  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparsekit_bitmap_linear_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    const auto* mask_bits = reinterpret_cast<const uint64_t*>(mask.const_data_ptr<int64_t>());
    if (rows <= gemv::kMaxRows) {
      y = at::empty({rows, out_features}, x2.options());
      gemv::BitmapArgs args{};
      args.x = x2.const_data_ptr();
      args.bitmask = mask_bits;
      args.values = vals.const_data_ptr();
      args.row_offsets = offsets.const_data_ptr<int64_t>();
      args.bias = b.has_value() ? b->const_data_ptr() : nullptr;
      args.y = y.mutable_data_ptr();
      args.rows = rows;
      args.out_features = out_features;
      args.in_features = in_features;
      args.tiles = tiles;
      args.nnz = vals.numel();
      gemv::launch_bitmap_linear<T>(args, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      y = at::linear(x2, decode_bitmap_dense(mask, vals, offsets, out_features, in_features), b);
    }
  });
  return y.reshape(shape);
}

// sparsekit::nm_unpack: nm_decode_kernel into a zeroed dense weight. The codes are trusted as on nm_linear's
// decode path (checking them would need a host sync): a repeated position leaves one of its values, which one
// unspecified, and a position >= M (possible for M = 3, 5..15) writes into the next group.
at::Tensor nm_unpack_cuda(const at::Tensor& values, const at::Tensor& index_codes, int64_t n, int64_t m,
                          int64_t in_features) {
  constexpr const char* op = "sparsekit::nm_unpack";
  const NMGeometry g = check_nm_weight(op, values, index_codes, n, m, in_features);
  const auto dt = values.scalar_type();
  TORCH_CHECK(values.is_cuda() && (dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf), op,
              ": values must be float32, bfloat16 or float16 on a CUDA device, got ", dt, " on ", values.device());
  const c10::cuda::CUDAGuard guard(values.device());
  return decode_nm_dense(values, index_codes, g, m, in_features);
}

// sparsekit::bitmap_unpack: bitmap_decode_kernel into a zeroed dense weight. row_offsets is checked as on
// bitmap_linear (a device-side assert); bits past in_features are cleared first, as the CPU kernel and the
// reference ignore them.
at::Tensor bitmap_unpack_cuda(const at::Tensor& bitmask, const at::Tensor& values, const at::Tensor& row_offsets,
                              int64_t in_features) {
  constexpr const char* op = "sparsekit::bitmap_unpack";
  const int64_t out_features = check_bitmap_weight(op, bitmask, values, row_offsets, in_features);
  const auto dt = values.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": values must be 1-D float32, bfloat16 or float16, got ", dt, " ", values.sizes());
  TORCH_CHECK(values.is_cuda(), op, ": bitmask, values and row_offsets must share a CUDA device, got ",
              values.device());
  const c10::cuda::CUDAGuard guard(values.device());
  return decode_bitmap_dense(bitmask, values, row_offsets, out_features, in_features);
}

// sparsekit::nm_unpack_linear / bitmap_unpack_linear: the whole dense weight, then cuBLAS. (The CPU kernels
// decode block by block to avoid a fresh host allocation per call; CUDA's caching allocator has no such cost.)
at::Tensor nm_unpack_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& index_codes,
                                 int64_t n, int64_t m, int64_t in_features, const std::optional<at::Tensor>& bias) {
  check_x_and_bias("sparsekit::nm_unpack_linear", x, in_features, values.dim() == 2 ? values.size(0) : 0, values,
                   bias);
  return at::linear(x, nm_unpack_cuda(values, index_codes, n, m, in_features), bias);
}

at::Tensor bitmap_unpack_linear_cuda(const at::Tensor& x, const at::Tensor& bitmask, const at::Tensor& values,
                                     const at::Tensor& row_offsets, int64_t in_features,
                                     const std::optional<at::Tensor>& bias) {
  check_x_and_bias("sparsekit::bitmap_unpack_linear", x, in_features, bitmask.dim() == 2 ? bitmask.size(0) : 0,
                   values, bias);
  return at::linear(x, bitmap_unpack_cuda(bitmask, values, row_offsets, in_features), bias);
}

}  // namespace
}  // namespace sparsekit

TORCH_LIBRARY_IMPL(sparsekit, CUDA, m) {
  m.impl("nm_linear", TORCH_FN(sparsekit::nm_linear_cuda));
  m.impl("bitmap_linear", TORCH_FN(sparsekit::bitmap_linear_cuda));
  m.impl("nm_unpack", TORCH_FN(sparsekit::nm_unpack_cuda));
  m.impl("bitmap_unpack", TORCH_FN(sparsekit::bitmap_unpack_cuda));
  m.impl("nm_unpack_linear", TORCH_FN(sparsekit::nm_unpack_linear_cuda));
  m.impl("bitmap_unpack_linear", TORCH_FN(sparsekit::bitmap_unpack_linear_cuda));
}
