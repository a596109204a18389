// Which vector instructions the CPU kernels may use. AVX-512 code is compiled per function
// (SPARSEKIT_AVX512), never with a global -march flag, and chosen at run time by use_avx512(); a portable
// scalar path always remains.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SPARSEKIT_HAVE_X86 1
// gcc 12 reports the _mm512_undefined_*() pass-through operand inside intrinsics (_mm512_cvtepu16_epi32,
// _mm512_slli_epi32, the extract in _mm512_reduce_add_ps) as "(may be) used uninitialized" once they are
// inlined: a false positive (every lane of that operand is overwritten), hundreds of lines per build. The
// AVX-512 sections of the kernels sit between these two macros, which silence only those two warnings there.
#if !defined(__clang__)
#define SPARSEKIT_INTRINSICS_BEGIN                                     \
  _Pragma("GCC diagnostic push")                                       \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")          \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
#define SPARSEKIT_INTRINSICS_END _Pragma("GCC diagnostic pop")
#else
#define SPARSEKIT_INTRINSICS_BEGIN
#define SPARSEKIT_INTRINSICS_END
#endif
#define SPARSEKIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,bmi,popcnt")))
// AVX-512 plus VBMI2 (vpexpandw: 32 16-bit lanes per expand), for the unpack kernels' 16-bit path.
#define SPARSEKIT_AVX512_VBMI2 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx2,fma,bmi,popcnt")))
// AVX-512 plus BITALG (vpopcntw), for the 4:8 / 8:16 rank decode.
#define SPARSEKIT_AVX512_BITALG \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512bitalg,avx2,fma,bmi,popcnt")))
// AVX-512 plus VBMI2 and BF16 (vdpbf16ps: 32 bfloat16 products summed in pairs into 16 floats), for the
// bfloat16 paths of the 2:4 and bitmap GEMV kernels.
#define SPARSEKIT_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512bf16,avx2,fma,bmi,popcnt")))
#else
#define SPARSEKIT_HAVE_X86 0
#endif

namespace sparsekit {

// True when SPARSEKIT_CPU_ISA names `level`: the tests step the kernels down an ISA path that way ("scalar": the
// portable loops; "avx512": no VBMI2 / BF16; "vbmi2": no BITALG). Read on every call, so a test can switch it.
inline bool isa_capped_at(const char* level) {
  const char* isa = std::getenv("SPARSEKIT_CPU_ISA");
  return isa && std::strcmp(isa, level) == 0;
}

// True when this CPU has AVX-512 F/BW/VL, unless SPARSEKIT_CPU_ISA is "scalar".
inline bool use_avx512() {
#if SPARSEKIT_HAVE_X86
  static const bool cpu_has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                              __builtin_cpu_supports("avx512vl");
  return cpu_has && !isa_capped_at("scalar");
#else
  return false;
#endif
}

// True when use_avx512() and the CPU also has AVX512-VBMI2, unless SPARSEKIT_CPU_ISA is "avx512" (the plain AVX-512
// path of the unpack kernels).
inline bool use_avx512_vbmi2() {
#if SPARSEKIT_HAVE_X86
  static const bool cpu_has = __builtin_cpu_supports("avx512vbmi2");
  return cpu_has && use_avx512() && !isa_capped_at("avx512");
#else
  return false;
#endif
}

// True when use_avx512_vbmi2() and the CPU also has AVX512-BITALG, unless SPARSEKIT_CPU_ISA is "vbmi2" (the VBMI2
// paths that do without BITALG).
inline bool use_avx512_bitalg() {
#if SPARSEKIT_HAVE_X86
  static const bool cpu_has = __builtin_cpu_supports("avx512bitalg");
  return cpu_has && use_avx512_vbmi2() && !isa_capped_at("vbmi2");
#else
  return false;
#endif
}

// True when use_avx512_vbmi2() and the CPU also has AVX512-BF16 (same "avx512" override as above).
inline bool use_avx512_bf16() {
#if SPARSEKIT_HAVE_X86
  static const bool cpu_has = __builtin_cpu_supports("avx512bf16");
  return cpu_has && use_avx512_vbmi2();
#else
  return false;
#endif
}

}  // namespace sparsekit
