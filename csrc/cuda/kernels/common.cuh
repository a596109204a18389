// Helpers shared by sparsekit's CUDA kernels: conversions, order keys, 16-byte vector loads and stores.
//
// Pure CUDA (no torch headers), so that .ci/nvcc_check can compile it anywhere nvcc is. Compiles under the
// flags torch's CUDAExtension adds (-D__CUDA_NO_HALF_OPERATORS__, -D__CUDA_NO_HALF_CONVERSIONS__,
// -D__CUDA_NO_BFLOAT16_CONVERSIONS__): every half/bf16 conversion below is an explicit intrinsic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace sparsekit {
namespace cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(double v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Integer key with the order torch.sort gives floats: key(a) < key(b) iff a sorts before b, and equal keys
// are ties (broken by index). Sign-magnitude bits become two's complement, so -0.0 and +0.0 both map to 0;
// every NaN maps to key(+inf) + 1. Keys come from the bits alone, with no float compare or conversion, so
// --use_fast_math's flush-to-zero cannot merge distinct denormals.
__device__ __forceinline__ int32_t order_key(float v) {
  const int32_t bits = __float_as_int(v);
  const int32_t mag = bits & 0x7FFFFFFF;
  constexpr int32_t kInf = 0x7F800000;
  return mag > kInf ? kInf + 1 : (bits < 0 ? -mag : mag);
}
__device__ __forceinline__ int64_t order_key(double v) {
  const int64_t bits = __double_as_longlong(v);
  const int64_t mag = bits & 0x7FFFFFFFFFFFFFFFLL;
  constexpr int64_t kInf = 0x7FF0000000000000LL;
  return mag > kInf ? kInf + 1 : (bits < 0 ? -mag : mag);
}
// 16-bit floats: the same map on their own bits (keys of different formats are never compared).
__device__ __forceinline__ int32_t order_key_16(unsigned short bits, int32_t inf_bits) {
  const int32_t mag = bits & 0x7FFF;
  return mag > inf_bits ? inf_bits + 1 : ((bits & 0x8000) ? -mag : mag);
}
__device__ __forceinline__ int32_t order_key(__half v) { return order_key_16(__half_as_ushort(v), 0x7C00); }
__device__ __forceinline__ int32_t order_key(__nv_bfloat16 v) {
  return order_key_16(__bfloat16_as_ushort(v), 0x7F80);
}

template <typename T>
struct OrderKey {
  using type = int32_t;
};
template <>
struct OrderKey<double> {
  using type = int64_t;
};

// The widest access (at most 16 bytes) that divides kBytes: the chunk size of load_stream / store_stream.
template <int kBytes>
struct Chunk {
  static constexpr int bytes = kBytes % 16 == 0 ? 16 : kBytes % 8 == 0 ? 8 : kBytes % 4 == 0 ? 4 : kBytes % 2 == 0 ? 2 : 1;
};

template <int kBytes>
struct ChunkType;
template <>
struct ChunkType<16> {
  using type = uint4;
};
template <>
struct ChunkType<8> {
  using type = uint2;
};
template <>
struct ChunkType<4> {
  using type = unsigned int;
};
template <>
struct ChunkType<2> {
  using type = unsigned short;
};
template <>
struct ChunkType<1> {
  using type = unsigned char;
};

// Loads N consecutive T from p in chunks of Chunk<N * sizeof(T)>::bytes. p must be aligned to that chunk.
// ld.global.cs (evict-first): every caller reads its input exactly once, so it should not crowd out L2.
template <typename T, int N>
__device__ __forceinline__ void load_stream(const T* p, T (&out)[N]) {
  constexpr int kChunk = Chunk<N * int(sizeof(T))>::bytes;
  using C = typename ChunkType<kChunk>::type;
  const C* src = reinterpret_cast<const C*>(p);
#pragma unroll
  for (int i = 0; i < N * int(sizeof(T)) / kChunk; ++i) {
    const C raw = __ldcs(src + i);
    memcpy(reinterpret_cast<char*>(out) + i * kChunk, &raw, kChunk);
  }
}

// Stores N consecutive T to p in chunks, like load_stream (st.global.cs: written once, read by someone else).
template <typename T, int N>
__device__ __forceinline__ void store_stream(T* p, const T (&in)[N]) {
  constexpr int kChunk = Chunk<N * int(sizeof(T))>::bytes;
  using C = typename ChunkType<kChunk>::type;
  C* dst = reinterpret_cast<C*>(p);
#pragma unroll
  for (int i = 0; i < N * int(sizeof(T)) / kChunk; ++i) {
    C raw;
    memcpy(&raw, reinterpret_cast<const char*>(in) + i * kChunk, kChunk);
    __stcs(dst + i, raw);
  }
}

inline bool is_aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// An integer attribute of a device, queried once per device and cached (an attribute, not
// cudaGetDeviceProperties, which is slow). `fallback` (not cached) if the query fails or gives less than 1.
template <cudaDeviceAttr Attr>
inline int cached_device_attribute(int device, int fallback) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};  // one cache per attribute (per instantiation)
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int value = 0;
  if (cudaDeviceGetAttribute(&value, Attr, device) != cudaSuccess || value < 1) {
    (void)cudaGetLastError();  // leave no error behind for the caller's launch check
    return fallback;
  }
  if (cached) cache[device].store(value, std::memory_order_relaxed);
  return value;
}

// Multiprocessor count of a device. Launchers size their grid-stride grids from it. 1 if the query fails.
inline int multiprocessor_count(int device) {
  return cached_device_attribute<cudaDevAttrMultiProcessorCount>(device, 1);
}

// Compute capability major version of a device; 0 if the query fails.
inline int compute_capability_major(int device) {
  return cached_device_attribute<cudaDevAttrComputeCapabilityMajor>(device, 0);
}

}  // namespace cuda
}  // namespace sparsekit

// .ci/nvcc_check instantiates every template of a header through its SPARSEKIT_<NAME>_INSTANTIATE(T).
#define SPARSEKIT_COMMON_INSTANTIATE(T)                                                                         \
  template __device__ void sparsekit::cuda::load_stream<T, 16 / sizeof(T)>(const T*, T(&)[16 / sizeof(T)]);  \
  template __device__ void sparsekit::cuda::load_stream<T, 1>(const T*, T(&)[1]);                             \
  template __device__ void sparsekit::cuda::store_stream<T, 16 / sizeof(T)>(T*, const T(&)[16 / sizeof(T)]); \
  template __device__ void sparsekit::cuda::store_stream<T, 1>(T*, const T(&)[1]);
