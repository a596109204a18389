// CPU kernel for sparsekit::nm_unpack: the dense (out, in) weight of an N:M packed one
// (sparsekit/formats/sparse24.py: values (out, G * K), uint8 index codes, b = 2 bits per kept value for
// M <= 4 and 4 bits for M <= 16, little-endian within a row), and sparsekit::nm_unpack_linear, which feeds
// the same decode, block by block, to BLAS (unpack_linear.h).
//
// * 2:4 with AVX-512: 32 columns per step. Four code bytes give the step's 32-bit column mask from a
//   256-entry table (one byte = two groups = 8 mask bits); the step's 16 kept values are spread over the
//   32 columns with expands: one vpexpandw with VBMI2 for 16-bit types, else two vpexpandd.
// * Other patterns, or no AVX-512: the row's column bitmask, one bit per kept value, then expand_row
//   (expand_row.h), or its portable loop.
// Both rely on the positions of a group being distinct, as pack_nm makes them (increasing). A row whose mask
// holds fewer bits than kept values (a repeated position) is written value by value instead, in order, so
// the last value at a repeated position wins. A position >= M (possible for M = 3, 5..15) is an error.
// Rows are split over threads with at::parallel_for. Only bits move: float16 and bfloat16 share one path.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/cpu_isa.h"
#include "cpu/expand_row.h"
#include "cpu/unpack.h"
#include "cpu/unpack_linear.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace sparsekit {
namespace {


// 2:4: a code byte holds the 2-bit positions of two groups (4 codes); entry = the 8 columns' mask bits.
constexpr std::array<uint8_t, 256> make_table24() {
  std::array<uint8_t, 256> table{};
  for (int b = 0; b < 256; ++b) {
    const int low = (1 << (b & 3)) | (1 << ((b >> 2) & 3));
    const int high = (1 << ((b >> 4) & 3)) | (1 << ((b >> 6) & 3));
    table[b] = static_cast<uint8_t>(low | (high << 4));
  }
  return table;
}
constexpr std::array<uint8_t, 256> kTable24 = make_table24();

struct NMUnpack {
  int64_t out_features, in_features, words, m, kept_per_group, kept_per_row, code_width, bits;
  const uint8_t* codes;
};

inline int code_at(const uint8_t* row_codes, int64_t j, int64_t bits) {
  const int64_t bit = j * bits;
  return (row_codes[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1);
}

// Step 1: the column mask of row r into mask[0 .. words). Returns its popcount.
int64_t nm_row_mask(const NMUnpack& p, int64_t r, uint64_t* mask, UnpackIsa isa) {
  std::fill(mask, mask + p.words, uint64_t(0));
  const uint8_t* c = p.codes + r * p.code_width;
  if (p.m == 4 && p.kept_per_group == 2) {
    for (int64_t b = 0; b < p.code_width; ++b) mask[b >> 3] |= uint64_t(kTable24[c[b]]) << ((b & 7) * 8);
    // An odd number of groups leaves half of the last byte as padding: a phantom group past in_features.
    if (p.in_features % 64) mask[p.words - 1] &= (uint64_t(1) << (p.in_features % 64)) - 1;
  } else {
    const int64_t groups = p.in_features / p.m;
    for (int64_t g = 0, j = 0; g < groups; ++g) {
      for (int64_t k = 0; k < p.kept_per_group; ++k, ++j) {
        const int pos = code_at(c, j, p.bits);
        TORCH_CHECK(pos < p.m, "sparsekit::nm_unpack: index code ", pos, " >= M=", p.m, " at row ", r,
                    ", kept value ", j);
        const int64_t col = g * p.m + pos;
        mask[col >> 6] |= uint64_t(1) << (col & 63);
      }
    }
  }
  return popcount_words(mask, p.words, isa);
}

#if SPARSEKIT_HAVE_X86
SPARSEKIT_INTRINSICS_BEGIN
// 2:4, 32 columns (8 groups, 16 kept values, 4 code bytes) per step: the column mask from kTable24, then the
// values spread with expands. Columns past the last full step (in_features % 32) are left to the caller.
// Returns false when a group repeats a position (some step's mask has fewer than 16 bits): the row must
// then be redone value by value.
inline uint32_t mask24(const uint8_t* c) {
  return uint32_t(kTable24[c[0]]) | uint32_t(kTable24[c[1]]) << 8 | uint32_t(kTable24[c[2]]) << 16 |
         uint32_t(kTable24[c[3]]) << 24;
}

SPARSEKIT_AVX512 bool unpack_row24_avx512(const uint8_t* c, const uint32_t* v, uint32_t* out, int64_t steps) {
  bool ok = true;
  for (int64_t s = 0; s < steps; ++s, c += 4, v += 16, out += 32) {
    const uint32_t bits = mask24(c);
    ok &= __builtin_popcount(bits) == 16;
    const __m512i h = _mm512_loadu_si512(v);
    _mm512_storeu_si512(out, _mm512_maskz_expand_epi32(static_cast<__mmask16>(bits), h));
    _mm512_storeu_si512(out + 16, _mm512_maskz_expand_epi32(static_cast<__mmask16>(bits >> 16),
                                                            _mm512_shuffle_i64x2(h, h, 0xEE)));
  }
  return ok;
}

SPARSEKIT_AVX512 bool unpack_row24_avx512(const uint8_t* c, const uint16_t* v, uint16_t* out, int64_t steps) {
  bool ok = true;
  for (int64_t s = 0; s < steps; ++s, c += 4, v += 16, out += 32) {
    const uint32_t bits = mask24(c);
    ok &= __builtin_popcount(bits) == 16;
    // 8 values each (128-bit loads, never past the step's 16); lanes 8..15 are unused by the expands
    const __m256i lo8 = _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
    const __m256i hi8 = _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + 8)));
    const __m512i lo = _mm512_cvtepu16_epi32(lo8);
    const __m512i hi = _mm512_cvtepu16_epi32(hi8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                        _mm512_cvtepi32_epi16(_mm512_maskz_expand_epi32(static_cast<__mmask16>(bits), lo)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16),
                        _mm512_cvtepi32_epi16(_mm512_maskz_expand_epi32(static_cast<__mmask16>(bits >> 16), hi)));
  }
  return ok;
}

SPARSEKIT_AVX512_VBMI2 bool unpack_row24_vbmi2(const uint8_t* c, const uint16_t* v, uint16_t* out, int64_t steps) {
  bool ok = true;
  for (int64_t s = 0; s < steps; ++s, c += 4, v += 16, out += 32) {
    const uint32_t bits = mask24(c);
    ok &= __builtin_popcount(bits) == 16;
    const __m512i h = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
    _mm512_storeu_si512(out, _mm512_maskz_expand_epi16(static_cast<__mmask32>(bits), h));
  }
  return ok;
}
SPARSEKIT_INTRINSICS_END
#endif

// 2:4 vector path for a whole row; false when the row must be redone value by value.
template <typename Elem>
bool unpack_row24(const NMUnpack& p, const uint8_t* c, const Elem* v, Elem* out, UnpackIsa isa) {
#if SPARSEKIT_HAVE_X86
  const int64_t steps = p.in_features / 32;
  bool ok;
  if constexpr (std::is_same_v<Elem, uint16_t>) {
    ok = isa == UnpackIsa::kAvx512Vbmi2 ? unpack_row24_vbmi2(c, v, out, steps) : unpack_row24_avx512(c, v, out, steps);
  } else {
    ok = unpack_row24_avx512(c, v, out, steps);
  }
  // the last in_features % 32 columns (0 to 7 groups), value by value
  const int64_t done = steps * 32;
  std::memset(out + done, 0, static_cast<size_t>(p.in_features - done) * sizeof(Elem));
  for (int64_t j = done / 2; j < p.kept_per_row; ++j) out[(j / 2) * 4 + code_at(c, j, 2)] = v[j];
  return ok;
#else
  (void)p, (void)c, (void)v, (void)out, (void)isa;
  return false;
#endif
}

// Dense rows [r_begin, r_end) to dst (row r_begin first).
template <typename Elem>
void nm_unpack_rows(const NMUnpack& p, const Elem* values, Elem* dst, int64_t r_begin, int64_t r_end,
                    UnpackIsa isa) {
  const bool fast24 = isa != UnpackIsa::kScalar && p.m == 4 && p.kept_per_group == 2;
  std::vector<uint64_t> mask(fast24 ? 0 : static_cast<size_t>(std::max<int64_t>(1, p.words)));
  for (int64_t r = r_begin; r < r_end; ++r) {
    const Elem* v = values + r * p.kept_per_row;
    const uint8_t* c = p.codes + r * p.code_width;
    Elem* d = dst + (r - r_begin) * p.in_features;
    if (fast24 ? unpack_row24(p, c, v, d, isa) : nm_row_mask(p, r, mask.data(), isa) == p.kept_per_row) {
      if (!fast24) expand_row(mask.data(), p.in_features, v, d, isa);
      continue;
    }
    // a repeated position: write value by value, the last one wins (as a sequential scatter would)
    std::memset(d, 0, static_cast<size_t>(p.in_features) * sizeof(Elem));
    for (int64_t j = 0; j < p.kept_per_row; ++j) d[(j / p.kept_per_group) * p.m + code_at(c, j, p.bits)] = v[j];
  }
}

// Checks the packed weight (as the op schemas take it) and describes it.
NMUnpack check_nm_packed(const char* op, const at::Tensor& values, const at::Tensor& index_codes, int64_t n,
                         int64_t m, int64_t in_features) {
  TORCH_CHECK(values.device().is_cpu() && index_codes.device().is_cpu(), op, ": the CPU kernel got values on ",
              values.device(), ", index_codes on ", index_codes.device());
  TORCH_CHECK(1 <= m && m <= 16 && 0 <= n && n < m, op, ": N:M needs 0 <= N < M <= 16, got ", n, ":", m);
  TORCH_CHECK(in_features >= 0 && in_features % m == 0, op, ": M=", m, " does not divide in_features=",
              in_features);
  const auto dt = values.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": values must be float32, bfloat16 or float16, got ", dt);
  NMUnpack p{};
  p.m = m;
  p.kept_per_group = m - n;
  p.kept_per_row = in_features / m * p.kept_per_group;
  TORCH_CHECK(values.dim() == 2 && values.size(1) == p.kept_per_row, op, ": values must be (out, ",
              p.kept_per_row, ") for ", n, ":", m, " with in_features=", in_features, ", got ", values.sizes());
  p.out_features = values.size(0);
  p.in_features = in_features;
  p.words = (in_features + 63) / 64;
  p.bits = m <= 4 ? 2 : 4;
  p.code_width = (p.kept_per_row * p.bits + 7) / 8;
  TORCH_CHECK(index_codes.scalar_type() == at::kByte && index_codes.dim() == 2 &&
                  index_codes.size(0) == p.out_features && index_codes.size(1) == p.code_width,
              op, ": index_codes must be uint8 (", p.out_features, ", ", p.code_width, "), got ",
              index_codes.scalar_type(), " ", index_codes.sizes());
  return p;
}

// Dense rows [r_begin, r_end) of the weight to dst, float32 as 4-byte and 16-bit types as 2-byte elements.
void nm_decode(const NMUnpack& p, const at::Tensor& vals, void* dst, int64_t r_begin, int64_t r_end,
               UnpackIsa isa) {
  if (vals.element_size() == 4) {
    nm_unpack_rows(p, static_cast<const uint32_t*>(vals.const_data_ptr()), static_cast<uint32_t*>(dst), r_begin,
                   r_end, isa);
  } else {
    nm_unpack_rows(p, static_cast<const uint16_t*>(vals.const_data_ptr()), static_cast<uint16_t*>(dst), r_begin,
                   r_end, isa);
  }
}

}  // namespace

at::Tensor nm_unpack_cpu(const at::Tensor& values, const at::Tensor& index_codes, int64_t n, int64_t m,
                         int64_t in_features) {
  NMUnpack p = check_nm_packed("sparsekit::nm_unpack", values, index_codes, n, m, in_features);
  const at::Tensor vals = values.contiguous();
  const at::Tensor codes = index_codes.contiguous();
  p.codes = codes.const_data_ptr<uint8_t>();
  const UnpackIsa isa = unpack_isa();
  return unpack_dense(p.out_features, in_features, values.options(),
                      [&](int64_t r0, int64_t r1, void* dst) { nm_decode(p, vals, dst, r0, r1, isa); });
}

at::Tensor nm_unpack_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& index_codes,
                                int64_t n, int64_t m, int64_t in_features, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "sparsekit::nm_unpack_linear";
  NMUnpack p = check_nm_packed(op, values, index_codes, n, m, in_features);
  check_unpack_linear_input(op, x, values, p.out_features, in_features, bias);
  const at::Tensor vals = values.contiguous();
  const at::Tensor codes = index_codes.contiguous();
  p.codes = codes.const_data_ptr<uint8_t>();
  const UnpackIsa isa = unpack_isa();
  return unpack_linear_blocked(x, p.out_features, in_features, bias, [&](int64_t r0, int64_t r1, void* dst) {
    nm_decode(p, vals, dst, r0, r1, isa);
  });
}

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("nm_unpack", TORCH_FN(nm_unpack_cpu));
  m.impl("nm_unpack_linear", TORCH_FN(nm_unpack_linear_cpu));
}

}  // namespace sparsekit
