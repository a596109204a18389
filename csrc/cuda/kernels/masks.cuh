// N:M keep-masks: in every group of m consecutive scores, prune the n lowest (sparsekit::nm_mask).
//
// Semantics of sparsekit/ops/reference.py: a stable ascending sort of each group prunes its first n, so an
// element's rank is
//     rank_j = #{k : s_k < s_j} + #{k < j : s_k == s_j}     (NaN largest, NaNs tied; -0.0 == +0.0)
// and it is kept iff rank_j >= n. Ranks are computed on integer order keys (common.cuh), never on floats.
//
// score and keep are flat and contiguous: since cols % m == 0, the groups of a (rows, cols) matrix are just
// consecutive runs of m elements, and rows play no part.
//
// * nm_mask_fixed_kernel<T, M>: M a compile-time group size (2, 4, 8, 16). A thread ranks G whole groups
//   held in registers, G chosen so that its load is 16 bytes when a group is smaller than that (8 bf16
//   scores = two 2:4 groups per thread). Needs a 16-byte-aligned score.
// * nm_mask_generic_kernel<T>: any m, one thread per element, the group re-read from L1.
#pragma once

#include "common.cuh"

namespace sparsekit {
namespace cuda {

// Ranks G consecutive groups of M starting at src and writes their keep bytes to dst.
template <typename T, int M, int G>
__device__ __forceinline__ void nm_mask_groups(const T* src, uint8_t* dst, int n) {
  using Key = typename OrderKey<T>::type;
  T v[G * M];
  load_stream(src, v);
  uint8_t keep[G * M];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    Key key[M];
#pragma unroll
    for (int i = 0; i < M; ++i) key[i] = order_key(v[g * M + i]);
#pragma unroll
    for (int j = 0; j < M; ++j) {
      int rank = 0;
#pragma unroll
      for (int k = 0; k < M; ++k) {
        // k before j in a stable sort: strictly smaller, or tied at a lower index (k == j never counts).
        rank += (key[k] < key[j]) || (k < j && key[k] == key[j]);
      }
      keep[g * M + j] = rank >= n;
    }
  }
  store_stream(dst, keep);
}

template <typename T, int M>
struct NmMaskShape {
  // Groups per thread: fill a 16-byte load when a group is smaller than that.
  static constexpr int kGroupsPerThread = (M * int(sizeof(T))) >= 16 ? 1 : 16 / (M * int(sizeof(T)));
  static constexpr int kThreads = 256;
};

template <typename T, int M>
__global__ void __launch_bounds__(NmMaskShape<T, M>::kThreads)
    nm_mask_fixed_kernel(const T* __restrict__ score, uint8_t* __restrict__ keep, int64_t num_groups, int n) {
  constexpr int G = NmMaskShape<T, M>::kGroupsPerThread;
  const int64_t num_chunks = num_groups / G;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t c = tid; c < num_chunks; c += stride) {
    nm_mask_groups<T, M, G>(score + c * (G * M), keep + c * (G * M), n);
  }
  // The last num_groups % G groups, one per thread.
  const int64_t g = num_chunks * G + tid;
  if (G > 1 && g < num_groups) nm_mask_groups<T, M, 1>(score + g * M, keep + g * M, n);
}

template <typename T>
__global__ void __launch_bounds__(256)
    nm_mask_generic_kernel(const T* __restrict__ score, uint8_t* __restrict__ keep, int64_t numel, int n, int m) {
  using Key = typename OrderKey<T>::type;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < numel; e += stride) {
    const int j = static_cast<int>(e % m);
    const T* group = score + (e - j);
    const Key key = order_key(group[j]);
    int rank = 0;
    for (int k = 0; k < m; ++k) {
      const Key other = order_key(__ldg(group + k));
      rank += (other < key) || (k < j && other == key);
    }
    keep[e] = rank >= n;
  }
}

// Launches the mask of a contiguous score of numel elements (numel % m == 0, 0 <= n < m) into keep (numel
// bytes, 0/1). num_sms sizes the grid-stride grid. Check cudaGetLastError() afterwards.
template <typename T>
void launch_nm_mask(const T* score, uint8_t* keep, int64_t numel, int n, int m, int num_sms, cudaStream_t stream) {
  if (numel == 0) return;
  const int64_t num_groups = numel / m;
  // Enough blocks to fill every SM several times over; the kernels loop over the rest.
  const int64_t max_blocks = int64_t(num_sms) * 8;
  const bool aligned = is_aligned(score, 16) && is_aligned(keep, 16);
  auto fixed = [&](auto m_const) {
    constexpr int M = decltype(m_const)::value;
    constexpr int G = NmMaskShape<T, M>::kGroupsPerThread;
    constexpr int kThreads = NmMaskShape<T, M>::kThreads;
    const int64_t work = ceil_div(num_groups, G);
    const int blocks = static_cast<int>(ceil_div(work, kThreads) < max_blocks ? ceil_div(work, kThreads) : max_blocks);
    nm_mask_fixed_kernel<T, M><<<blocks, kThreads, 0, stream>>>(score, keep, num_groups, n);
  };
  if (aligned && m == 2) {
    fixed(std::integral_constant<int, 2>{});
  } else if (aligned && m == 4) {
    fixed(std::integral_constant<int, 4>{});
  } else if (aligned && m == 8) {
    fixed(std::integral_constant<int, 8>{});
  } else if (aligned && m == 16) {
    fixed(std::integral_constant<int, 16>{});
  } else {
    const int64_t want = ceil_div(numel, 256);
    const int blocks = static_cast<int>(want < max_blocks ? want : max_blocks);
    nm_mask_generic_kernel<T><<<blocks, 256, 0, stream>>>(score, keep, numel, n, m);
  }
}

}  // namespace cuda
}  // namespace sparsekit

#define SPARSEKIT_MASKS_INSTANTIATE(T) \
  template void sparsekit::cuda::launch_nm_mask<T>(const T*, uint8_t*, int64_t, int, int, int, cudaStream_t);
