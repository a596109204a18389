// CPU kernels for sparsekit::nm_mask and sparsekit::rowwise_prune_mask.
//
// Both return a torch.bool keep-mask (True = weight kept) of the score's shape and must agree bit for bit
// with sparsekit/ops/reference.py, which ranks scores with torch.sort(..., stable=True) and prunes the
// lowest-ranked entries. That ranking is the total order on (value, column index):
//   * values compare numerically, and -0.0 == +0.0 (torch.sort does not separate them);
//   * NaN (of either sign, any payload) is larger than every number, +inf included;
//   * equal values (NaNs among themselves too) rank by column index: the lower index is pruned first.
//
// Values are first mapped to unsigned "order bits" whose integer order is exactly that value order (the
// IEEE sign-flip trick, with -0.0 and every NaN canonicalised first), so all comparisons below are integer
// compares with no NaN special cases. float16 and bfloat16 are widened to float first, which is exact.
//
// * N:M groups (m <= 16): the rank of entry i in its group is #{j < i: key_j <= key_i} + #{j > i:
//   key_j < key_i} (its position in the stable ascending sort); it is pruned iff rank < n. m = 4 and 8
//   are unrolled at compile time.
// * Rows and long groups: std::nth_element finds the order bits t of the k-th smallest value (average
//   O(len), no full sort); every entry below t is pruned, and of the entries equal to t the first
//   (k - #below) in index order, which is exactly the stable sort's choice.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace sparsekit {
namespace {

// Groups up to this long are ranked by counting (O(m^2) integer compares, no scratch); longer ones select.
constexpr int64_t kRankByCountingMaxLen = 16;

// About this many scores per parallel_for task.
constexpr int64_t kScoresPerTask = 16384;

inline uint32_t order_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t magnitude = u & 0x7FFFFFFFu;
  if (magnitude == 0) u = 0;                                     // -0.0 -> +0.0
  u ^= static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u;  // negative: ~u, else set sign
  return magnitude > 0x7F800000u ? 0xFFFFFFFFu : u;              // NaN above +inf (0xFF800000)
}

inline uint64_t order_bits(double v) {
  uint64_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint64_t magnitude = u & 0x7FFFFFFFFFFFFFFFull;
  if (magnitude == 0) u = 0;
  u ^= static_cast<uint64_t>(static_cast<int64_t>(u) >> 63) | 0x8000000000000000ull;
  return magnitude > 0x7FF0000000000000ull ? 0xFFFFFFFFFFFFFFFFull : u;
}

// Order bits of any score dtype: float64 keeps its 64 bits, the rest go through float (exact).
template <typename scalar_t>
using OrderBits = std::conditional_t<std::is_same_v<scalar_t, double>, uint64_t, uint32_t>;

template <typename scalar_t>
inline OrderBits<scalar_t> key_of(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return order_bits(v);
  } else {
    return order_bits(static_cast<float>(v));
  }
}

// keep[i] = (stable ascending rank of values[i] within values[0, len)) >= num_pruned, for len <= 16.
// kLen > 0 fixes the length at compile time (unrolled); kLen == 0 takes it from len.
template <int kLen, typename scalar_t>
inline void rank_group(const scalar_t* values, int64_t len, int64_t num_pruned, bool* keep) {
  using U = OrderBits<scalar_t>;
  const int64_t n = kLen > 0 ? kLen : len;
  U key[kLen > 0 ? kLen : kRankByCountingMaxLen];
  for (int64_t i = 0; i < n; ++i) key[i] = key_of(values[i]);
  for (int64_t i = 0; i < n; ++i) {
    int64_t rank = 0;
    for (int64_t j = 0; j < i; ++j) rank += key[j] <= key[i];
    for (int64_t j = i + 1; j < n; ++j) rank += key[j] < key[i];
    keep[i] = rank >= num_pruned;
  }
}

// Same result as rank_group for any len, in average O(len). scratch: at least len entries.
template <typename scalar_t>
void select_group(const scalar_t* values, int64_t len, int64_t num_pruned, OrderBits<scalar_t>* scratch,
                  bool* keep) {
  using U = OrderBits<scalar_t>;
  if (num_pruned <= 0 || num_pruned >= len) {
    std::fill(keep, keep + len, num_pruned <= 0);
    return;
  }
  for (int64_t i = 0; i < len; ++i) scratch[i] = key_of(values[i]);
  // scratch[num_pruned - 1] becomes the largest pruned value t; everything before it is <= t.
  std::nth_element(scratch, scratch + (num_pruned - 1), scratch + len);
  const U t = scratch[num_pruned - 1];
  int64_t below = 0;
  for (int64_t i = 0; i < num_pruned - 1; ++i) below += scratch[i] < t;
  int64_t ties_to_prune = num_pruned - below;  // >= 1: t itself is pruned
  for (int64_t i = 0; i < len; ++i) {
    const U k = key_of(values[i]);
    bool pruned = k < t;
    if (k == t && ties_to_prune > 0) {
      pruned = true;
      --ties_to_prune;
    }
    keep[i] = !pruned;
  }
}

template <int kLen, typename scalar_t>
void nm_groups_by_rank(const scalar_t* src, int64_t groups, int64_t n, int64_t m, bool* dst) {
  const int64_t grain = std::max<int64_t>(1, kScoresPerTask / m);
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) rank_group<kLen>(src + g * m, m, n, dst + g * m);
  });
}

void check_score(const at::Tensor& score, const char* op) {
  TORCH_CHECK(score.device().is_cpu(), "sparsekit::", op, ": the CPU kernel got a tensor on ",
              score.device());
  TORCH_CHECK(score.dim() == 2, "sparsekit::", op, ": score must be 2-D (rows, cols), got shape ",
              score.sizes());
  const auto dt = score.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              "sparsekit::", op, ": score must be float32, float16, bfloat16 or float64, got ", dt);
}

at::Tensor nm_mask_cpu(const at::Tensor& score, int64_t n, int64_t m) {
  check_score(score, "nm_mask");
  TORCH_CHECK(m >= 1, "sparsekit::nm_mask: N:M pattern needs M >= 1, got M=", m);
  TORCH_CHECK(0 <= n && n < m, "sparsekit::nm_mask: N:M pattern needs 0 <= N < M, got ", n, ":", m);
  const int64_t rows = score.size(0), cols = score.size(1);
  TORCH_CHECK(cols % m == 0, "sparsekit::nm_mask: N:M pattern ", n, ":", m, ": M=", m,
              " does not divide the width ", cols, " (shape ", score.sizes(), ")");

  const at::Tensor s = score.contiguous();
  if (rows == 0 || cols == 0 || n == 0) return at::ones({rows, cols}, s.options().dtype(at::kBool));
  at::Tensor keep = at::empty({rows, cols}, s.options().dtype(at::kBool));

  const int64_t groups = rows * (cols / m);  // consecutive in the contiguous layout
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "sparsekit_nm_mask", [&] {
    const scalar_t* src = s.const_data_ptr<scalar_t>();
    bool* dst = keep.data_ptr<bool>();
    if (m == 4) {
      nm_groups_by_rank<4>(src, groups, n, m, dst);
    } else if (m == 8) {
      nm_groups_by_rank<8>(src, groups, n, m, dst);
    } else if (m <= kRankByCountingMaxLen) {
      nm_groups_by_rank<0>(src, groups, n, m, dst);
    } else {
      const int64_t grain = std::max<int64_t>(1, kScoresPerTask / m);
      at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
        std::vector<OrderBits<scalar_t>> scratch(static_cast<size_t>(m));
        for (int64_t g = begin; g < end; ++g) select_group(src + g * m, m, n, scratch.data(), dst + g * m);
      });
    }
  });
  return keep;
}

at::Tensor rowwise_prune_mask_cpu(const at::Tensor& score, int64_t num_pruned) {
  check_score(score, "rowwise_prune_mask");
  const int64_t rows = score.size(0), cols = score.size(1);
  TORCH_CHECK(0 <= num_pruned && num_pruned <= cols, "sparsekit::rowwise_prune_mask: num_pruned must be in [0, ",
              cols, "] for shape ", score.sizes(), ", got ", num_pruned);

  const at::Tensor s = score.contiguous();
  if (rows == 0 || cols == 0 || num_pruned == 0) return at::ones({rows, cols}, s.options().dtype(at::kBool));
  at::Tensor keep = at::empty({rows, cols}, s.options().dtype(at::kBool));

  // Rows are split across threads; a single long row (a whole-matrix threshold via score.reshape(1, -1))
  // therefore runs on one thread.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "sparsekit_rowwise_prune_mask", [&] {
    const scalar_t* src = s.const_data_ptr<scalar_t>();
    bool* dst = keep.data_ptr<bool>();
    const int64_t grain = std::max<int64_t>(1, kScoresPerTask / cols);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<OrderBits<scalar_t>> scratch(static_cast<size_t>(cols));
      for (int64_t r = begin; r < end; ++r) {
        select_group(src + r * cols, cols, num_pruned, scratch.data(), dst + r * cols);
      }
    });
  });
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("nm_mask", TORCH_FN(nm_mask_cpu));
  m.impl("rowwise_prune_mask", TORCH_FN(rowwise_prune_mask_cpu));
}

}  // namespace sparsekit
