// Per-channel sum of squares: acc_j += sum_t x_tj^2 in float32 (sparsekit::channel_sqnorm_accumulate_),
// the calibration statistic behind Wanda's ||X_j||.
//
// x: (T, C) contiguous float32/fp16/bf16, read exactly once. Threads (kBlockX, kBlockY): a thread owns
// VEC consecutive channels (one 16-byte load: 8 bf16) and walks the rows in a grid-stride loop with
// float32 accumulators, kUnroll independent loads in flight. The block then sums its kBlockY partials per
// channel in shared memory and issues one atomicAdd per channel. The grid is sized to be resident in one
// wave, so every block reads about the same number of rows. Atomic order makes the last bits of acc vary
// from run to run.
#pragma once

#include "common.cuh"

namespace sparsekit {
namespace cuda {

struct ChannelStatsShape {
  static constexpr int kBlockX = 32;       // threads along channels: a warp reads 512 contiguous bytes
  static constexpr int kBlockY = 8;        // threads along rows
  static constexpr int kUnroll = 4;        // 4 x 16 bytes in flight per thread
  static constexpr int kBlocksPerSm = 4;   // 1024 threads per SM, 64 KB of loads in flight per SM
};

template <typename T, int VEC>
__global__ void __launch_bounds__(ChannelStatsShape::kBlockX * ChannelStatsShape::kBlockY,
                                  ChannelStatsShape::kBlocksPerSm)
    channel_sqnorm_kernel(const T* __restrict__ x, float* __restrict__ acc, int64_t tokens, int64_t channels) {
  constexpr int kBlockX = ChannelStatsShape::kBlockX;
  constexpr int kBlockY = ChannelStatsShape::kBlockY;
  constexpr int kUnroll = ChannelStatsShape::kUnroll;
  __shared__ float partial[kBlockY][kBlockX * VEC];

  const int64_t c0 = (int64_t(blockIdx.x) * kBlockX + threadIdx.x) * VEC;
  float sum[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) sum[i] = 0.0f;

  if (c0 < channels) {  // VEC > 1 only when VEC divides channels: a thread's channels are all inside
    const int64_t row_stride = int64_t(gridDim.y) * kBlockY;
    for (int64_t r0 = int64_t(blockIdx.y) * kBlockY + threadIdx.y; r0 < tokens; r0 += row_stride * kUnroll) {
      T v[kUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t r = r0 + u * row_stride;
        if (r < tokens) {
          load_stream(x + r * channels + c0, v[u]);
        } else {
          // Zero bits are +0.0 in every float format: adds nothing.
#pragma unroll
          for (int i = 0; i < VEC; ++i) memset(&v[u][i], 0, sizeof(T));
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float f = to_float(v[u][i]);
          sum[i] = fmaf(f, f, sum[i]);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < VEC; ++i) partial[threadIdx.y][threadIdx.x * VEC + i] = sum[i];
  __syncthreads();
  const int tid = threadIdx.y * kBlockX + threadIdx.x;
  for (int i = tid; i < kBlockX * VEC; i += kBlockX * kBlockY) {
    const int64_t c = int64_t(blockIdx.x) * kBlockX * VEC + i;
    if (c >= channels) break;
    float s = 0.0f;
#pragma unroll
    for (int y = 0; y < kBlockY; ++y) s += partial[y][i];
    atomicAdd(acc + c, s);
  }
}

// x: (tokens, channels) contiguous; acc: (channels,) float32, updated in place. num_sms sizes the grid.
// Check cudaGetLastError() afterwards.
template <typename T>
void launch_channel_sqnorm(const T* x, float* acc, int64_t tokens, int64_t channels, int num_sms,
                           cudaStream_t stream) {
  using S = ChannelStatsShape;
  if (tokens == 0 || channels == 0) return;
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = channels % kVec == 0 && is_aligned(x, 16);
  const dim3 block(S::kBlockX, S::kBlockY);
  const int64_t grid_x = ceil_div(channels, int64_t(S::kBlockX) * (vec ? kVec : 1));
  // One resident wave: kBlocksPerSm blocks per SM in all (fewer blocks, fewer atomics).
  int64_t grid_y = int64_t(num_sms) * S::kBlocksPerSm / grid_x;
  const int64_t max_y = ceil_div(tokens, S::kBlockY);
  grid_y = grid_y < 1 ? 1 : grid_y > max_y ? max_y : grid_y;
  grid_y = grid_y > 65535 ? 65535 : grid_y;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  if (vec) {
    channel_sqnorm_kernel<T, kVec><<<grid, block, 0, stream>>>(x, acc, tokens, channels);
  } else {
    channel_sqnorm_kernel<T, 1><<<grid, block, 0, stream>>>(x, acc, tokens, channels);
  }
}

}  // namespace cuda
}  // namespace sparsekit

#define SPARSEKIT_CHANNEL_STATS_INSTANTIATE(T) \
  template void sparsekit::cuda::launch_channel_sqnorm<T>(const T*, float*, int64_t, int64_t, int, cudaStream_t);
