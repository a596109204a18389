// CPU kernel for sparsekit::nm_unpack: the dense (out, in) weight of an N:M packed one
// (sparsekit/formats/sparse24.py: values (out, G * K), uint8 index codes, b = 2 bits per kept value for
// M <= 4 and 4 bits for M <= 16, little-endian within a row), and sparsekit::nm_unpack_linear, which feeds
// the same decode, block by block, to BLAS (unpack_linear.h).
//
// * 2:4 with AVX-512: 32 columns per step, one permute of the step's 16 kept values (vpermw, or two vpermd
//   for 32-bit values) with indices and a zero mask computed from the codes in registers
//   (unpack_row24_perm): any order of the two positions of a group decodes as the reference's scatter.
// * 4:8 with AVX-512: the groups' column masks built in registers from 64 code bytes (256 columns) at a time
//   (a nibble -> bit table with vpshufb; half_group_masks), for rows whose positions increase within every group
//   (as pack_nm writes them); other rows take the permute path below. 16-bit values with VBMI2 and BITALG
//   (unpack_row_half_rank): per 32 columns one permute of the values, each column's index the popcount of its
//   group's mask bits below it. Otherwise the masks go to memory (nm_row_mask_half) and expand_row places the
//   values. On the development machine's Zen 5 (1 thread, bfloat16 4096x4096 through the panel path at
//   M = 1-16) the mask + expand decoded 7.9 weights/ns against 5.3 for the permute path and 8.7 for 2:4's; the
//   rank permute (eighth session) 8.8 where the mask + expand read 6.7-6.8 in the same sitting.
// * 8:16 with AVX-512: the same, a group's 16 mask bits from two tables.
// * Other power-of-two M (2, 8, 16, and 4 with N != 2; any N) with AVX-512: 32 columns per step; the step's
//   code fields widened to 16-bit lanes, K compares per output column against the group's fields, one permute
//   of the values (unpack_row_perm): any order decodes as the scatter.
// * Other M (3, 5, 6, 7, 9..15), or no AVX-512: the row's column bitmask, one bit per kept value from a scalar
//   loop (nm_row_mask), then expand_row (expand_row.h), or its portable loop. An expand places values in column
//   order, so this path takes only rows whose positions increase within every group.
// A row that fails those conditions (a repeated position, or for the mask paths a decreasing pair) is
// written value by value instead, in order, so the last value at a repeated position wins, as a sequential
// scatter does. A position >= M (possible for M = 1, 2, 3, 5..15) is an error on every path.
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

// 2:4: whether the code byte's low group has increasing positions (bit 0) and its high group (bit 1).
constexpr std::array<uint8_t, 256> make_increasing24() {
  std::array<uint8_t, 256> table{};
  for (int b = 0; b < 256; ++b) {
    table[b] = static_cast<uint8_t>(((b & 3) < ((b >> 2) & 3)) | ((((b >> 4) & 3) < ((b >> 6) & 3)) << 1));
  }
  return table;
}
constexpr std::array<uint8_t, 256> kIncreasing24 = make_increasing24();

struct NMUnpack {
  int64_t out_features, in_features, words, m, kept_per_group, kept_per_row, code_width, bits;
  const uint8_t* codes;
  const char* op;  // the op that decodes, for error messages
};

inline int code_at(const uint8_t* row_codes, int64_t j, int64_t bits) {
  const int64_t bit = j * bits;
  return (row_codes[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1);
}

// Step 1: the column mask of row r into mask[0 .. words). Returns its popcount, or -1 when the positions of
// some group do not increase (the expand of step 2 would misplace its values).
int64_t nm_row_mask(const NMUnpack& p, int64_t r, uint64_t* mask, UnpackIsa isa) {
  std::fill(mask, mask + p.words, uint64_t(0));
  const uint8_t* c = p.codes + r * p.code_width;
  if (p.m == 4 && p.kept_per_group == 2) {
    // Byte b holds groups 2b and 2b + 1; an odd number of groups leaves the last byte's high half as padding:
    // a phantom group past in_features, whose order is not checked.
    const int64_t groups = p.in_features / 4;
    bool increasing = true;
    for (int64_t b = 0; b < p.code_width; ++b) {
      mask[b >> 3] |= uint64_t(kTable24[c[b]]) << ((b & 7) * 8);
      const uint8_t real = 2 * b + 1 < groups ? 3 : 1;
      increasing &= (kIncreasing24[c[b]] & real) == real;
    }
    if (p.in_features % 64) mask[p.words - 1] &= (uint64_t(1) << (p.in_features % 64)) - 1;
    if (!increasing) return -1;
  } else {
    const int64_t groups = p.in_features / p.m;
    bool increasing = true;
    for (int64_t g = 0, j = 0; g < groups; ++g) {
      int previous = -1;
      for (int64_t k = 0; k < p.kept_per_group; ++k, ++j) {
        const int pos = code_at(c, j, p.bits);
        TORCH_CHECK(pos < p.m, p.op, ": index code ", pos, " >= M=", p.m, " at row ", r,
                    ", kept value ", j);
        increasing &= pos > previous;
        previous = pos;
        const int64_t col = g * p.m + pos;
        mask[col >> 6] |= uint64_t(1) << (col & 63);
      }
    }
    if (!increasing) return -1;
  }
  return popcount_words(mask, p.words, isa);
}

#if SPARSEKIT_HAVE_X86
SPARSEKIT_INTRINSICS_BEGIN
// 2:4, 32 columns (8 groups, 16 kept values, 4 code bytes) per step, as a permute: output column l (group
// g = l / 4, position l % 4) takes the group's first kept value where the first code equals l % 4, its second
// where the second does, else zero. So the codes of a group may come in any order (pack_nm writes them
// increasing; a mask + expand decode would swap the two values of a decreasing pair). Columns past the last
// full step (in_features % 32) are left to the caller. Returns false when a group repeats a position: the row
// must then be redone value by value.
SPARSEKIT_AVX512 bool unpack_row24_perm(const uint8_t* c, const uint16_t* v, uint16_t* out, int64_t steps) {
  alignas(64) static constexpr uint16_t kLane[32] = {0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15,
                                                     16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31};
  const __m512i lane = _mm512_load_si512(kLane);
  const __m512i three = _mm512_set1_epi16(3);
  const __m512i pos = _mm512_and_si512(lane, three);
  const __m512i group = _mm512_srli_epi16(lane, 2);
  // groups 0..3 read the low 16 bits of the step's code word, groups 4..7 the high 16 bits
  const __m512i shift0 = _mm512_slli_epi16(_mm512_and_si512(group, three), 2);
  const __m512i shift1 = _mm512_add_epi16(shift0, _mm512_set1_epi16(2));
  const __m512i first = _mm512_slli_epi16(group, 1);  // index of the group's first kept value in the step
  const __m512i one = _mm512_set1_epi16(1);
  __mmask32 repeated = 0;
  for (int64_t s = 0; s < steps; ++s, c += 4, v += 16, out += 32) {
    uint32_t w;
    std::memcpy(&w, c, sizeof(w));
    const __m512i words = _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_set1_epi16(static_cast<short>(w & 0xFFFF)),
                                                  _mm512_set1_epi16(static_cast<short>(w >> 16)));
    const __mmask32 m0 = _mm512_cmpeq_epi16_mask(_mm512_and_si512(_mm512_srlv_epi16(words, shift0), three), pos);
    const __mmask32 m1 = _mm512_cmpeq_epi16_mask(_mm512_and_si512(_mm512_srlv_epi16(words, shift1), three), pos);
    repeated |= m0 & m1;
    const __m512i idx = _mm512_mask_add_epi16(first, m1, first, one);
    const __m512i h = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
    _mm512_storeu_si512(out, _mm512_maskz_permutexvar_epi16(m0 | m1, idx, h));
  }
  return repeated == 0;
}

// The same for 32-bit values: two halves of 16 columns (4 groups, 8 values) per step.
SPARSEKIT_AVX512 bool unpack_row24_perm(const uint8_t* c, const uint32_t* v, uint32_t* out, int64_t steps) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i three = _mm512_set1_epi32(3);
  const __m512i pos = _mm512_and_si512(lane, three);
  const __m512i group = _mm512_srli_epi32(lane, 2);
  const __m512i shift0 = _mm512_slli_epi32(group, 2);  // half 0: groups 0..3 at bits 0..15
  const __m512i first = _mm512_slli_epi32(group, 1);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i two = _mm512_set1_epi32(2);
  const __m512i sixteen = _mm512_set1_epi32(16);
  __mmask16 repeated = 0;
  for (int64_t s = 0; s < steps; ++s, c += 4, v += 16, out += 32) {
    uint32_t w;
    std::memcpy(&w, c, sizeof(w));
    const __m512i words = _mm512_set1_epi32(static_cast<int>(w));
    for (int half = 0; half < 2; ++half) {
      const __m512i sh0 = half ? _mm512_add_epi32(shift0, sixteen) : shift0;
      const __m512i sh1 = _mm512_add_epi32(sh0, two);
      const __mmask16 m0 = _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_srlv_epi32(words, sh0), three), pos);
      const __mmask16 m1 = _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_srlv_epi32(words, sh1), three), pos);
      repeated |= m0 & m1;
      const __m512i idx = _mm512_mask_add_epi32(first, m1, first, one);
      const __m512i h = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 8 * half)));
      _mm512_storeu_si512(out + 16 * half, _mm512_maskz_permutexvar_epi32(m0 | m1, idx, h));
    }
  }
  return repeated == 0;
}

// Other N:M with M a power of two from 2 to 16 (2-bit codes for M <= 4, 4-bit above) and any K kept per group:
// 32 columns (G = 32 / M groups, G * K <= 32 kept values, 4Kb / M code bytes) per step. The step's code
// fields are widened to 16-bit lanes; output column l (group g, position l % M) takes kept value g * K + k where
// field g * K + k equals l % M: K compares of a permuted copy of the fields, then one permute of the values.
// Any order within a group decodes as the reference's scatter. Returns false, before writing past the step it
// is at, when a group repeats a position or a code is >= M: the caller redoes the row (value by value, or
// raising on the bad code).
struct PermSteps {
  __m512i word_idx, shifts, field_mask, pos, first, m_lanes;
  int bytes, kept, vals;  // per step: code bytes, kept per group, values
};

SPARSEKIT_AVX512 inline PermSteps perm_steps(const NMUnpack& p) {
  alignas(64) static constexpr uint16_t kLane[32] = {0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15,
                                                     16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31};
  const __m512i lane = _mm512_load_si512(kLane);
  const int log2_m = __builtin_ctzll(static_cast<uint64_t>(p.m));
  const __m512i bit = _mm512_mullo_epi16(lane, _mm512_set1_epi16(static_cast<short>(p.bits)));  // field f's bit
  PermSteps s;
  s.word_idx = _mm512_srli_epi16(bit, 4);
  s.shifts = _mm512_and_si512(bit, _mm512_set1_epi16(15));
  s.field_mask = _mm512_set1_epi16(static_cast<short>((1 << p.bits) - 1));
  s.pos = _mm512_and_si512(lane, _mm512_set1_epi16(static_cast<short>(p.m - 1)));
  s.first = _mm512_mullo_epi16(_mm512_srl_epi16(lane, _mm_cvtsi32_si128(log2_m)),
                               _mm512_set1_epi16(static_cast<short>(p.kept_per_group)));
  s.m_lanes = _mm512_set1_epi16(static_cast<short>(p.m));
  s.kept = static_cast<int>(p.kept_per_group);
  s.vals = static_cast<int>(32 / p.m * p.kept_per_group);
  s.bytes = s.vals * static_cast<int>(p.bits) / 8;
  return s;
}

// One step: the permute indices into the step's values and the lanes that take one (zero elsewhere); false on a
// repeated position or a code >= M.
SPARSEKIT_AVX512 inline bool perm_step(const PermSteps& s, const uint8_t* c, __m512i* idx, __mmask32* take) {
  const __m128i raw = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << s.bytes) - 1), c);
  const __m512i fields = _mm512_and_si512(
      _mm512_srlv_epi16(_mm512_permutexvar_epi16(s.word_idx, _mm512_castsi128_si512(raw)), s.shifts), s.field_mask);
  const __mmask32 real = static_cast<__mmask32>((uint64_t(1) << s.vals) - 1);
  __mmask32 bad = _mm512_mask_cmpge_epu16_mask(real, fields, s.m_lanes), taken = 0;
  __m512i at = s.first, out = s.first;
  const __m512i one = _mm512_set1_epi16(1);
  for (int k = 0; k < s.kept; ++k, at = _mm512_add_epi16(at, one)) {
    const __mmask32 hit = _mm512_cmpeq_epi16_mask(_mm512_permutexvar_epi16(at, fields), s.pos);
    bad |= hit & taken;
    taken |= hit;
    out = _mm512_mask_mov_epi16(out, hit, at);
  }
  *idx = out;
  *take = taken;
  return bad == 0;
}

SPARSEKIT_AVX512 bool unpack_row_perm(const NMUnpack& p, const uint8_t* c, const uint16_t* v, uint16_t* out) {
  const PermSteps s = perm_steps(p);
  const int64_t steps = p.in_features / 32;
  const __mmask32 vals = static_cast<__mmask32>((uint64_t(1) << s.vals) - 1);
  for (int64_t t = 0; t < steps; ++t, c += s.bytes, v += s.vals, out += 32) {
    __m512i idx;
    __mmask32 take;
    prefetch_values_ahead<1>(v);  // the hardware prefetcher does not follow masked loads
    prefetch_values_ahead<1>(c);
    if (!perm_step(s, c, &idx, &take)) return false;
    _mm512_storeu_si512(out, _mm512_maskz_permutexvar_epi16(take, idx, _mm512_maskz_loadu_epi16(vals, v)));
  }
  return true;
}

SPARSEKIT_AVX512 bool unpack_row_perm(const NMUnpack& p, const uint8_t* c, const uint32_t* v, uint32_t* out) {
  const PermSteps s = perm_steps(p);
  const int64_t steps = p.in_features / 32;
  const int lo_vals = std::min(s.vals, 16);
  const __mmask16 lo = static_cast<__mmask16>((1u << lo_vals) - 1);
  const __mmask16 hi = static_cast<__mmask16>((1u << (s.vals - lo_vals)) - 1);
  for (int64_t t = 0; t < steps; ++t, c += s.bytes, v += s.vals, out += 32) {
    __m512i idx;
    __mmask32 take;
    prefetch_values_ahead<2>(v);
    prefetch_values_ahead<1>(c);
    if (!perm_step(s, c, &idx, &take)) return false;
    const __m512i a = _mm512_maskz_loadu_epi32(lo, v), b = _mm512_maskz_loadu_epi32(hi, v + 16);
    const __m512i idx_lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(idx));
    const __m512i idx_hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(idx, 1));
    _mm512_storeu_si512(out, _mm512_maskz_permutex2var_epi32(static_cast<__mmask16>(take), a, idx_lo, b));
    _mm512_storeu_si512(out + 16, _mm512_maskz_permutex2var_epi32(static_cast<__mmask16>(take >> 16), a, idx_hi, b));
  }
  return true;
}

// Byte i + 1 of each group's lane (16-bit for 4:8, 32-bit for 8:16) moved down to byte i.
template <int kM>
SPARSEKIT_AVX512 inline __m512i next_byte_in_group(__m512i x) {
  return kM == 8 ? _mm512_srli_epi16(x, 8) : _mm512_srli_epi32(x, 8);
}

// A group's bytes ORed into the low byte of its lane.
template <int kM>
SPARSEKIT_AVX512 inline __m512i fold_group(__m512i x) {
  x = _mm512_or_si512(x, next_byte_in_group<kM>(x));
  return kM == 8 ? x : _mm512_or_si512(x, _mm512_srli_epi32(x, 16));
}

// 4:8 and 8:16 (kM = 8, 16): the column masks of the groups of one block of a row's 4-bit codes, 64 code bytes
// (256 columns) at c, the first `left` of them real (whole groups). A group's K = M / 2 codes fill M / 4 bytes
// (one 16- or 32-bit lane). Each nibble picks its column's bit from a 16-entry table (for 8:16 two: columns 0-7
// and 8-15; for 4:8 codes 8..15 pick none), and a group's bytes are ORed into its M mask bits: the returned
// vector holds group i's mask in the low 8 bits of 16-bit lane i (4:8) or the low 16 bits of 32-bit lane i (8:16),
// zeros elsewhere and past the real groups. *ok is cleared unless every code is < M and the positions of every
// group increase (within a byte, and from a byte's high code to the next byte's low one), so that values placed
// in column order land right.
template <int kM>
SPARSEKIT_AVX512 inline __m512i half_group_masks(const uint8_t* c, int64_t left, bool* ok) {
  static_assert(kM == 8 || kM == 16, "4:8 or 8:16");
  // the bytes of a group that another byte of it follows
  constexpr __mmask64 kHasNext = kM == 8 ? 0x5555555555555555ull : 0x7777777777777777ull;
  const __m512i low_cols = _mm512_broadcast_i32x4(_mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 0, 0, 0, 0, 0, 0, 0, 0));
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __mmask64 real = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
  const __m512i codes = _mm512_maskz_loadu_epi8(real, c);
  const __m512i lo = _mm512_and_si512(codes, nibble);
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(codes, 4), nibble);
  const __m512i cols_lo =
      fold_group<kM>(_mm512_or_si512(_mm512_shuffle_epi8(low_cols, lo), _mm512_shuffle_epi8(low_cols, hi)));
  const __mmask64 within = _mm512_cmplt_epu8_mask(lo, hi);
  const __mmask64 across = _mm512_cmplt_epu8_mask(hi, _mm512_and_si512(next_byte_in_group<kM>(codes), nibble));
  *ok &= ((within & real) == real) && ((across & real & kHasNext) == (real & kHasNext));
  if constexpr (kM == 8) {
    const __mmask64 bad = _mm512_test_epi8_mask(codes, _mm512_set1_epi8(static_cast<char>(0x88)));  // >= 8
    *ok &= (bad & real) == 0;
    return _mm512_and_si512(cols_lo, _mm512_set1_epi16(0xFF));
  } else {
    const __m512i high_cols =
        _mm512_broadcast_i32x4(_mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 4, 8, 16, 32, 64, -128));
    const __m512i cols_hi =
        fold_group<kM>(_mm512_or_si512(_mm512_shuffle_epi8(high_cols, lo), _mm512_shuffle_epi8(high_cols, hi)));
    const __m512i byte = _mm512_set1_epi32(0xFF);
    return _mm512_or_si512(_mm512_and_si512(cols_lo, byte), _mm512_slli_epi32(_mm512_and_si512(cols_hi, byte), 8));
  }
}

// The row's column mask (zeroed 64-bit words) from half_group_masks, block by block. True when the row may be
// expanded in column order (see there); false otherwise (the caller then takes another path).
template <int kM>
SPARSEKIT_AVX512 bool nm_row_mask_half(const uint8_t* c, int64_t code_width, uint64_t* mask) {
  constexpr int kGroupBytes = kM / 4;
  auto* out = reinterpret_cast<uint8_t*>(mask);
  bool ok = true;
  for (int64_t b = 0; b < code_width; b += 64, out += 32) {
    const int64_t left = std::min<int64_t>(64, code_width - b);  // whole groups
    const __m512i groups_mask = half_group_masks<kM>(c + b, left, &ok);
    const int64_t groups = left / kGroupBytes;
    if constexpr (kM == 8) {
      const __mmask32 real_groups = groups == 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << groups) - 1);
      _mm256_mask_storeu_epi8(out, real_groups, _mm512_cvtepi16_epi8(groups_mask));
    } else {
      const __mmask16 real_groups = groups == 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << groups) - 1);
      _mm256_mask_storeu_epi16(out, real_groups, _mm512_cvtepi32_epi16(groups_mask));
    }
  }
  return ok;
}

// 4:8 and 8:16 rows of 16-bit values, decoded without a mask in memory and without an expand: per block of 64 code
// bytes (256 columns) the groups' masks from half_group_masks, then per 32 columns (16 values) a permute of the
// values whose index for column l is the rank of l among its group's kept columns (a popcount of the mask bits
// below l) plus the group's first value in the step, zero where l is not kept. Needs the positions of every
// group to increase, as an expand does: false (before writing the block) when they do not, or a code is >= M.
// Development runs (Zen 5, 1 thread, bfloat16 4096x4096, cold weights, whole nm_unpack_linear calls on the panel
// path at M = 1 and 16): 4:8 6.7-6.8 -> 8.8 weights/ns and 8:16 6.7-6.9 -> 7.9-8.2 against the mask in memory +
// expand_row (2:4's permute: 8.0-8.2); 4096x14336 at M = 16, 4:8 8.86 -> 7.37 ms (2:4 7.65-8.01, dense 8.3).
template <int kM>
SPARSEKIT_AVX512_BITALG bool unpack_row_half_rank(const uint8_t* c, int64_t code_width, const uint16_t* v,
                                                  uint16_t* out, int64_t in_features) {
  alignas(64) static constexpr auto kTables = [] {
    struct {
      uint16_t sel[32], bit[32], below[32], first[32];
    } t{};
    for (int l = 0; l < 32; ++l) {
      t.sel[l] = static_cast<uint16_t>(kM == 8 ? l / 8 : 2 * (l / 16));  // column l's group lane at step 0
      t.bit[l] = static_cast<uint16_t>(1u << (l % kM));
      t.below[l] = static_cast<uint16_t>((1u << (l % kM)) - 1);
      t.first[l] = static_cast<uint16_t>(l / kM * (kM / 2));
    }
    return t;
  }();
  const __m512i sel0 = _mm512_load_si512(kTables.sel), bit = _mm512_load_si512(kTables.bit);
  const __m512i below = _mm512_load_si512(kTables.below), first = _mm512_load_si512(kTables.first);
  const __m512i four = _mm512_set1_epi16(4);  // a step moves 4 lanes on: 4 groups of 4:8, 2 (32-bit) of 8:16
  int64_t col = 0;
  for (int64_t b = 0; b < code_width; b += 64) {
    const int64_t left = std::min<int64_t>(64, code_width - b);
    bool ok = true;
    const __m512i groups_mask = half_group_masks<kM>(c + b, left, &ok);
    if (!ok) return false;
    const int64_t block_end = std::min(in_features, col + 4 * left);  // 4 columns per code byte
    prefetch_values_ahead<2>(v);
    prefetch_values_ahead<1>(c + b);
    __m512i sel = sel0;
    for (; col < block_end; col += 32, sel = _mm512_add_epi16(sel, four)) {
      const __m512i g = _mm512_permutexvar_epi16(sel, groups_mask);
      const __mmask32 kept = _mm512_test_epi16_mask(g, bit);
      const __m512i idx = _mm512_add_epi16(_mm512_popcnt_epi16(_mm512_and_si512(g, below)), first);
      const int64_t cols = std::min<int64_t>(32, block_end - col);
      if (cols == 32) {
        const __m512i h = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
        _mm512_storeu_si512(out + col, _mm512_maskz_permutexvar_epi16(kept, idx, h));
      } else {
        const __m512i h = _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1u << (cols / 2)) - 1), v);
        _mm512_mask_storeu_epi16(out + col, static_cast<__mmask32>((uint64_t(1) << cols) - 1),
                                 _mm512_maskz_permutexvar_epi16(kept, idx, h));
      }
      v += cols / 2;
    }
  }
  return true;
}
SPARSEKIT_INTRINSICS_END
#endif

// The permute paths for a whole row (2:4's, or the other power-of-two patterns'), then the last in_features % 32
// columns value by value; false when the row must be redone (a repeated position, or a code >= M).
template <typename Elem>
bool unpack_row_permuted(const NMUnpack& p, const uint8_t* c, const Elem* v, Elem* out) {
#if SPARSEKIT_HAVE_X86
  const bool ok = p.m == 4 && p.kept_per_group == 2 ? unpack_row24_perm(c, v, out, p.in_features / 32)
                                                    : unpack_row_perm(p, c, v, out);
  if (!ok) return false;
  // a repeated position in the tail: the last value wins
  const int64_t done = p.in_features / 32 * 32;
  std::memset(out + done, 0, static_cast<size_t>(p.in_features - done) * sizeof(Elem));
  for (int64_t j = done / p.m * p.kept_per_group; j < p.kept_per_row; ++j) {
    const int code = code_at(c, j, p.bits);
    if (code >= p.m) return false;
    out[(j / p.kept_per_group) * p.m + code] = v[j];
  }
  return true;
#else
  (void)p, (void)c, (void)v, (void)out;
  return false;
#endif
}

// Which vector decode a row takes: the 2:4 permute, the other power-of-two patterns' permute, or the column mask
// + expand (other M, or no AVX-512: expand_row's portable loop).
enum class NMDecode { kPerm24, kMask48, kMask816, kPermPow2, kMask };
inline NMDecode nm_decode_kind(const NMUnpack& p, UnpackIsa isa) {
  if (isa == UnpackIsa::kScalar) return NMDecode::kMask;
  if (p.m == 4 && p.kept_per_group == 2) return NMDecode::kPerm24;
  if (p.m == 8 && p.kept_per_group == 4) return NMDecode::kMask48;
  if (p.m == 16 && p.kept_per_group == 8) return NMDecode::kMask816;
  return (p.m & (p.m - 1)) == 0 && p.m >= 2 ? NMDecode::kPermPow2 : NMDecode::kMask;
}

// Dense rows [r_begin, r_end) to dst (row r_begin first).
template <typename Elem>
void nm_unpack_rows(const NMUnpack& p, const Elem* values, Elem* dst, int64_t r_begin, int64_t r_end,
                    UnpackIsa isa) {
  const NMDecode kind = nm_decode_kind(p, isa);
#if SPARSEKIT_HAVE_X86
  const bool rank = (kind == NMDecode::kMask48 || kind == NMDecode::kMask816) && isa == UnpackIsa::kAvx512Vbmi2 &&
                    use_avx512_bitalg();
#endif
  std::vector<uint64_t> mask(kind == NMDecode::kPerm24 ? 0 : static_cast<size_t>(std::max<int64_t>(1, p.words)));
  for (int64_t r = r_begin; r < r_end; ++r) {
    const Elem* v = values + r * p.kept_per_row;
    const uint8_t* c = p.codes + r * p.code_width;
    Elem* d = dst + (r - r_begin) * p.in_features;
#if SPARSEKIT_HAVE_X86
    if constexpr (sizeof(Elem) == 2) {
      if (rank && (kind == NMDecode::kMask48 ? unpack_row_half_rank<8>(c, p.code_width, v, d, p.in_features)
                                             : unpack_row_half_rank<16>(c, p.code_width, v, d, p.in_features))) {
        continue;
      }
    }
    if (kind == NMDecode::kMask48 || kind == NMDecode::kMask816) {
      std::fill(mask.begin(), mask.end(), uint64_t(0));
      if (kind == NMDecode::kMask48 ? nm_row_mask_half<8>(c, p.code_width, mask.data())
                                    : nm_row_mask_half<16>(c, p.code_width, mask.data())) {
        expand_row(mask.data(), p.in_features, v, d, isa);
        continue;
      }
    }
#endif
    if (kind != NMDecode::kMask && unpack_row_permuted(p, c, v, d)) continue;
    // The mask path, or a row the vector paths refused: nm_row_mask raises on a code >= M, and returns -1 for
    // positions that do not increase within a group.
    mask.resize(static_cast<size_t>(std::max<int64_t>(1, p.words)));  // a 2:4 row's first fallback allocates it
    if (nm_row_mask(p, r, mask.data(), isa) == p.kept_per_row) {
      expand_row(mask.data(), p.in_features, v, d, isa);
      continue;
    }
    // a repeated (or decreasing) position: write value by value, the last one wins (as a sequential scatter would)
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
  p.op = op;
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
  const auto* value_bytes = static_cast<const char*>(vals.const_data_ptr());
  const int64_t value_row_bytes = p.kept_per_row * vals.element_size();
  return unpack_linear_blocked(
      x, p.out_features, in_features, bias,
      [&](int64_t r0, int64_t r1, void* dst) { nm_decode(p, vals, dst, r0, r1, isa); },
      [&](int64_t r0, int64_t r1) {
        panel::Ranges r;
        r.begin[0] = value_bytes + r0 * value_row_bytes;
        r.bytes[0] = (r1 - r0) * value_row_bytes;
        r.begin[1] = reinterpret_cast<const char*>(p.codes + r0 * p.code_width);
        r.bytes[1] = (r1 - r0) * p.code_width;
        return r;
      });
}

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("nm_unpack", TORCH_FN(nm_unpack_cpu));
  m.impl("nm_unpack_linear", TORCH_FN(nm_unpack_linear_cpu));
}

}  // namespace sparsekit
