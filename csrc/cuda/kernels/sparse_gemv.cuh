// Sparse linear layers for decode (sparsekit::nm_linear, sparsekit::bitmap_linear): y = x @ W^T (+ bias) for
// 1..64 rows of x, W in the packed formats of sparsekit/formats, float32 accumulation, one rounding.
//
// Decode is memory-bound: the kernels are built to read every compressed weight byte once per call for all
// rows of x, with 16-byte loads marked evict-first (weights are read once; x is re-read and kept in cache).
//
// N:M (nm_mma_kernel; bf16/fp16, M in {2, 4, 8} keeping at most half, and 8:16; in_features % 64 == 0):
//   Tensor cores (mma.sync m16n8k16, float32 accumulators) on a dense tile decoded in registers. A warp owns
//   16 output features (the mma's M side; the rows of x are its N side, 8 per mma, "swap AB") and walks the
//   input features in steps of 64 columns. The mma sums over its 16 k-slots, so the k-slots may stand for
//   any 16 input columns as long as A (weights) and B (x) agree. Lane (g = lane / 4, t = lane % 4) holds
//   k-slots {2t, 2t+1, 2t+8, 2t+9} of rows g and g + 8 (PTX ISA, mma.m16n8k16 fragments); we let them stand
//   for columns 16t + 4s + {0, 1, 2, 3} in k-step s = 0..3 of a step. So a lane decodes, per row, one
//   contiguous 16-column chunk: 16 * K / M kept values (one 16-byte load for 2:4 and 4:8 bf16) and their
//   codes, and reads x as 32 contiguous bytes per row of x. 2:4 decodes a group with one shared-memory
//   table lookup and two byte permutes (selectors placing v0, v1 or zero in each bf16 lane); other patterns
//   with compile-time one-hot selects.
//   CTA: 8 warps = row_warps (along out_features) x 8 / row_warps (along in_features, summed in shared
//   memory at the end). More rows of x share x loads across more row warps (x comes from L1). When the row
//   tiles do not fill the SMs, the input features are also split over CTAs (grid.y, one wave of CTAs: each
//   split adds rows x out_features atomics), which add float32 partials into a zeroed workspace laid out
//   (out_features, rows rounded up to 8), so that a lane's two results for a feature are adjacent: one
//   8-byte atomic on sm_90; finalize_kernel rounds it into y (the last bits may then vary from run to run). Products with pruned weights are computed (the dense tile holds zeros), so an inf or
//   NaN of x at a pruned position reaches y, as in the reference (F.linear on the unpacked weight).
//
// Bitmap (bitmap_gemv_kernel; bf16/fp16/fp32, any in_features):
//   CUDA cores, one warp per output feature, one lane per 64-column tile: a lane reads its tile's mask word
//   (coalesced across the warp), a warp scan of popcounts places its values, and it walks them in aligned
//   16-byte blocks, taking the column of each from the mask (find-first-set) and x from shared memory, where
//   the CTA stages a 2048-column slice of x transposed (col, row of x). Pruned weights cost nothing and an
//   inf/NaN of x at a pruned position does not reach y (as the CPU kernel). Up to 16 / sizeof(T) rows of x per
//   pass; more rows run as more passes over grid.z (the weights are then re-read, mostly from L2).
//
// Fallback for everything else (float32 N:M, other patterns, in_features % 64 != 0, misaligned pointers, more
// than 64 rows): the torch binding decodes W to dense with nm_decode_kernel / bitmap_decode_kernel and calls a
// dense matmul.
//
// The per-lane pieces (chunk decode, fragment assembly, tile walk) are __host__ __device__ so that a host
// program can run them against an emulation of the mma fragments. Pure CUDA (no torch headers), compiled by
// .ci/nvcc_check through SPARSEKIT_SPARSE_GEMV_INSTANTIATE.
#pragma once

#include "common.cuh"

namespace sparsekit {
namespace cuda {
namespace gemv {

constexpr int kStepCols = 64;      // input columns a warp consumes per step (4 mma k-steps of 16)
constexpr int kWarps = 8;          // warps per CTA of nm_mma_kernel
constexpr int kMaxRowBlocks = 8;   // blocks of 8 rows of x: 64 rows
constexpr int kMaxRows = 8 * kMaxRowBlocks;
constexpr int kBitmapWarps = 16;   // warps (= output features) per CTA of bitmap_gemv_kernel
constexpr int kTile = 64;          // bitmap columns per mask word
constexpr int kBitmapChunkCols = 32 * kTile;  // one tile per lane: the x slice staged per pass

template <typename T>
constexpr bool is_16bit_float = std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>;

// ---------------------------------------------------------------------------------------------------
// Conversions and loads usable on the host too (the host runs them in the fragment emulation).
// ---------------------------------------------------------------------------------------------------
__host__ __device__ inline float as_float(float v) { return v; }
__host__ __device__ inline float as_float(double v) { return static_cast<float>(v); }
__host__ __device__ inline float as_float(__half v) { return __half2float(v); }
__host__ __device__ inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__host__ __device__ inline T from_float(float v);
template <>
__host__ __device__ inline float from_float<float>(float v) { return v; }
template <>
__host__ __device__ inline double from_float<double>(float v) { return v; }
template <>
__host__ __device__ inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__host__ __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// kBytes bytes from p (aligned to Chunk<kBytes>::bytes) into out. Device: ld.global.cs (evict-first, read once).
template <int kBytes>
__host__ __device__ inline void load_once(const void* p, void* out) {
#ifdef __CUDA_ARCH__
  constexpr int kChunk = Chunk<kBytes>::bytes;
  using C = typename ChunkType<kChunk>::type;
  const C* src = static_cast<const C*>(p);
#pragma unroll
  for (int i = 0; i < kBytes / kChunk; ++i) {
    const C raw = __ldcs(src + i);
    memcpy(static_cast<char*>(out) + i * kChunk, &raw, kChunk);
  }
#else
  memcpy(out, p, kBytes);
#endif
}

// kBytes bytes (16 or 32, 16-byte aligned) that many warps read: ld.global.nc, kept in L1.
template <int kBytes>
__host__ __device__ inline void load_shared_input(const void* p, void* out) {
  static_assert(kBytes % 16 == 0, "16-byte pieces");
#ifdef __CUDA_ARCH__
  const uint4* src = static_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < kBytes / 16; ++i) {
    const uint4 raw = __ldg(src + i);
    memcpy(static_cast<char*>(out) + i * 16, &raw, 16);
  }
#else
  memcpy(out, p, kBytes);
#endif
}

__host__ __device__ inline uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t selector) {
#ifdef __CUDA_ARCH__
  return __byte_perm(a, b, selector);
#else
  const uint64_t bytes = (uint64_t(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= uint32_t((bytes >> (8 * ((selector >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
#endif
}

__host__ __device__ inline int find_first_set(uint64_t bits) {  // 0-based index of the lowest set bit
#ifdef __CUDA_ARCH__
  return __ffsll(static_cast<long long>(bits)) - 1;
#else
  return __builtin_ctzll(bits);
#endif
}

__host__ __device__ inline int popcount64(uint64_t bits) {
#ifdef __CUDA_ARCH__
  return __popcll(bits);
#else
  return __builtin_popcountll(bits);
#endif
}

// ---------------------------------------------------------------------------------------------------
// N:M: one lane's 16-column chunk of one weight row -> 8 words of dense 16-bit weights (2 per word).
// ---------------------------------------------------------------------------------------------------
template <int M_, int K_>  // group size M, kept per group K = M - N
struct NMPattern {
  static_assert(16 % M_ == 0 && 1 <= K_ && K_ < M_, "groups must tile a 16-column chunk, with 1 <= K < M");
  static constexpr int kBits = M_ <= 4 ? 2 : 4;              // index code width (sparsekit/formats/sparse24.py)
  static constexpr int kValues = 16 / M_ * K_;               // kept values per chunk
  static constexpr int kCodeBytes = kValues * kBits / 8;     // their codes
  static_assert(kValues % 2 == 0 && kValues * kBits % 8 == 0, "chunks must hold whole words and bytes");
  static constexpr bool kTable = M_ == 4 && K_ == 2;         // 2:4: table lookup + byte permutes
};

// PRMT selectors for a 2:4 group with code nibble i0 | i1 << 2 (kept positions i0, i1): bf16 lane e of the
// group takes bytes 0-1 (v0) if e == i0, bytes 2-3 (v1) if e == i1, else bytes 4-5 of a zero word. Bits 0-15
// build dense word 0 (positions 0, 1), bits 16-31 word 1 (positions 2, 3).
__host__ __device__ constexpr uint32_t sparse24_selectors(uint32_t nibble) {
  const uint32_t i0 = nibble & 3u, i1 = (nibble >> 2) & 3u;
  uint32_t selectors = 0;
  for (uint32_t e = 0; e < 4; ++e) selectors |= (e == i0 ? 0x10u : e == i1 ? 0x32u : 0x54u) << (8 * e);
  return selectors;
}

// Raw bits of one lane's chunk of one row: the kept values (2 per word) and their codes, little-endian.
template <int M_, int K_>
struct NMChunk {
  uint32_t values[NMPattern<M_, K_>::kValues / 2];
  uint32_t codes[(NMPattern<M_, K_>::kCodeBytes + 3) / 4];  // words, not bytes: one register each
};

// Chunk c (= step * 4 + t) of row `row`: values at kept index c * kValues, codes at byte c * kCodeBytes. Each
// is aligned to its size's widest power-of-two chunk when the base pointers are 16-byte aligned and
// in_features % 64 == 0 (a row holds a whole number of 4-chunk steps).
template <int M_, int K_>
__host__ __device__ inline void load_nm_chunk(const uint16_t* values, const uint8_t* codes, int64_t kept_per_row,
                                              int64_t code_width, int64_t row, int64_t chunk, NMChunk<M_, K_>& out) {
  using P = NMPattern<M_, K_>;
  load_once<P::kValues * 2>(values + row * kept_per_row + chunk * P::kValues, out.values);
#pragma unroll
  for (int i = 0; i < (P::kCodeBytes + 3) / 4; ++i) out.codes[i] = 0u;
  load_once<P::kCodeBytes>(codes + row * code_width + chunk * P::kCodeBytes, out.codes);
}

template <int M_, int K_>
__host__ __device__ inline void decode_nm_chunk(const NMChunk<M_, K_>& in, const uint32_t* table,
                                                uint32_t (&dense)[8]) {
  using P = NMPattern<M_, K_>;
  if constexpr (P::kTable) {
    const uint32_t codes = in.codes[0];  // 16 bits; group q's two codes at bits 4q..4q+3
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint32_t selectors = table[(codes >> (4 * q)) & 15u];
      dense[2 * q] = byte_perm(in.values[q], 0u, selectors & 0xFFFFu);
      dense[2 * q + 1] = byte_perm(in.values[q], 0u, selectors >> 16);
    }
  } else {
    uint64_t codes = in.codes[0];
    if constexpr (P::kCodeBytes > 4) codes |= uint64_t(in.codes[1]) << 32;
#pragma unroll
    for (int w = 0; w < 8; ++w) {
      uint32_t word = 0;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int pos = 2 * w + h, group = pos / M_, lane_in_group = pos % M_;
        uint32_t bits = 0;
#pragma unroll
        for (int k = 0; k < K_; ++k) {  // codes within a group differ: at most one matches
          const int j = group * K_ + k;
          const uint32_t code = uint32_t(codes >> (j * P::kBits)) & ((1u << P::kBits) - 1u);
          const uint32_t value = (in.values[j / 2] >> (16 * (j % 2))) & 0xFFFFu;
          bits = code == uint32_t(lane_in_group) ? value : bits;
        }
        word |= bits << (16 * h);
      }
      dense[w] = word;
    }
  }
}

// mma.m16n8k16 A fragments of k-steps 0..3 from the dense chunks of rows g and g + 8: register 0 holds
// (row g, k-slots 2t, 2t+1), 1 (row g + 8, same slots), 2 (row g, slots 2t+8, 2t+9), 3 (row g + 8, same);
// k-step s maps slots (2t, 2t+1, 2t+8, 2t+9) to chunk columns (4s, 4s+1, 4s+2, 4s+3) = words 2s, 2s + 1.
__host__ __device__ inline void a_fragments(const uint32_t (&dense_g)[8], const uint32_t (&dense_g8)[8],
                                            uint32_t (&a)[4][4]) {
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    a[s][0] = dense_g[2 * s];
    a[s][1] = dense_g8[2 * s];
    a[s][2] = dense_g[2 * s + 1];
    a[s][3] = dense_g8[2 * s + 1];
  }
}

// B fragments of k-steps 0..3 for row n of x (column g of the mma's B): register 0 holds k-slots 2t, 2t+1,
// register 1 slots 2t+8, 2t+9, i.e. the same chunk columns as A: words 2s and 2s + 1 of x's 32-byte chunk.
template <typename T>
__host__ __device__ inline void load_b_fragments(const T* x, int64_t rows, int64_t in_features, int64_t n,
                                                 int64_t step, int t, uint32_t (&b)[4][2]) {
  uint32_t words[8];
  if (n < rows) {
    load_shared_input<32>(x + n * in_features + step * kStepCols + 16 * t, words);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) words[i] = 0u;  // rows of the padded block past the end of x
  }
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    b[s][0] = words[2 * s];
    b[s][1] = words[2 * s + 1];
  }
}

// Element i of a lane's accumulator fragment: output feature row0 + g (+ 8 for i >= 2), row of x 2t + (i & 1)
// within its block of 8.
__host__ __device__ inline int fragment_feature(int g, int i) { return g + (i >= 2 ? 8 : 0); }
__host__ __device__ inline int fragment_x_row(int t, int i) { return 2 * t + (i & 1); }

// sm_80 and later; nm_mma_supported keeps older devices off this path, and a build for them traps here.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  (void)d, (void)a, (void)b0, (void)b1;
  __trap();
#else
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

struct NMArgs {
  const void* x;           // (rows, in_features) contiguous, 16-byte aligned
  const void* values;      // (out_features, kept_per_row) contiguous, 16-byte aligned
  const uint8_t* codes;    // (out_features, code_width) contiguous, 16-byte aligned
  const void* bias;        // (out_features,) or nullptr
  void* y;                 // (rows, out_features) contiguous; unused when workspace is set
  float* workspace;        // (out_features, 8 * row_blocks) float32 zeros when in_features is split, else nullptr
  int64_t rows, out_features, in_features, kept_per_row, code_width;
  int row_blocks;          // ceil(rows / 8)
  int row_warps;           // warps per CTA along out_features: 1, 2, 4 or 8; the rest split in_features
  int64_t steps_per_split; // 64-column steps per grid.y slice
};

// Launch shape for nm_mma_kernel; the binding allocates the workspace when splits > 1.
struct NMPlan {
  int row_blocks, row_warps;
  int64_t row_tiles, splits, steps_per_split;
};

inline NMPlan plan_nm_linear(int64_t rows, int64_t out_features, int64_t in_features, int num_sms) {
  NMPlan plan{};
  plan.row_blocks = static_cast<int>(ceil_div(rows, 8));
  // More rows of x: more warps along out_features share each x load; fewer along in_features.
  plan.row_warps = plan.row_blocks <= 1 ? 1 : plan.row_blocks <= 2 ? 2 : plan.row_blocks <= 4 ? 4 : 8;
  const int k_warps = kWarps / plan.row_warps;
  plan.row_tiles = ceil_div(out_features, 16 * plan.row_warps);
  const int64_t steps = in_features / kStepCols;
  // One wave of CTAs (two fit on an SM): more splits would add rows * out_features atomics each.
  int64_t splits = plan.row_tiles >= num_sms ? 1 : ceil_div(int64_t(num_sms), plan.row_tiles);
  const int64_t max_splits = steps / k_warps;  // at least one step per warp of a slice
  splits = splits > max_splits ? max_splits : splits;
  splits = splits < 1 ? 1 : splits > 65535 ? 65535 : splits;
  plan.steps_per_split = ceil_div(steps, splits);
  plan.splits = steps == 0 ? 1 : ceil_div(steps, plan.steps_per_split);
  return plan;
}

template <typename T, int M_, int K_>
__global__ void __launch_bounds__(kWarps * 32, 2) nm_mma_kernel(const NMArgs p) {
  using P = NMPattern<M_, K_>;
  __shared__ uint32_t table[16];
  __shared__ float partial[kWarps][kMaxRowBlocks][4][32];
  if constexpr (P::kTable) {
    if (threadIdx.x < 16) table[threadIdx.x] = sparse24_selectors(threadIdx.x);
    __syncthreads();
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int row_warps = p.row_warps, k_warps = kWarps / row_warps;
  const int rw = warp % row_warps, kw = warp / row_warps;
  const int64_t row0 = (int64_t(blockIdx.x) * row_warps + rw) * 16;
  // Rows past the end re-read the last row (results dropped): every load stays in bounds, none is predicated.
  const int64_t last = p.out_features - 1;
  const int64_t row_g = row0 + g < last ? row0 + g : last;
  const int64_t row_g8 = row0 + g + 8 < last ? row0 + g + 8 : last;
  const uint16_t* values = static_cast<const uint16_t*>(p.values);
  const T* x = static_cast<const T*>(p.x);

  const int64_t steps = p.in_features / kStepCols;
  const int64_t step_begin = int64_t(blockIdx.y) * p.steps_per_split + kw;
  const int64_t split_end = int64_t(blockIdx.y + 1) * p.steps_per_split;
  const int64_t step_end = split_end < steps ? split_end : steps;

  float acc[kMaxRowBlocks][4];
#pragma unroll
  for (int nb = 0; nb < kMaxRowBlocks; ++nb) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nb][i] = 0.0f;
  }

  NMChunk<M_, K_> cur_g, cur_g8;
  if (step_begin < step_end) {
    load_nm_chunk(values, p.codes, p.kept_per_row, p.code_width, row_g, step_begin * 4 + t, cur_g);
    load_nm_chunk(values, p.codes, p.kept_per_row, p.code_width, row_g8, step_begin * 4 + t, cur_g8);
  }
  for (int64_t step = step_begin; step < step_end; step += k_warps) {
    // Next step's weights are in flight while this one is decoded and multiplied.
    NMChunk<M_, K_> next_g = cur_g, next_g8 = cur_g8;
    if (step + k_warps < step_end) {
      load_nm_chunk(values, p.codes, p.kept_per_row, p.code_width, row_g, (step + k_warps) * 4 + t, next_g);
      load_nm_chunk(values, p.codes, p.kept_per_row, p.code_width, row_g8, (step + k_warps) * 4 + t, next_g8);
    }
    uint32_t dense_g[8], dense_g8[8], a[4][4];
    decode_nm_chunk(cur_g, table, dense_g);
    decode_nm_chunk(cur_g8, table, dense_g8);
    a_fragments(dense_g, dense_g8, a);
#pragma unroll
    for (int nb = 0; nb < kMaxRowBlocks; ++nb) {
      if (nb < p.row_blocks) {
        uint32_t b[4][2];
        load_b_fragments(x, p.rows, p.in_features, int64_t(nb) * 8 + g, step, t, b);
#pragma unroll
        for (int s = 0; s < 4; ++s) mma_16816<T>(acc[nb], a[s], b[s][0], b[s][1]);
      }
    }
    cur_g = next_g;
    cur_g8 = next_g8;
  }

  if (k_warps > 1) {  // sum the warps that split in_features
#pragma unroll
    for (int nb = 0; nb < kMaxRowBlocks; ++nb) {
      if (nb < p.row_blocks) {
#pragma unroll
        for (int i = 0; i < 4; ++i) partial[warp][nb][i][lane] = acc[nb][i];
      }
    }
    __syncthreads();
    if (kw != 0) return;
    for (int other = 1; other < k_warps; ++other) {
#pragma unroll
      for (int nb = 0; nb < kMaxRowBlocks; ++nb) {
        if (nb < p.row_blocks) {
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[nb][i] += partial[other * row_warps + rw][nb][i][lane];
        }
      }
    }
  }

  const T* bias = static_cast<const T*>(p.bias);
  const bool add_bias = bias != nullptr && blockIdx.y == 0;
  const int64_t workspace_rows = int64_t(p.row_blocks) * 8;
#pragma unroll
  for (int nb = 0; nb < kMaxRowBlocks; ++nb) {
    if (nb < p.row_blocks) {
#pragma unroll
      for (int i = 0; i < 4; i += 2) {  // elements i, i + 1: one feature, rows of x n and n + 1
        const int64_t o = row0 + fragment_feature(g, i);
        const int64_t n = int64_t(nb) * 8 + fragment_x_row(t, i);
        if (o >= p.out_features) continue;
        const float b = add_bias ? as_float(bias[o]) : 0.0f;
        const float v0 = acc[nb][i] + b, v1 = acc[nb][i + 1] + b;
        if (p.workspace != nullptr) {  // rows past the end are summed too (x's zero padding) and never read
          float* w = p.workspace + o * workspace_rows + n;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
          atomicAdd(reinterpret_cast<float2*>(w), make_float2(v0, v1));
#else
          atomicAdd(w, v0);
          atomicAdd(w + 1, v1);
#endif
        } else {
          T* y = static_cast<T*>(p.y);
          if (n < p.rows) y[n * p.out_features + o] = from_float<T>(v0);
          if (n + 1 < p.rows) y[(n + 1) * p.out_features + o] = from_float<T>(v1);
        }
      }
    }
  }
}

// The N:M patterns nm_mma_kernel is built for, (M, K kept): M in {2, 4, 8} keeping at most half of each
// group (1:2, 2:4, 3:4, 4:8 .. 7:8), and 8:16. Sparser than 50% is where a compressed weight pays; keeping
// more (5..7 of 8) also spills at the 128-register cap.
#define SPARSEKIT_NM_MMA_PATTERNS(X) X(2, 1) X(4, 1) X(4, 2) X(8, 1) X(8, 2) X(8, 3) X(8, 4) X(16, 8)

inline bool nm_mma_pattern(int64_t m, int64_t kept) {
#define SPARSEKIT_NM_MATCH(M_, K_) if (m == M_ && kept == K_) return true;
  SPARSEKIT_NM_MMA_PATTERNS(SPARSEKIT_NM_MATCH)
#undef SPARSEKIT_NM_MATCH
  return false;
}

// Whether nm_mma_kernel takes this call (else decode + dense matmul): a 16-bit type, a built pattern, 1..64
// rows, whole 64-column steps, 16-byte aligned tensors, and a device with mma.m16n8k16 (sm_80 or later).
template <typename T>
bool nm_mma_supported(int64_t m, int64_t kept, int64_t rows, int64_t in_features, const void* x,
                      const void* values, const void* codes, int cc_major) {
  return is_16bit_float<T> && cc_major >= 8 && nm_mma_pattern(m, kept) && rows >= 1 && rows <= kMaxRows &&
         in_features > 0 && in_features % kStepCols == 0 && is_aligned(x, 16) && is_aligned(values, 16) &&
         is_aligned(codes, 16);
}

// Launches nm_mma_kernel with `plan` (workspace zeroed by the caller when plan.splits > 1, then finalize).
// Returns false, launching nothing, for a type or pattern it is not built for. Check cudaGetLastError().
template <typename T>
bool launch_nm_linear(NMArgs args, int64_t m, int64_t kept, const NMPlan& plan, cudaStream_t stream) {
  if constexpr (!is_16bit_float<T>) {
    (void)args, (void)m, (void)kept, (void)plan, (void)stream;
    return false;
  } else {
    if (args.rows == 0 || args.out_features == 0 || plan.row_tiles > 0x7FFFFFFF) return false;
    args.row_blocks = plan.row_blocks;
    args.row_warps = plan.row_warps;
    args.steps_per_split = plan.steps_per_split;
    const dim3 grid(static_cast<unsigned>(plan.row_tiles), static_cast<unsigned>(plan.splits));
#define SPARSEKIT_NM_LAUNCH(M_, K_)                                       \
  if (m == M_ && kept == K_) {                                            \
    nm_mma_kernel<T, M_, K_><<<grid, kWarps * 32, 0, stream>>>(args);     \
    return true;                                                          \
  }
    SPARSEKIT_NM_MMA_PATTERNS(SPARSEKIT_NM_LAUNCH)
#undef SPARSEKIT_NM_LAUNCH
    return false;
  }
}

// ---------------------------------------------------------------------------------------------------
// Bitmap: one lane's 64-column tile of one weight row against MR rows of x staged in shared memory.
// ---------------------------------------------------------------------------------------------------
// values[start, start + popcount(bits)) are the tile's non-zeros in column order; xs_tile holds the tile's
// 64 columns of x, MR values per column. Values are read in aligned blocks of 16 bytes (kVec: values' base
// is 16-byte aligned) except a last block reaching past nnz, read element by element.
template <typename T, int MR, bool kVec>
__host__ __device__ inline void bitmap_tile_dot(const T* values, int64_t nnz, int64_t start, uint64_t bits,
                                                const T* xs_tile, float (&acc)[MR]) {
  constexpr int kPerBlock = kVec ? 16 / int(sizeof(T)) : 1;
  const int64_t end = start + popcount64(bits);
  for (int64_t block = start - start % kPerBlock; block < end; block += kPerBlock) {
    T v[kPerBlock];
    if (block + kPerBlock <= nnz) {
      load_once<kPerBlock * int(sizeof(T))>(values + block, v);
    } else {
#pragma unroll
      for (int h = 0; h < kPerBlock; ++h) {
        v[h] = block + h < end && block + h < nnz ? values[block + h] : from_float<T>(0.0f);
      }
    }
#pragma unroll
    for (int h = 0; h < kPerBlock; ++h) {
      const int64_t index = block + h;
      if (index >= start && index < end) {
        const int col = find_first_set(bits);
        bits &= bits - 1;
        const float w = as_float(v[h]);
        using C = typename ChunkType<MR * int(sizeof(T))>::type;  // one shared-memory load of <= 16 bytes
        const C raw = *reinterpret_cast<const C*>(xs_tile + col * MR);
        T xv[MR];
        memcpy(xv, &raw, sizeof(xv));
#pragma unroll
        for (int r = 0; r < MR; ++r) acc[r] = fmaf(w, as_float(xv[r]), acc[r]);
      }
    }
  }
}

// Stops the kernel: the extension (sparse_gemv.cu) defines it as torch's CUDA_KERNEL_ASSERT_MSG, so the host sees
// "device-side assert triggered"; .ci/nvcc_check, which compiles this header without torch, gets __trap().
#ifndef SPARSEKIT_DEVICE_FAIL
#define SPARSEKIT_DEVICE_FAIL(msg) __trap()
#endif

// row_offsets is checked per row, not trusted. Before a row is read: its span [row_offsets[o], row_offsets[o + 1])
// lies in [0, nnz], row 0 starts at 0 and the last row ends at nnz (bitmap_span_ok). After: its bits took exactly
// the span's values. Reads stay in [span start, nnz) in between (bitmap_tile_dot). A row that fails either check
// stops the kernel with a device-side assert (as torch's own index checks do: reporting it to the host as an
// exception would need a sync, which CUDA graph capture and decode latency rule out). The message names no row
// (a printf with arguments needs a stack frame in every kernel that may call it): the assert's block and thread
// give it, output feature = block * kBitmapWarps + thread / 32 in bitmap_gemv_kernel.
__host__ __device__ inline bool bitmap_span_ok(const int64_t* row_offsets, int64_t o, int64_t out_features,
                                               int64_t nnz) {
  const int64_t start = row_offsets[o], end = row_offsets[o + 1];
  return 0 <= start && start <= end && end <= nnz && (o != 0 || start == 0) && (o != out_features - 1 || end == nnz);
}

struct BitmapArgs {
  const void* x;              // (rows, in_features) contiguous
  const uint64_t* bitmask;    // (out_features, tiles)
  const void* values;         // (nnz,)
  const int64_t* row_offsets; // (out_features + 1,)
  const void* bias;           // (out_features,) or nullptr
  void* y;                    // (rows, out_features) contiguous
  int64_t rows, out_features, in_features, tiles, nnz;
  bool passes_on_x;  // grid (passes, output blocks): set by launch_bitmap_linear
};

template <typename T, int MR, bool kVec>
__global__ void __launch_bounds__(kBitmapWarps * 32) bitmap_gemv_kernel(const BitmapArgs p) {
  static_assert(MR * sizeof(T) <= 16 && (MR & (MR - 1)) == 0, "one x load of at most 16 bytes per column");
  __shared__ __align__(16) T xs[kBitmapChunkCols * MR];  // (column, row of x): 32 KB at most
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Passes over the rows of x are the fastest grid dimension where the output blocks fit in grid.y: the CTAs
  // of one block of weight rows then run together and its weight comes from DRAM once, the other passes
  // reading it from L2 (with passes slowest, a weight larger than L2 would be streamed from DRAM once per pass).
  const int64_t out_block = p.passes_on_x ? blockIdx.y : blockIdx.x;
  const int64_t pass = p.passes_on_x ? blockIdx.x : blockIdx.z;
  const int64_t o = out_block * kBitmapWarps + warp;
  const bool live = o < p.out_features;
  const int64_t n0 = pass * MR;  // first row of x of this pass
  const T* x = static_cast<const T*>(p.x);
  const T* values = static_cast<const T*>(p.values);

  float acc[MR];
#pragma unroll
  for (int r = 0; r < MR; ++r) acc[r] = 0.0f;
  if (live && !bitmap_span_ok(p.row_offsets, o, p.out_features, p.nnz)) {
    SPARSEKIT_DEVICE_FAIL("sparsekit::bitmap_linear: row_offsets out of [0, nnz] or decreasing");
  }
  int64_t base = live ? p.row_offsets[o] : 0;  // index of the row's first non-zero of the current slice

  for (int64_t c0 = 0; c0 < p.in_features; c0 += kBitmapChunkCols) {
    __syncthreads();  // the previous slice's readers are done
    for (int i = threadIdx.x; i < kBitmapChunkCols * MR; i += blockDim.x) {
      const int r = i / kBitmapChunkCols, col = i % kBitmapChunkCols;  // consecutive threads: consecutive columns
      const int64_t n = n0 + r, c = c0 + col;
      xs[col * MR + r] = n < p.rows && c < p.in_features ? x[n * p.in_features + c] : from_float<T>(0.0f);
    }
    __syncthreads();
    if (live) {
      const int64_t tile = c0 / kTile + lane;
      uint64_t bits =
          tile < p.tiles ? __ldcs(reinterpret_cast<const unsigned long long*>(p.bitmask) + o * p.tiles + tile) : 0ull;
      // bits past in_features name no column and take no value (the reference ignores them; a stray one in the
      // last row would read past nnz)
      if (tile == p.tiles - 1 && p.in_features % kTile != 0) bits &= (1ull << (p.in_features % kTile)) - 1;
      const int count = popcount64(bits);
      int inclusive = count;  // warp scan: this lane's tile starts after the lower lanes' non-zeros
#pragma unroll
      for (int d = 1; d < 32; d *= 2) {
        const int lower = __shfl_up_sync(0xFFFFFFFFu, inclusive, d);
        if (lane >= d) inclusive += lower;
      }
      const int total = __shfl_sync(0xFFFFFFFFu, inclusive, 31);
      bitmap_tile_dot<T, MR, kVec>(values, p.nnz, base + inclusive - count, bits, xs + lane * kTile * MR, acc);
      base += total;
    }
  }
  if (!live) return;
  if (base != p.row_offsets[o + 1]) {
    SPARSEKIT_DEVICE_FAIL("sparsekit::bitmap_linear: row_offsets does not match the bitmask's popcounts");
  }
#pragma unroll
  for (int r = 0; r < MR; ++r) {
#pragma unroll
    for (int d = 16; d > 0; d /= 2) acc[r] += __shfl_xor_sync(0xFFFFFFFFu, acc[r], d);
  }
  if (lane == 0) {
    const float b = p.bias != nullptr ? as_float(static_cast<const T*>(p.bias)[o]) : 0.0f;
#pragma unroll
    for (int r = 0; r < MR; ++r) {
      if (n0 + r < p.rows) static_cast<T*>(p.y)[(n0 + r) * p.out_features + o] = from_float<T>(acc[r] + b);
    }
  }
}

// rows in 1..kMaxRows (more: decode + dense matmul). Check cudaGetLastError() afterwards.
template <typename T>
void launch_bitmap_linear(const BitmapArgs& args, cudaStream_t stream) {
  if (args.rows == 0 || args.out_features == 0) return;
  constexpr int kMaxMR = 16 / int(sizeof(T));
  int mr = 1;
  while (mr < kMaxMR && mr < args.rows) mr *= 2;
  const int64_t out_blocks = ceil_div(args.out_features, kBitmapWarps);
  const int64_t passes = ceil_div(args.rows, mr);
  BitmapArgs a = args;
  a.passes_on_x = out_blocks <= 65535;  // grid.y's limit; beyond it (over 1M outputs) the passes go on z
  const dim3 grid = a.passes_on_x ? dim3(static_cast<unsigned>(passes), static_cast<unsigned>(out_blocks), 1)
                                  : dim3(static_cast<unsigned>(out_blocks), 1, static_cast<unsigned>(passes));
  const dim3 block(kBitmapWarps * 32);
  const bool vec = is_aligned(args.values, 16);
  auto go = [&](auto mr_tag) {
    constexpr int kMR = decltype(mr_tag)::value;
    if (vec) {
      bitmap_gemv_kernel<T, kMR, true><<<grid, block, 0, stream>>>(a);
    } else {
      bitmap_gemv_kernel<T, kMR, false><<<grid, block, 0, stream>>>(a);
    }
  };
  if (mr == 1) {
    go(std::integral_constant<int, 1>{});
  } else if (mr == 2) {
    go(std::integral_constant<int, 2>{});
  } else if constexpr (kMaxMR >= 4) {
    if (mr == 4) {
      go(std::integral_constant<int, 4>{});
    } else if constexpr (kMaxMR >= 8) {
      go(std::integral_constant<int, 8>{});
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Fallback pieces: dense decode (into zeros) and the split-K workspace rounding.
// ---------------------------------------------------------------------------------------------------
template <typename T>
__global__ void nm_decode_kernel(const T* __restrict__ values, const uint8_t* __restrict__ codes,
                                 T* __restrict__ dense, int64_t out_features, int64_t in_features,
                                 int64_t kept_per_row, int64_t code_width, int m, int kept, int bits) {
  const int64_t total = out_features * kept_per_row;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / kept_per_row, j = i % kept_per_row, bit = j * bits;
    const int code = (codes[r * code_width + bit / 8] >> (bit % 8)) & ((1 << bits) - 1);
    // codes are trusted, but one >= m (possible for m = 3 and 5..15, never from pack_nm) would write past
    // its group and, in the last row, past the tensor: drop it instead (the CPU decode raises on it)
    if (code < m) dense[r * in_features + (j / kept) * m + code] = values[i];
  }
}

template <typename T>
__global__ void bitmap_decode_kernel(const uint64_t* __restrict__ bitmask, const T* __restrict__ values,
                                     const int64_t* __restrict__ row_offsets, T* __restrict__ dense,
                                     int64_t out_features, int64_t in_features, int64_t tiles, int64_t nnz) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / 32;
  for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < out_features; r += warps) {
    // row_offsets checked as in bitmap_gemv_kernel (bits past in_features were cleared by the caller)
    if (!bitmap_span_ok(row_offsets, r, out_features, nnz)) {
      SPARSEKIT_DEVICE_FAIL("sparsekit::bitmap_unpack: row_offsets out of [0, nnz] or decreasing");
    }
    int64_t base = row_offsets[r];
    for (int64_t t0 = 0; t0 < tiles; t0 += 32) {
      const int64_t tile = t0 + lane;
      uint64_t bits = tile < tiles ? bitmask[r * tiles + tile] : 0ull;
      const int count = popcount64(bits);
      int inclusive = count;
#pragma unroll
      for (int d = 1; d < 32; d *= 2) {
        const int lower = __shfl_up_sync(0xFFFFFFFFu, inclusive, d);
        if (lane >= d) inclusive += lower;
      }
      for (int64_t k = base + inclusive - count; bits != 0 && k < nnz; ++k, bits &= bits - 1) {
        dense[r * in_features + tile * kTile + find_first_set(bits)] = values[k];
      }
      base += __shfl_sync(0xFFFFFFFFu, inclusive, 31);
    }
    if (base != row_offsets[r + 1]) {
      SPARSEKIT_DEVICE_FAIL("sparsekit::bitmap_unpack: row_offsets does not match the bitmask's popcounts");
    }
  }
}

// y (rows, out_features) <- workspace (out_features, workspace_rows), rounded once.
template <typename T>
__global__ void finalize_kernel(const float* __restrict__ workspace, T* __restrict__ y, int64_t rows,
                                int64_t out_features, int64_t workspace_rows) {
  const int64_t count = rows * out_features;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / out_features, o = i % out_features;
    y[i] = from_float<T>(workspace[o * workspace_rows + n]);
  }
}

inline unsigned grid_for(int64_t work, int threads, int num_sms) {
  const int64_t blocks = ceil_div(work, threads), cap = int64_t(num_sms) * 8;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks > cap ? cap : blocks);
}

// dense: (out_features, in_features) zeros. Check cudaGetLastError() afterwards.
template <typename T>
void launch_nm_decode(const T* values, const uint8_t* codes, T* dense, int64_t out_features, int64_t in_features,
                      int64_t m, int64_t kept, int num_sms, cudaStream_t stream) {
  const int64_t kept_per_row = in_features / m * kept;
  if (out_features == 0 || kept_per_row == 0) return;
  const int bits = m <= 4 ? 2 : 4;
  const int64_t code_width = (kept_per_row * bits + 7) / 8;
  nm_decode_kernel<T><<<grid_for(out_features * kept_per_row, 256, num_sms), 256, 0, stream>>>(
      values, codes, dense, out_features, in_features, kept_per_row, code_width, static_cast<int>(m),
      static_cast<int>(kept), bits);
}

template <typename T>
void launch_bitmap_decode(const uint64_t* bitmask, const T* values, const int64_t* row_offsets, T* dense,
                          int64_t out_features, int64_t in_features, int64_t nnz, int num_sms, cudaStream_t stream) {
  const int64_t tiles = ceil_div(in_features, kTile);
  if (out_features == 0 || tiles == 0) return;
  bitmap_decode_kernel<T><<<grid_for(out_features * 32, 256, num_sms), 256, 0, stream>>>(
      bitmask, values, row_offsets, dense, out_features, in_features, tiles, nnz);
}

// workspace: (out_features, 8 * plan.row_blocks) as nm_mma_kernel left it; y: (rows, out_features).
template <typename T>
void launch_finalize(const float* workspace, T* y, int64_t rows, int64_t out_features, int64_t workspace_rows,
                     int num_sms, cudaStream_t stream) {
  if (rows == 0 || out_features == 0) return;
  finalize_kernel<T><<<grid_for(rows * out_features, 256, num_sms), 256, 0, stream>>>(workspace, y, rows,
                                                                                       out_features, workspace_rows);
}

}  // namespace gemv
}  // namespace cuda
}  // namespace sparsekit

// .ci/nvcc_check instantiates every template through SPARSEKIT_<NAME>_INSTANTIATE(T); the tensor-core
// kernels exist for the 16-bit types only (launch_nm_linear<float/double> returns false).
#define SPARSEKIT_SPARSE_GEMV_INSTANTIATE(T)                                                                     \
  template bool sparsekit::cuda::gemv::launch_nm_linear<T>(sparsekit::cuda::gemv::NMArgs, int64_t, int64_t,    \
                                                           const sparsekit::cuda::gemv::NMPlan&, cudaStream_t); \
  template bool sparsekit::cuda::gemv::nm_mma_supported<T>(int64_t, int64_t, int64_t, int64_t, const void*,    \
                                                           const void*, const void*, int);                     \
  template void sparsekit::cuda::gemv::launch_bitmap_linear<T>(const sparsekit::cuda::gemv::BitmapArgs&,       \
                                                               cudaStream_t);                                  \
  template void sparsekit::cuda::gemv::launch_nm_decode<T>(const T*, const uint8_t*, T*, int64_t, int64_t,     \
                                                           int64_t, int64_t, int, cudaStream_t);               \
  template void sparsekit::cuda::gemv::launch_bitmap_decode<T>(const uint64_t*, const T*, const int64_t*, T*,  \
                                                               int64_t, int64_t, int64_t, int, cudaStream_t);  \
  template void sparsekit::cuda::gemv::launch_finalize<T>(const float*, T*, int64_t, int64_t, int64_t, int,      \
                                                          cudaStream_t);
