// Scatter one row's packed values to the dense columns named by a column bitmask (zeros elsewhere): the
// shared last step of sparsekit::nm_unpack and sparsekit::bitmap_unpack (sparse24_unpack.cpp,
// bitmap_unpack.cpp) and of their blocked GEMM variants (unpack_linear.h).
//
// mask: ceil(cols / 64) words; bit c % 64 of word c / 64 is set iff dense column c takes the next packed value
// (values are consumed in increasing column order); bits at or past cols must be 0. Only bits move, so a
// 4-byte element is float32 and a 2-byte one bfloat16 or float16 alike.
//
// Vector paths (masked or expand-loads read only the values a chunk consumes, masked stores stop at column cols - 1):
// * AVX-512, 4-byte: per 16 columns, load popcount(bits) values and spread them with vpexpandd.
// * AVX-512, 2-byte: the same on values widened to 32-bit lanes, narrowed back.
// * AVX-512 + VBMI2, 2-byte: per 32 columns, one vpexpandw from memory (2.1x faster than widening on the
//   development machine's Zen 5; it reads only the values it consumes, as the masked loads do).
// The vector paths prefetch the values kExpandPrefetchBytes ahead: the hardware prefetcher does not follow
// masked loads. On the development machine's Zen 5, expanding 4096 rows of 14336 bfloat16 columns at 50%
// (values read from memory, written to a cache-resident buffer) ran at 6.9 weights/ns without the software
// prefetch, 24 with it, and 21 with plain loads instead of masked ones.
#pragma once

#include "cpu/cpu_isa.h"

#include <cstdint>
#include <cstring>

namespace sparsekit {

enum class UnpackIsa { kScalar, kAvx512, kAvx512Vbmi2 };

// Read once per op call (the environment switch SPARSEKIT_CPU_ISA may change between calls in tests).
inline UnpackIsa unpack_isa() {
  if (use_avx512_vbmi2()) return UnpackIsa::kAvx512Vbmi2;
  return use_avx512() ? UnpackIsa::kAvx512 : UnpackIsa::kScalar;
}

template <typename Elem>
inline void expand_row_scalar(const uint64_t* mask, int64_t cols, const Elem* v, Elem* out) {
  std::memset(out, 0, static_cast<size_t>(cols) * sizeof(Elem));
  const int64_t words = (cols + 63) / 64;
  for (int64_t t = 0; t < words; ++t) {
    for (uint64_t bits = mask[t]; bits; bits &= bits - 1) out[t * 64 + __builtin_ctzll(bits)] = *v++;
  }
}

#if SPARSEKIT_HAVE_X86
// How far ahead of the next packed value the vector paths prefetch (2 and 4 KiB measured alike, 256 B slower).
constexpr uintptr_t kExpandPrefetchBytes = 2048;

// A T0 prefetch of the `lines` cache lines from kExpandPrefetchBytes past v, the address computed as an
// integer: it may lie past the end of the values (the last rows); a prefetch never faults.
template <int lines>
inline void prefetch_values_ahead(const void* v) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(v) + kExpandPrefetchBytes;
  for (int i = 0; i < lines; ++i) _mm_prefetch(reinterpret_cast<const char*>(at + 64 * i), _MM_HINT_T0);
}

SPARSEKIT_INTRINSICS_BEGIN
// Each full 64-column word is done in one step whose chunks find their values from popcounts of the word's
// lower bits, so the only chain from step to step is the word's total popcount (one chain per 16 columns
// measured 2x slower). Columns past the last full word go chunk by chunk with masked stores.
SPARSEKIT_AVX512 inline void expand16_avx512(uint32_t bits, const uint32_t* v, uint32_t* out, int64_t width) {
  const __m512i packed = _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << __builtin_popcount(bits)) - 1), v);
  const __m512i w = _mm512_maskz_expand_epi32(static_cast<__mmask16>(bits), packed);
  if (width >= 16) {
    _mm512_storeu_si512(out, w);
  } else {
    _mm512_mask_storeu_epi32(out, static_cast<__mmask16>((1u << width) - 1), w);
  }
}

SPARSEKIT_AVX512 inline void expand16_avx512(uint32_t bits, const uint16_t* v, uint16_t* out, int64_t width) {
  const __m256i h = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << __builtin_popcount(bits)) - 1), v);
  const __m256i w =
      _mm512_cvtepi32_epi16(_mm512_maskz_expand_epi32(static_cast<__mmask16>(bits), _mm512_cvtepu16_epi32(h)));
  if (width >= 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), w);
  } else {
    _mm256_mask_storeu_epi16(out, static_cast<__mmask16>((1u << width) - 1), w);
  }
}

template <typename Elem>
SPARSEKIT_AVX512 inline void expand_row_avx512(const uint64_t* mask, int64_t cols, const Elem* v, Elem* out) {
  const int64_t full = cols / 64;
  for (int64_t t = 0; t < full; ++t, out += 64) {
    const uint64_t word = mask[t];
    prefetch_values_ahead<sizeof(Elem)>(v);  // a word takes at most 64 values: 1 line per byte of Elem
    const Elem* v1 = v + __builtin_popcountll(word & 0xFFFFull);
    const Elem* v2 = v + __builtin_popcountll(word & 0xFFFFFFFFull);
    const Elem* v3 = v + __builtin_popcountll(word & 0xFFFFFFFFFFFFull);
    expand16_avx512(static_cast<uint32_t>(word) & 0xFFFFu, v, out, 16);
    expand16_avx512(static_cast<uint32_t>(word >> 16) & 0xFFFFu, v1, out + 16, 16);
    expand16_avx512(static_cast<uint32_t>(word >> 32) & 0xFFFFu, v2, out + 32, 16);
    expand16_avx512(static_cast<uint32_t>(word >> 48), v3, out + 48, 16);
    v += __builtin_popcountll(word);
  }
  const uint64_t word = full * 64 < cols ? mask[full] : 0;
  for (int64_t c = 0; full * 64 + c < cols; c += 16) {
    const uint32_t bits = static_cast<uint32_t>(word >> c) & 0xFFFFu;
    expand16_avx512(bits, v, out + c, cols - full * 64 - c);
    v += __builtin_popcount(bits);
  }
}

// The popcount(bits) packed 16-bit values at v spread to the set lanes of 32 (zeros elsewhere): one vpexpandw
// with a memory source, which reads only those values (like a masked load, it cannot fault past them:
// tests/test_bitmap.py puts the values before an unreadable page). Also the bfloat16 bitmap GEMV's tile halves
// (bitmap_gemv.cpp). On the development machine's Zen 5 it replaced a masked load + register vpexpandw: the
// bfloat16 bitmap GEMV ran 9-16% faster at M = 1-16 on 4096x4096 and 14336x4096 and SmolLM2's 576x1536, 1 thread
// (A/B, three alternating runs each). The 32-bit paths keep masked loads: vexpandps / vpexpandd from memory made
// the float32 GEMV 8-19% slower on the Llama-3-8B up and down shapes at M = 1-8.
SPARSEKIT_AVX512_VBMI2 inline __m512i load_expand32_vbmi2(uint32_t bits, const uint16_t* v) {
  return _mm512_maskz_expandloadu_epi16(static_cast<__mmask32>(bits), v);
}

SPARSEKIT_AVX512_VBMI2 inline void expand32_vbmi2(uint32_t bits, const uint16_t* v, uint16_t* out, int64_t width) {
  const __m512i w = load_expand32_vbmi2(bits, v);
  if (width >= 32) {
    _mm512_storeu_si512(out, w);
  } else {
    _mm512_mask_storeu_epi16(out, static_cast<__mmask32>((uint64_t(1) << width) - 1), w);
  }
}

SPARSEKIT_AVX512_VBMI2 inline void expand_row_vbmi2(const uint64_t* mask, int64_t cols, const uint16_t* v,
                                                    uint16_t* out) {
  const int64_t full = cols / 64;
  for (int64_t t = 0; t < full; ++t, out += 64) {
    const uint64_t word = mask[t];
    prefetch_values_ahead<2>(v);  // a word takes at most 64 values of 2 bytes
    expand32_vbmi2(static_cast<uint32_t>(word), v, out, 32);
    expand32_vbmi2(static_cast<uint32_t>(word >> 32), v + __builtin_popcount(static_cast<uint32_t>(word)), out + 32,
                   32);
    v += __builtin_popcountll(word);
  }
  const uint64_t word = full * 64 < cols ? mask[full] : 0;
  for (int64_t c = 0; full * 64 + c < cols; c += 32) {
    const uint32_t bits = static_cast<uint32_t>(word >> c);
    expand32_vbmi2(bits, v, out + c, cols - full * 64 - c);
    v += __builtin_popcount(bits);
  }
}
SPARSEKIT_AVX512 inline int64_t popcount_words_avx512(const uint64_t* words, int64_t n) {
  int64_t count = 0;
  for (int64_t t = 0; t < n; ++t) count += __builtin_popcountll(words[t]);
  return count;
}
SPARSEKIT_INTRINSICS_END
#endif

// The number of bits set in words[0 .. n). Built without a target that has popcnt, __builtin_popcountll is a
// call into libgcc (3% of a bitmap_unpack_linear profile); the AVX-512 paths imply the instruction.
inline int64_t popcount_words(const uint64_t* words, int64_t n, UnpackIsa isa) {
#if SPARSEKIT_HAVE_X86
  if (isa != UnpackIsa::kScalar) return popcount_words_avx512(words, n);
#endif
  int64_t count = 0;
  for (int64_t t = 0; t < n; ++t) count += __builtin_popcountll(words[t]);
  return count;
}

inline void expand_row(const uint64_t* mask, int64_t cols, const uint32_t* v, uint32_t* out, UnpackIsa isa) {
#if SPARSEKIT_HAVE_X86
  if (isa != UnpackIsa::kScalar) {
    expand_row_avx512(mask, cols, v, out);
    return;
  }
#endif
  expand_row_scalar(mask, cols, v, out);
}

inline void expand_row(const uint64_t* mask, int64_t cols, const uint16_t* v, uint16_t* out, UnpackIsa isa) {
#if SPARSEKIT_HAVE_X86
  if (isa == UnpackIsa::kAvx512Vbmi2) {
    expand_row_vbmi2(mask, cols, v, out);
    return;
  }
  if (isa == UnpackIsa::kAvx512) {
    expand_row_avx512(mask, cols, v, out);
    return;
  }
#endif
  expand_row_scalar(mask, cols, v, out);
}

}  // namespace sparsekit
