// Branch-free widening of float16/bfloat16 to float, shared by the CPU kernels.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace sparsekit {

// Widening to float, written so that gcc vectorises the loops that call it. c10::Half's own conversion
// (without -mf16c) has a branch for subnormals that stops vectorisation (~4x slower); this is the same
// bit-exact algorithm (FP16 library, as in c10) with the branch turned into a mask. Checked exhaustively
// against c10::detail::fp16_ieee_to_fp32_value for all 65536 inputs.
inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float to_float(c10::Half h) {
  const uint32_t w = static_cast<uint32_t>(h.x) << 16;
  const uint32_t two_w = w + w;  // exponent and mantissa at the top, sign dropped
  // Normal, inf and NaN: shift into float position, rebias by 0xE0 (so 0x1F maps to 0xFF), scale back.
  const float normal = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // Subnormal: place the mantissa under the exponent of 0.5 and subtract 0.5 (exact, no subnormal math).
  const float subnormal = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(two_w < (1u << 27));
  return bits_to_float((w & 0x80000000u) | (float_to_bits(subnormal) & is_subnormal) |
                       (float_to_bits(normal) & ~is_subnormal));
}
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }  // a shift: vectorises as is
inline float to_float(float v) { return v; }
inline float to_float(double v) { return static_cast<float>(v); }  // one rounding, as Tensor.float()

}  // namespace sparsekit
