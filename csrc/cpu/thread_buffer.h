// Per-thread scratch buffers of the CPU kernels, kept from call to call so that their pages stay mapped (a fresh
// allocation of a few MiB is page-faulted on every call).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace sparsekit {

// A 64-byte aligned buffer of at least `bytes`, one per calling thread and Tag, that grows to the largest size
// asked for and is kept for the life of the thread.
template <typename Tag>
inline void* thread_buffer(size_t bytes) {
  thread_local std::unique_ptr<unsigned char[]> buffer;
  thread_local size_t capacity = 0;
  if (bytes > capacity) {
    buffer.reset(new unsigned char[bytes + 64]);
    capacity = bytes;
  }
  const auto address = reinterpret_cast<uintptr_t>(buffer.get());
  return buffer.get() + ((64 - address % 64) % 64);
}

// The dense-weight decode buffer of unpack_linear.h's block path and panel_gemm.h's tiles (one per thread that
// runs them: at most kUnpackMaxBlockBytes + 64).
struct DecodeScratchTag;
inline void* unpack_scratch(size_t bytes) { return thread_buffer<DecodeScratchTag>(bytes); }

}  // namespace sparsekit
