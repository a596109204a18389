// Per-channel calibration statistics in float32, reading x once:
// * sq_acc_j += sum_t x_tj^2                        (sparsekit::channel_sqnorm_accumulate_: Wanda's ||X_j||)
// * the same plus abs_acc_j += sum_t |x_tj|         (sparsekit::channel_stats_accumulate_: also the mean
//                                                     |activation| of contextual pruning)
//
// x: (T, C) contiguous float32/fp16/bf16, read exactly once. Threads (kBlockX, kBlockY): a thread owns
// VEC consecutive channels (one 16-byte load: 8 bf16) and walks the rows in a grid-stride loop with
// float32 accumulators, kUnroll independent loads in flight. The block then sums its kBlockY partials per
// channel in shared memory and issues one atomicAdd per channel and statistic. The grid is sized to be
// resident in one wave, so every block reads about the same number of rows. Atomic order makes the last
// bits of the accumulators vary from run to run.
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

// kAbs: also accumulate sum |x| into abs_acc (otherwise abs_acc is not touched and may be null).
template <typename T, int VEC, bool kAbs>
__global__ void __launch_bounds__(ChannelStatsShape::kBlockX * ChannelStatsShape::kBlockY,
                                  ChannelStatsShape::kBlocksPerSm)
    channel_stats_kernel(const T* __restrict__ x, float* __restrict__ sq_acc, float* __restrict__ abs_acc,
                         int64_t tokens, int64_t channels) {
  constexpr int kBlockX = ChannelStatsShape::kBlockX;
  constexpr int kBlockY = ChannelStatsShape::kBlockY;
  constexpr int kUnroll = ChannelStatsShape::kUnroll;
  constexpr int kStats = kAbs ? 2 : 1;
  __shared__ float partial[kStats][kBlockY][kBlockX * VEC];

  const int64_t c0 = (int64_t(blockIdx.x) * kBlockX + threadIdx.x) * VEC;
  float sq[VEC];
  float ab[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) sq[i] = ab[i] = 0.0f;

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
          // Zero bits are +0.0 in every float format: adds nothing to either sum.
#pragma unroll
          for (int i = 0; i < VEC; ++i) memset(&v[u][i], 0, sizeof(T));
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float f = to_float(v[u][i]);
          sq[i] = fmaf(f, f, sq[i]);
          if constexpr (kAbs) ab[i] += fabsf(f);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    partial[0][threadIdx.y][threadIdx.x * VEC + i] = sq[i];
    if constexpr (kAbs) partial[kStats - 1][threadIdx.y][threadIdx.x * VEC + i] = ab[i];
  }
  __syncthreads();
  const int tid = threadIdx.y * kBlockX + threadIdx.x;
  for (int i = tid; i < kBlockX * VEC; i += kBlockX * kBlockY) {
    const int64_t c = int64_t(blockIdx.x) * kBlockX * VEC + i;
    if (c >= channels) break;
    float s = 0.0f;
#pragma unroll
    for (int y = 0; y < kBlockY; ++y) s += partial[0][y][i];
    atomicAdd(sq_acc + c, s);
    if constexpr (kAbs) {
      float a = 0.0f;
#pragma unroll
      for (int y = 0; y < kBlockY; ++y) a += partial[kStats - 1][y][i];
      atomicAdd(abs_acc + c, a);
    }
  }
}

template <typename T, bool kAbs>
void launch_channel_stats_kernel(const T* x, float* sq_acc, float* abs_acc, int64_t tokens, int64_t channels,
                                 int num_sms, cudaStream_t stream) {
  using S = ChannelStatsShape;
  if (tokens == 0 || channels == 0) return;
  constexpr int kVec = 16 / sizeof(T);
  // Every row starts 16-byte aligned when the first does and kVec divides the width.
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
    channel_stats_kernel<T, kVec, kAbs><<<grid, block, 0, stream>>>(x, sq_acc, abs_acc, tokens, channels);
  } else {
    channel_stats_kernel<T, 1, kAbs><<<grid, block, 0, stream>>>(x, sq_acc, abs_acc, tokens, channels);
  }
}

// x: (tokens, channels) contiguous; acc: (channels,) float32, acc += sum_t x^2, in place. num_sms sizes the
// grid. Check cudaGetLastError() afterwards.
template <typename T>
void launch_channel_sqnorm(const T* x, float* acc, int64_t tokens, int64_t channels, int num_sms,
                           cudaStream_t stream) {
  launch_channel_stats_kernel<T, false>(x, acc, nullptr, tokens, channels, num_sms, stream);
}

// As launch_channel_sqnorm, and abs_acc += sum_t |x| from the same read; sq_acc and abs_acc must not overlap.
template <typename T>
void launch_channel_stats(const T* x, float* sq_acc, float* abs_acc, int64_t tokens, int64_t channels,
                          int num_sms, cudaStream_t stream) {
  launch_channel_stats_kernel<T, true>(x, sq_acc, abs_acc, tokens, channels, num_sms, stream);
}

}  // namespace cuda
}  // namespace sparsekit

#define SPARSEKIT_CHANNEL_STATS_INSTANTIATE(T)                                                                  \
  template void sparsekit::cuda::launch_channel_sqnorm<T>(const T*, float*, int64_t, int64_t, int, cudaStream_t); \
  template void sparsekit::cuda::launch_channel_stats<T>(const T*, float*, float*, int64_t, int64_t, int,       \
                                                         cudaStream_t);
