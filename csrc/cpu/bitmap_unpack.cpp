// CPU kernel for sparsekit::bitmap_unpack: the dense (out, in) weight of a bitmap packed one
// (sparsekit/formats/bitmap.py: int64 bitmask (out, T) over 64-column tiles, the non-zeros packed row-major,
// row_offsets (out + 1) into them).
//
// Each row's mask words are its column mask as they stand, so a row is one expand_row (expand_row.h: with
// AVX-512 one masked expand per 16 columns). Row r reads values[row_offsets[r] ...]; every row's count is
// checked against its popcount first, so a row_offsets that disagrees with the bitmask is an error rather
// than a read past the values. Bits past in_features in the last tile are ignored (the reference ignores
// them too). Rows are split over threads with at::parallel_for; float16 and bfloat16 share one path.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/cpu_isa.h"
#include "cpu/expand_row.h"
#include "cpu/unpack.h"
#include "cpu/unpack_linear.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace sparsekit {
namespace {

constexpr int64_t kTile = 64;

struct BitmapUnpack {
  int64_t out_features, in_features, tiles, nnz;
  const uint64_t* bitmask;
  const int64_t* row_offsets;
};

// Dense rows [r_begin, r_end) to dst (row r_begin first).
template <typename Elem>
void bitmap_unpack_rows(const BitmapUnpack& p, const Elem* values, Elem* dst, int64_t r_begin, int64_t r_end,
                        UnpackIsa isa) {
  const uint64_t last = p.in_features % kTile ? (uint64_t(1) << (p.in_features % kTile)) - 1 : ~uint64_t(0);
  std::vector<uint64_t> mask(static_cast<size_t>(p.tiles));
  for (int64_t r = r_begin; r < r_end; ++r) {
    std::copy(p.bitmask + r * p.tiles, p.bitmask + (r + 1) * p.tiles, mask.begin());
    mask[p.tiles - 1] &= last;
    const int64_t count = popcount_words(mask.data(), p.tiles, isa);
    const int64_t* off = p.row_offsets;
    TORCH_CHECK(off[r] >= 0 && off[r + 1] - off[r] == count && off[r + 1] <= p.nnz, "sparsekit::bitmap_unpack: row ",
                r, " has ", count, " bits set but row_offsets gives it values ", off[r], " .. ", off[r + 1],
                " (nnz=", p.nnz, ")");
    expand_row(mask.data(), p.in_features, values + off[r], dst + (r - r_begin) * p.in_features, isa);
  }
}

void bitmap_decode(const BitmapUnpack& p, const at::Tensor& vals, void* dst, int64_t r_begin, int64_t r_end,
                   UnpackIsa isa) {
  if (vals.element_size() == 4) {
    bitmap_unpack_rows(p, static_cast<const uint32_t*>(vals.const_data_ptr()), static_cast<uint32_t*>(dst),
                       r_begin, r_end, isa);
  } else {
    bitmap_unpack_rows(p, static_cast<const uint16_t*>(vals.const_data_ptr()), static_cast<uint16_t*>(dst),
                       r_begin, r_end, isa);
  }
}

// Checks the packed weight (as the op schemas take it). The tensors must outlive the returned description.
BitmapUnpack check_bitmap_packed(const char* op, const at::Tensor& bitmask, const at::Tensor& values,
                                 const at::Tensor& offsets, int64_t in_features) {
  TORCH_CHECK(bitmask.device().is_cpu() && values.device().is_cpu() && offsets.device().is_cpu(), op,
              ": the CPU kernel got bitmask on ", bitmask.device(), ", values on ", values.device(),
              ", row_offsets on ", offsets.device());
  const auto dt = values.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": values must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D (nnz,), got shape ", values.sizes());
  TORCH_CHECK(in_features >= 0, op, ": in_features must be >= 0, got ", in_features);
  BitmapUnpack p{};
  p.in_features = in_features;
  p.tiles = (in_features + kTile - 1) / kTile;
  TORCH_CHECK(bitmask.scalar_type() == at::kLong && bitmask.dim() == 2 && bitmask.size(1) == p.tiles, op,
              ": bitmask must be int64 (out, ", p.tiles, "), got ", bitmask.scalar_type(), " ", bitmask.sizes());
  p.out_features = bitmask.size(0);
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.size(0) == p.out_features + 1,
              op, ": row_offsets must be int64 (", p.out_features + 1, ",), got ", offsets.scalar_type(), " ",
              offsets.sizes());
  TORCH_CHECK(bitmask.is_contiguous() && offsets.is_contiguous(), op, ": internal: pass contiguous tensors");
  p.row_offsets = offsets.const_data_ptr<int64_t>();
  p.nnz = values.numel();
  TORCH_CHECK(p.row_offsets[0] == 0 && p.row_offsets[p.out_features] == p.nnz, op,
              ": row_offsets must run from 0 to nnz=", p.nnz, ", got ", p.row_offsets[0], " .. ",
              p.row_offsets[p.out_features]);
  p.bitmask = reinterpret_cast<const uint64_t*>(bitmask.const_data_ptr<int64_t>());
  return p;
}

}  // namespace

at::Tensor bitmap_unpack_cpu(const at::Tensor& bitmask, const at::Tensor& values, const at::Tensor& row_offsets,
                             int64_t in_features) {
  const at::Tensor mask = bitmask.contiguous();
  const at::Tensor offsets = row_offsets.contiguous();
  const BitmapUnpack p = check_bitmap_packed("sparsekit::bitmap_unpack", mask, values, offsets, in_features);
  const at::Tensor vals = values.contiguous();
  const UnpackIsa isa = unpack_isa();
  return unpack_dense(p.out_features, in_features, values.options(),
                      [&](int64_t r0, int64_t r1, void* dst) { bitmap_decode(p, vals, dst, r0, r1, isa); });
}

at::Tensor bitmap_unpack_linear_cpu(const at::Tensor& x, const at::Tensor& bitmask, const at::Tensor& values,
                                    const at::Tensor& row_offsets, int64_t in_features,
                                    const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "sparsekit::bitmap_unpack_linear";
  const at::Tensor mask = bitmask.contiguous();
  const at::Tensor offsets = row_offsets.contiguous();
  const BitmapUnpack p = check_bitmap_packed(op, mask, values, offsets, in_features);
  check_unpack_linear_input(op, x, values, p.out_features, in_features, bias);
  const at::Tensor vals = values.contiguous();
  const UnpackIsa isa = unpack_isa();
  const auto* value_bytes = static_cast<const char*>(vals.const_data_ptr());
  const int64_t elem = vals.element_size();
  return unpack_linear_blocked(
      x, p.out_features, in_features, bias,
      [&](int64_t r0, int64_t r1, void* dst) { bitmap_decode(p, vals, dst, r0, r1, isa); },
      [&](int64_t r0, int64_t r1) {
        // row_offsets is checked row by row only when decoded: clamp, these addresses are only prefetched
        const int64_t v0 = std::clamp<int64_t>(p.row_offsets[r0], 0, p.nnz);
        const int64_t v1 = std::clamp<int64_t>(p.row_offsets[r1], v0, p.nnz);
        panel::Ranges r;
        r.begin[0] = value_bytes + v0 * elem;
        r.bytes[0] = (v1 - v0) * elem;
        r.begin[1] = reinterpret_cast<const char*>(p.bitmask + r0 * p.tiles);
        r.bytes[1] = (r1 - r0) * p.tiles * 8;
        return r;
      });
}

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("bitmap_unpack", TORCH_FN(bitmap_unpack_cpu));
  m.impl("bitmap_unpack_linear", TORCH_FN(bitmap_unpack_linear_cpu));
}

}  // namespace sparsekit
