// F.linear(x, W, bias) for a packed W without materialising W: the shared driver of
// sparsekit::nm_unpack_linear and sparsekit::bitmap_unpack_linear (sparse24_unpack.cpp, bitmap_unpack.cpp).
//
// Decoding the whole weight into a fresh (out, in) tensor and calling at::linear costs far more than the
// decode itself: a fresh allocation of tens of MiB is mmap'ed and page-faulted on every call (a 64 MiB float32
// weight: ~35 ms to fault in against ~7 ms to write warm pages, on the development machine), and the dense
// weight is written to memory and read back. Here the output features are cut into blocks of 4 to 32 MiB of
// dense weight (unpack_block_rows); a thread decodes one block into its own scratch buffer, kept from call to
// call so that its pages stay mapped, and runs one GEMM into that block's columns of y while the block is still
// in cache: for float32 on CPUs with AVX-512 sparsekit's own (sgemm.h: MKL's sgemm runs its AVX2 path on AMD
// CPUs, at about half the rate), otherwise BLAS (at::addmm_out; SPARSEKIT_CPU_PANEL=0 forces it). The bias goes
// in before the one rounding to x's dtype (the addmm input, as at::linear does; sgemm.h adds it in float32 at
// the first K block). The packed weight is read from memory once.
//
// Threads: one at::parallel_for over the blocks, so a call has a single parallel region (a design with a
// parallel decode and a multi-threaded GEMM per block had two per block, and on a busy 2-core machine each
// of them could stall for a scheduler time slice: 1.3 s for a 14336x4096 layer). Each thread decodes and
// multiplies its own blocks; the GEMM inside the region runs on that thread alone (torch's OpenMP does not
// activate nested regions: MKL and oneDNN run sequentially there). With one thread, blocks run in turn.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/accumulate.h>

#include "cpu/panel_gemm.h"
#include "cpu/thread_buffer.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace sparsekit {

// Rows of the dense weight decoded per GEMM: blocks of about as many bytes as x itself, clamped to
// [kUnpackMinBlockBytes, kUnpackMaxBlockBytes], at least one block per thread, the rows split evenly over
// the blocks and rounded up to a multiple of 16 (the GEMM kernels' register-block width). Two costs set the size: each GEMM call has a
// fixed cost (~15 us for a bfloat16 GEMM through oneDNN) and repacks x, which small blocks pay too
// often (Llama-3-8B mlp.down, float32, M = 512: 0.83x dense with 2 MiB blocks, 1.0-1.08x with 8-32 MiB);
// blocks far larger than x leave L3 for no gain. Tuned on the development machine (Zen 5, 1 MiB L2 per core,
// 32 MiB L3) on Llama-3-8B and SmolLM2 shapes at M = 8, 128, 512.
constexpr int64_t kUnpackMinBlockBytes = int64_t(4) << 20;
constexpr int64_t kUnpackMaxBlockBytes = int64_t(32) << 20;

inline int64_t unpack_block_rows(int64_t rows_x, int64_t out_features, int64_t in_features, int64_t elem_size) {
  const int64_t weight_bytes = out_features * in_features * elem_size;
  const int64_t block_bytes =
      std::clamp(rows_x * in_features * elem_size, kUnpackMinBlockBytes, kUnpackMaxBlockBytes);
  const int64_t by_size = (weight_bytes + block_bytes - 1) / block_bytes;
  const int64_t wanted = std::max<int64_t>(by_size, at::get_num_threads());
  const int64_t blocks = std::max<int64_t>(1, std::min(wanted, out_features / 16));
  const int64_t rows = ((out_features + blocks - 1) / blocks + 15) / 16 * 16;
  return std::min(rows, out_features);
}

// x and bias as nm_linear / bitmap_linear take them; values: the packed weight's values (x's dtype).
inline void check_unpack_linear_input(const char* op, const at::Tensor& x, const at::Tensor& values,
                                      int64_t out_features, int64_t in_features,
                                      const std::optional<at::Tensor>& bias) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(x.device().is_cpu(), op, ": the CPU kernel got x on ", x.device());
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(values.scalar_type() == dt, op, ": values must have x's dtype ", dt, ", got ", values.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, op, ": x must have in_features=", in_features,
              " in its last dim, got shape ", x.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == dt && bias->dim() == 1 &&
                    bias->size(0) == out_features,
                op, ": bias must be (", out_features, ",) ", dt, ", got ", bias->scalar_type(), " ", bias->sizes());
  }
}

// The whole dense (out_features, in_features) weight in a fresh tensor of ``options``: rows decoded in
// parallel, about kUnpackWeightsPerTask weights per task (sparsekit::nm_unpack / bitmap_unpack).
// decode_rows(r_begin, r_end, dst): writes dense rows [r_begin, r_end) of W, row-major, to dst.
constexpr int64_t kUnpackWeightsPerTask = int64_t(1) << 15;

template <typename DecodeRows>
at::Tensor unpack_dense(int64_t out_features, int64_t in_features, const at::TensorOptions& options,
                        DecodeRows decode_rows) {
  at::Tensor dense = at::empty({out_features, in_features}, options);
  if (out_features == 0 || in_features == 0) return dense;
  const int64_t row_bytes = in_features * dense.element_size();
  auto* d = static_cast<unsigned char*>(dense.data_ptr());
  at::parallel_for(0, out_features, std::max<int64_t>(1, kUnpackWeightsPerTask / in_features),
                   [&](int64_t b, int64_t e) { decode_rows(b, e, d + b * row_bytes); });
  return dense;
}

// F.linear(x, W, bias) without materialising W (see the top of this file); decode_rows as for unpack_dense.
// ranges_of(r_begin, r_end): where those rows' packed bytes lie (panel::Ranges), for the panel path's prefetch.
template <typename DecodeRows, typename RangesOf>
at::Tensor unpack_linear_blocked(const at::Tensor& x, int64_t out_features, int64_t in_features,
                                 const std::optional<at::Tensor>& bias, DecodeRows decode_rows, RangesOf ranges_of) {
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  const int64_t rows_x = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const at::Tensor x2 = x.reshape({rows_x, in_features}).contiguous();
  at::Tensor y = at::empty({rows_x, out_features}, x.options());
  if (rows_x == 0 || out_features == 0) return y.reshape(out_shape);
  if (in_features == 0) {
    if (bias.has_value()) {
      y.copy_(bias->expand({rows_x, out_features}));
    } else {
      y.zero_();
    }
    return y.reshape(out_shape);
  }
  if (panel::applies(x2.scalar_type(), rows_x, in_features)) {
    panel::linear(x2, y, out_features, in_features, bias, decode_rows, ranges_of);
    return y.reshape(out_shape);
  }
  const int64_t elem = x.element_size();
  // float32 on a CPU with AVX-512: sgemm.h's GEMM on the decoded block instead of MKL's (AVX2 on AMD CPUs)
  const bool own_sgemm = x2.scalar_type() == at::kFloat && panel::float32_applies();
  at::Tensor bias_c;
  if (own_sgemm && bias.has_value()) bias_c = bias->contiguous();
  const int64_t block = unpack_block_rows(rows_x, out_features, in_features, elem);
  const int64_t blocks = (out_features + block - 1) / block;
  // The GEMMs are ATen ops: workers need the caller's thread-local state (inference mode, grad mode).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    void* scratch = unpack_scratch(static_cast<size_t>(block * in_features * elem));
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t r0 = b * block;
      const int64_t count = std::min(block, out_features - r0);
      decode_rows(r0, r0 + count, scratch);
#if SPARSEKIT_HAVE_X86
      if (own_sgemm) {
        sgemm::linear_block(x2.const_data_ptr<float>(), rows_x, in_features, static_cast<const float*>(scratch), count,
                            bias_c.defined() ? bias_c.const_data_ptr<float>() + r0 : nullptr,
                            y.data_ptr<float>() + r0, out_features);
        continue;
      }
#endif
      const at::Tensor w = at::from_blob(scratch, {count, in_features}, x.options());
      at::Tensor y_block = y.narrow(1, r0, count);
      if (bias.has_value()) {
        at::addmm_out(y_block, bias->narrow(0, r0, count), x2, w.t());
      } else {
        at::mm_out(y_block, x2, w.t());
      }
    }
  });
  return y.reshape(out_shape);
}

}  // namespace sparsekit
