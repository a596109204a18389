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

// True when this CPU has AVX-512 F/BW/VL and SPARSEKIT_CPU_ISA is not "scalar" (the tests force the
// portable path that way).
inline bool use_avx512() {
#if SPARSEKIT_HAVE_X86
  static const bool cpu_has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                              __builtin_cpu_supports("avx512vl");
  const char* isa = std::getenv("SPARSEKIT_CPU_ISA");
  return cpu_has && !(isa && std::strcmp(isa, "scalar") == 0);
#else
  return false;
#endif
}

// True when use_avx512() and the CPU also has AVX512-VBMI2, unless SPARSEKIT_CPU_ISA is "avx512" (the tests
// force the plain AVX-512 path of the unpack kernels that way).
inline bool use_avx512_vbmi2() {
#if SPARSEKIT_HAVE_X86
  static const bool cpu_has = __builtin_cpu_supports("avx512vbmi2");
  const char* isa = std::getenv("SPARSEKIT_CPU_ISA");
  return cpu_has && use_avx512() && !(isa && std::strcmp(isa, "avx512") == 0);
#else
  return false;
#endif
}

// True when use_avx512_vbmi2() and the CPU also has AVX512-BITALG, unless SPARSEKIT_CPU_ISA is "vbmi2" (the tests
// force the VBMI2 paths that do without BITALG that way) or "avx512".
inline bool use_avx512_bitalg() {
#if SPARSEKIT_HAVE_X86
  static const bool cpu_has = __builtin_cpu_supports("avx512bitalg");
  const char* isa = std::getenv("SPARSEKIT_CPU_ISA");
  return cpu_has && use_avx512_vbmi2() && !(isa && std::strcmp(isa, "vbmi2") == 0);
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
