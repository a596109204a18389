// Shared by the streamed AVX-512 paths of sparsekit::nm_linear (sparse24_gemv.cpp) and bitmap_linear
// (bitmap_gemv.cpp): how x is laid out and how the loops are blocked so that x stays in L1 while the packed
// weight streams from memory once per pass.
//
// * Passes: rows of x are taken kRowsPerPass at a time (one accumulator register per row of x); the weight is
//   read once per pass.
// * x layout (pass_chunked_x): per pass of n rows, a contiguous block (in_padded / w, n, w), w = 16 float32 or
//   32 bfloat16 (64 bytes): w columns of the pass's rows, then the next w columns. A weight chunk's n rows of
//   x are adjacent in memory, and a pass's columns are contiguous (rows in_padded * 4 bytes apart, a multiple
//   of 4 KiB, would share L1 sets).
// * K blocks (k_block_columns): within a pass, x's columns are taken kc at a time so the pass's block of x
//   (n x kc elements) fits in kPanelBytes of L1, and all the task's weight rows go over one block before the
//   next. Each weight row's segment of a block is then a separate stream, which the hardware prefetcher does
//   not follow from row to row (a 4096-column row was 3x slower at M = 1 with 2 KiB segments), so the kernels
//   prefetch the same segment kPrefetchRows rows ahead.
//
// Measured on the development machine (Zen 5, 1 thread, 4096 x 4096 2:4 float32): M = 4 went from 4.9 ms to
// 1.2 ms and M = 8 from 8.8 ms to 2.1 ms (x of 4 rows x 4096 columns, 64 KiB, was re-read from L2 for every
// weight row); M = 1 unchanged.
#pragma once

#include <ATen/ATen.h>

#include "cpu/cpu_isa.h"
#include "cpu/panel_gemm.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace sparsekit {
namespace streamed {

constexpr int64_t kRowsPerPass = 8;        // rows of x per pass over the weight (accumulator registers)
constexpr int64_t kPanelBytes = 32 << 10;  // a pass's K block of x, float32, kept in L1 (48 KiB on Zen 5)
constexpr int64_t kPrefetchRows = 4;       // weight rows ahead that the kernels prefetch
constexpr int64_t kRowBlock = 64;          // bitmap: weight rows that go through every pass before the next ones

// Columns of x per K block for a pass of `rows` rows of `elem_bytes`-byte elements (4: float32, 2: the bfloat16 x
// of the dot paths): a multiple of `align` (at least `align`) with rows * kc * elem_bytes <= kPanelBytes.
// SPARSEKIT_CPU_KC overrides it (tuning only; read once).
inline int64_t k_block_columns(int64_t rows, int64_t align, int64_t elem_bytes) {
  static const int64_t forced = [] {
    const char* s = std::getenv("SPARSEKIT_CPU_KC");
    return s ? std::atoll(s) : int64_t{0};
  }();
  const int64_t kc = forced > 0 ? forced : kPanelBytes / elem_bytes / std::max<int64_t>(1, rows);
  return std::max<int64_t>(align, kc / align * align);
}

// Which loop a kernel call runs: the portable scalar one, the AVX-512 float32-lane one, or the bfloat16 dot one
// (AVX512-BF16 + VBMI2). `vector_kernel`: the kernel has vector loops for this case (2:4, bitmap); float16
// always runs the scalar loop.
enum class Path { kScalar, kAvx512, kBf16Dot };
inline Path choose_path(at::ScalarType dtype, bool vector_kernel) {
  if (!vector_kernel || dtype == at::kHalf || !use_avx512()) return Path::kScalar;
  return dtype == at::kBFloat16 && use_avx512_bf16() ? Path::kBf16Dot : Path::kAvx512;
}

// Most rows of x a packed op (nm_linear, bitmap_linear) runs through its streamed kernels; above, it hands the
// call to decode + GEMM (nm_unpack_linear / bitmap_unpack_linear). The streamed kernels' time grows linearly in M
// (one pass over the packed weight per 8 rows of x, x's block in L1).
// * float32 on the AVX-512 lanes: kMaxRowsFloat32 (24), above which decode + sgemm.h's AVX-512 GEMM wins. Per 32
//   weight columns and row of x, the N:M kernels issue one vpermt2ps (the kept inputs) and one FMA on 16 kept
//   weights, the bitmap kernels two FMAs on expanded values (zeros included): about a dense product's
//   instruction count, at about MKL's AVX2 rate (prefill_cpu_{1t,2t}.md, eighth session: 1.03-2.06x dense
//   F.linear at M = 64..2048, SmolLM2's small layers 0.88-0.94x at M = 512-2048 with 2 threads), while the
//   decoded GEMM reaches ~80% of the FMA peak, about 2x MKL's rate here. Development runs (eleventh session,
//   warm weights, 2:4 and bitmap, Llama-3-8B and SmolLM2 shapes, 1 and 2 threads): the streamed kernels won at
//   M <= 20, ran level at 25-28 on the Llama-3-8B shapes (the GEMM's 8-row tiles pay 32 rows for 25), and lost from
//   32 on (4096x4096, 1 thread, M = 32: 1.54x dense streamed, 1.68x decoded); SmolLM2's layers switched at 16-24.
//   Without the AVX-512 GEMM (SPARSEKIT_CPU_PANEL=0: decode + MKL) the streamed kernels keep kMaxRowsFloat32Blas.
// * Everything else: kMaxRows. bfloat16 dot products do twice the work per instruction, so the streamed kernels'
//   permute or expand per row of x weighs more (0.6-0.8x dense at M = 64 before the panel path took those rows);
//   the scalar loops are far slower than dense.
// SPARSEKIT_CPU_STREAMED_MAX_ROWS=N overrides all of them (benchmarks and tests), read on every call.
constexpr int64_t kMaxRows = 64;
constexpr int64_t kMaxRowsFloat32 = 24;
constexpr int64_t kMaxRowsFloat32Blas = 2048;
inline int64_t max_rows(Path path, at::ScalarType dtype) {
  if (const char* s = std::getenv("SPARSEKIT_CPU_STREAMED_MAX_ROWS")) {
    const long long v = std::atoll(s);
    if (v > 0) return v;
  }
  if (path == Path::kAvx512 && dtype == at::kFloat) {
    return panel::float32_applies() ? kMaxRowsFloat32 : kMaxRowsFloat32Blas;
  }
  return kMaxRows;
}

// x (rows, in_padded), in_padded a multiple of 64 bytes' worth of elements -> the pass-chunked layout above,
// same numel, chunks of 64 bytes (16 floats or 32 bfloat16). Pass p (rows i0 = p * kRowsPerPass ...) starts
// at i0 * in_padded; column c of its row i0 + i sits at (c / w) * (n * w) + i * w + c % w from there, with
// w = the chunk width and n = the pass's row count.
inline at::Tensor pass_chunked_x(const at::Tensor& x) {
  const int64_t rows = x.size(0), in_padded = x.size(1), w = 64 / static_cast<int64_t>(x.element_size());
  at::Tensor out = at::empty_like(x);
  for (int64_t i0 = 0; i0 < rows; i0 += kRowsPerPass) {
    const int64_t n = std::min(kRowsPerPass, rows - i0);
    out.narrow(0, i0, n).view({in_padded / w, n, w}).copy_(x.narrow(0, i0, n).view({n, in_padded / w, w}).transpose(0, 1));
  }
  return out;
}

// f(std::integral_constant<int, n>{}) for a pass of n = 1..kRowsPerPass rows: the row kernels take the row
// count as a template argument (one accumulator register per row).
template <typename F>
inline void with_pass_rows(int64_t n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// X(0) ... X(7): a pass's rows spelled out, for kernels that keep one named accumulator per row (a0 ... a7,
// each guarded by `if constexpr (i < kRows)`). In the bitmap loops gcc 12 kept an array of accumulators in
// memory and stored all of them on every tile; named ones stay in registers (bf16, 1 thread, 4096 x 4096,
// M = 8: 1.68 -> 1.51 ms with one accumulator per row, 2.46 -> 1.44 ms with two).
#define SPARSEKIT_FOR_PASS_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
static_assert(kRowsPerPass == 8, "SPARSEKIT_FOR_PASS_ROWS spells out 8 rows");

#if SPARSEKIT_HAVE_X86
SPARSEKIT_INTRINSICS_BEGIN
// A software prefetch (T0) of base + offset bytes, the address computed as an integer: it may lie past the
// end of the buffer (the rows ahead of the last ones do not exist); a prefetch never faults.
inline void prefetch(uintptr_t base, int64_t offset) {
  _mm_prefetch(reinterpret_cast<const char*>(base + static_cast<uintptr_t>(offset)), _MM_HINT_T0);
}

// The end of one weight row's K block against a pass of kRows rows of x: y[i * stride] gets sums[i] (the lanes
// of row i's accumulator, summed) plus tail[i]; the first K block stores (adding the bias), later ones add to
// what is there.
template <int kRows>
SPARSEKIT_AVX512 inline void finish_block(float* y, int64_t stride, const float (&sums)[kRows], const float* tail,
                                          bool first_block, float bias) {
  for (int i = 0; i < kRows; ++i) {
    const float sum = tail ? sums[i] + tail[i] : sums[i];
    y[i * stride] = first_block ? sum + bias : y[i * stride] + sum;
  }
}
SPARSEKIT_INTRINSICS_END
#endif

// One row of x (the decode case) whose dtype the path reads as it is: the chunked layout of a one-row pass is the
// padded row itself, so one allocation, a copy and a zeroed tail. The general path below costs about 3 us more
// in ATen calls (zeros, copy, the chunking copy), which was a fifth of a 576x576 layer's call at M = 1.
inline bool padded_x_direct(const at::Tensor& x, at::ScalarType target) {
  return x.size(0) == 1 && x.scalar_type() == target && x.is_contiguous();
}

// x (rows, in_features) as the path reads it: zero padded to in_padded columns, float32 (bfloat16 on the dot
// path), pass-chunked on the vector paths, row-major on the scalar one.
inline at::Tensor padded_x(const at::Tensor& x, int64_t in_padded, Path path) {
  const at::ScalarType target = path == Path::kBf16Dot ? at::kBFloat16 : at::kFloat;
  if (padded_x_direct(x, target)) {
    at::Tensor row = at::empty({1, in_padded}, x.options());
    const size_t elem = x.element_size(), in = static_cast<size_t>(x.size(1));
    auto* dst = static_cast<unsigned char*>(row.data_ptr());
    if (in > 0) std::memcpy(dst, x.const_data_ptr(), in * elem);
    std::memset(dst + in * elem, 0, (static_cast<size_t>(in_padded) - in) * elem);
    return row;
  }
  at::Tensor xf = at::zeros({x.size(0), in_padded}, x.options().dtype(target));
  xf.narrow(1, 0, x.size(1)).copy_(x);
  return path == Path::kScalar ? xf : pass_chunked_x(xf);
}

}  // namespace streamed
}  // namespace sparsekit
