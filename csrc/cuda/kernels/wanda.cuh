// Wanda importance (Sun et al. 2023, eq. 1): out_ij = |W_ij| * sqrt(sq_norm_j) in float32
// (sparsekit::wanda_score).
//
// __fsqrt_rn is the correctly rounded square root even under --use_fast_math (which turns sqrtf into an
// approximation), and the product is one float32 rounding (__fmul_rn), so the result is the correctly rounded
// float32 product of |W| and the correctly rounded root. W is converted to float32 first, like the
// reference's .float() (|.| commutes with it).
//
// Layout: threads (kBlockX, kBlockY); a thread owns VEC consecutive columns (16 bytes of W), computes their
// norms once, and walks the rows in a grid-stride loop, kUnroll rows' loads in flight at a time.
#pragma once

#include "common.cuh"

namespace sparsekit {
namespace cuda {

struct WandaShape {
  static constexpr int kBlockX = 32;  // threads along columns: one warp reads 32 * 16 contiguous bytes
  static constexpr int kBlockY = 8;   // threads along rows
  static constexpr int kUnroll = 4;   // rows loaded before the first is used
};

template <typename T, int VEC>
__global__ void __launch_bounds__(WandaShape::kBlockX * WandaShape::kBlockY)
    wanda_score_kernel(const T* __restrict__ weight, const float* __restrict__ sq_norm, float* __restrict__ out,
                       int64_t rows, int64_t cols) {
  constexpr int kUnroll = WandaShape::kUnroll;
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= cols) return;  // VEC > 1 only when VEC divides cols: a thread's columns are all inside
  float norm[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) norm[i] = __fsqrt_rn(__ldg(sq_norm + c0 + i));

  const int64_t row_stride = int64_t(gridDim.y) * blockDim.y;
  for (int64_t r0 = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r0 < rows; r0 += row_stride * kUnroll) {
    T w[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      // Past the end, re-read the last row (cached, never stored): a predicated load made ptxas spill.
      const int64_t r = r0 + u * row_stride;
      load_stream(weight + (r < rows ? r : rows - 1) * cols + c0, w[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t r = r0 + u * row_stride;
      if (r < rows) {
        float score[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) score[i] = __fmul_rn(fabsf(to_float(w[u][i])), norm[i]);
        store_stream(out + r * cols + c0, score);
      }
    }
  }
}

// weight: (rows, cols) contiguous; sq_norm: (cols,) float32; out: (rows, cols) float32 contiguous.
// num_sms sizes the grid. Check cudaGetLastError() afterwards.
template <typename T>
void launch_wanda_score(const T* weight, const float* sq_norm, float* out, int64_t rows, int64_t cols, int num_sms,
                        cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = cols % kVec == 0 && is_aligned(weight, 16) && is_aligned(out, 16);
  const dim3 block(WandaShape::kBlockX, WandaShape::kBlockY);
  const int64_t grid_x = ceil_div(cols, int64_t(WandaShape::kBlockX) * (vec ? kVec : 1));
  // About 8 blocks of 256 threads per SM in all; each thread then loops over rows.
  int64_t grid_y = ceil_div(int64_t(num_sms) * 8, grid_x);
  const int64_t max_y = ceil_div(rows, WandaShape::kBlockY);
  grid_y = grid_y < 1 ? 1 : grid_y > max_y ? max_y : grid_y;
  grid_y = grid_y > 65535 ? 65535 : grid_y;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  if (vec) {
    wanda_score_kernel<T, kVec><<<grid, block, 0, stream>>>(weight, sq_norm, out, rows, cols);
  } else {
    wanda_score_kernel<T, 1><<<grid, block, 0, stream>>>(weight, sq_norm, out, rows, cols);
  }
}

}  // namespace cuda
}  // namespace sparsekit

#define SPARSEKIT_WANDA_INSTANTIATE(T)                                                                       \
  template void sparsekit::cuda::launch_wanda_score<T>(const T*, const float*, float*, int64_t, int64_t, int, \
                                                       cudaStream_t);
