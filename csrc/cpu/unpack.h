// Decoding packed weights to dense on the CPU: sparsekit::nm_unpack / nm_unpack_linear (sparse24_unpack.cpp)
// and sparsekit::bitmap_unpack / bitmap_unpack_linear (bitmap_unpack.cpp). Declared here because
// nm_linear / bitmap_linear call the *_unpack_linear kernels for many rows of x.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace sparsekit {

// Dense (out_features, in_features) weight in values' dtype; arguments as the op schemas in
// sparsekit/ops/__init__.py, checked with TORCH_CHECK.
at::Tensor nm_unpack_cpu(const at::Tensor& values, const at::Tensor& index_codes, int64_t n, int64_t m,
                         int64_t in_features);
at::Tensor bitmap_unpack_cpu(const at::Tensor& bitmask, const at::Tensor& values, const at::Tensor& row_offsets,
                             int64_t in_features);
// F.linear(x, W, bias) on the packed W, decoded block by block into a small buffer (unpack_linear.h).
at::Tensor nm_unpack_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& index_codes,
                                int64_t n, int64_t m, int64_t in_features, const std::optional<at::Tensor>& bias);
at::Tensor bitmap_unpack_linear_cpu(const at::Tensor& x, const at::Tensor& bitmask, const at::Tensor& values,
                                    const at::Tensor& row_offsets, int64_t in_features,
                                    const std::optional<at::Tensor>& bias);

}  // namespace sparsekit
