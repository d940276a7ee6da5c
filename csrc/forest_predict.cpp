// The forest's inference (Forest::predict): rows walked through every tree in blocks, an AVX2
// path where the CPU has it (chosen at run time), a scalar one otherwise. Loading: forest.cpp.
#include "forest.h"

#include <cmath>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace hera {
namespace {

// Rows walked together through one tree. Their walks are independent, so the core overlaps
// them (each step is a dependent load chain: node -> x -> compare -> next node); 64 rows of 32
// features (8 KiB) stay in L1 across all trees, and each tree's nodes are read once per block.
constexpr int64_t kRowBlock = 64;
// Rows per AVX2 vector.
constexpr int64_t kLanes = 8;

// XGBoost's rule: missing (NaN) follows the default direction, otherwise left iff v < threshold.
// NaN < t is false, so only NaN going left needs the second term; leaf and pass-through nodes
// have a NaN threshold and go right by default, so they always step right.
// kMissing = false: the caller checked the rows hold no NaN, so the default direction never
// matters and a step is one compare.
template <bool kMissing>
inline int32_t goes_right(float v, float threshold, int32_t split) {
  if (!kMissing) return !(v < threshold);
  const int32_t missing_left = static_cast<int32_t>(static_cast<uint32_t>(split) >> 31);
  return !(v < threshold) & !((v != v) & missing_left);
}

// True if any of the n floats is NaN; picks the walk without NaN checks. Integer compares on the
// bits (NaN: exponent all ones, mantissa nonzero) so gcc vectorizes the scan.
inline bool any_nan(const float* x, int64_t n) {
  int32_t nan = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, x + i, sizeof b);
    nan |= (b & 0x7fffffffu) > 0x7f800000u;
  }
  return nan != 0;
}

// Scalar walk of rows [0, rows) of a block through every tree, adding leaf values into acc in
// tree order (the order XGBoost adds them, so the float sums agree bit for bit). NR > 0 fixes
// the row count at compile time so the loops unroll.
template <int64_t NR, bool kMissing>
void walk_scalar(const Forest& f, const float* x, int64_t rows_dyn, float* acc) {
  const int64_t rows = NR > 0 ? NR : rows_dyn;
  const int64_t nf = f.num_feature;
  const int32_t n_trees = f.n_trees();
  int32_t idx[kRowBlock];
  for (int32_t t = 0; t < n_trees; ++t) {
    const int32_t base = f.tree_offset[t];
    const int32_t* split = f.split.data() + base;
    const float* threshold = f.threshold.data() + base;
    const int32_t depth = f.tree_depth[t];
    for (int64_t r = 0; r < rows; ++r) idx[r] = 0;
    if (f.tree_complete[t]) {
      for (int32_t d = 0; d < depth; ++d) {
        for (int64_t r = 0; r < rows; ++r) {
          const int32_t n = idx[r];
          const float v = x[r * nf + (split[n] & kSplitColumn)];
          idx[r] = 2 * n + 1 + goes_right<kMissing>(v, threshold[n], split[n]);
        }
      }
    } else {
      const int32_t* left = f.left.data() + base;
      for (int32_t d = 0; d < depth; ++d) {
        for (int64_t r = 0; r < rows; ++r) {
          const int32_t n = idx[r];
          const float v = x[r * nf + (split[n] & kSplitColumn)];
          idx[r] = left[n] - base + goes_right<kMissing>(v, threshold[n], split[n]);
        }
      }
    }
    const float* leaf_value = f.leaf_value.data() + base;
    for (int64_t r = 0; r < rows; ++r) acc[r] += leaf_value[idx[r]];
  }
}

template <bool kMissing>
void walk_scalar_any(const Forest& f, const float* x, int64_t rows, float* acc) {
  if (rows == kRowBlock) {
    walk_scalar<kRowBlock, kMissing>(f, x, rows, acc);
  } else if (rows == 1) {
    walk_scalar<1, kMissing>(f, x, rows, acc);
  } else if (rows > 0) {
    walk_scalar<0, kMissing>(f, x, rows, acc);
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(HERA_FOREST_NO_SIMD)
#define HERA_FOREST_AVX2 1
// The same walk, 8 rows per vector with AVX2 gathers: a step is 3 gathers (split, threshold,
// x) and a few vector ops for 8 rows, against ~20 scalar instructions per row. Compiled for
// AVX2 only in this function and chosen at run time, so the module still loads on any x86-64.
// `groups` vectors of 8 rows (at most kRowBlock rows) walk together, so their gathers overlap.
template <bool kMissing>
__attribute__((target("avx2"))) void walk_avx2(const Forest& f, const float* x, int64_t groups, float* acc) {
  const int32_t nf = f.num_feature;
  const int32_t n_trees = f.n_trees();
  constexpr int64_t kGroups = kRowBlock / kLanes;
  __m256i row_offset[kGroups];  // r * nf for the 8 rows of each group (x index of column 0)
  __m256 sum[kGroups];
  for (int64_t g = 0; g < groups; ++g) {
    const int32_t r0 = static_cast<int32_t>(g * kLanes);
    row_offset[g] = _mm256_mullo_epi32(_mm256_setr_epi32(r0, r0 + 1, r0 + 2, r0 + 3, r0 + 4, r0 + 5, r0 + 6, r0 + 7),
                                       _mm256_set1_epi32(nf));
    sum[g] = _mm256_loadu_ps(acc + g * kLanes);
  }
  const __m256i column_mask = _mm256_set1_epi32(kSplitColumn);
  const __m256i one = _mm256_set1_epi32(1);
  __m256i idx[kGroups];
  for (int32_t t = 0; t < n_trees; ++t) {
    const int32_t base = f.tree_offset[t];
    const int* split = f.split.data() + base;
    const float* threshold = f.threshold.data() + base;
    const int* left = f.left.data() + base;
    const __m256i left_shift = _mm256_set1_epi32(-base);  // absolute -> tree-relative child index
    const bool complete = f.tree_complete[t];
    for (int64_t g = 0; g < groups; ++g) idx[g] = _mm256_setzero_si256();
    for (int32_t d = f.tree_depth[t]; d > 0; --d) {
      for (int64_t g = 0; g < groups; ++g) {
        const __m256i sp = _mm256_i32gather_epi32(split, idx[g], 4);
        const __m256 th = _mm256_i32gather_ps(threshold, idx[g], 4);
        const __m256 v = _mm256_i32gather_ps(x, _mm256_add_epi32(row_offset[g], _mm256_and_si256(sp, column_mask)), 4);
        // go_left = v < t (ordered) | (NaN & missing-left), as all-ones lanes (-1).
        __m256i go_left = _mm256_castps_si256(_mm256_cmp_ps(v, th, _CMP_LT_OQ));
        if (kMissing) {
          const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
          go_left = _mm256_or_si256(go_left, _mm256_and_si256(nan, _mm256_srai_epi32(sp, 31)));
        }
        // child = left + 1 + go_left: left is 2i+1 in a complete tree, else loaded.
        const __m256i l = complete ? _mm256_add_epi32(_mm256_add_epi32(idx[g], idx[g]), one)
                                   : _mm256_add_epi32(_mm256_i32gather_epi32(left, idx[g], 4), left_shift);
        idx[g] = _mm256_add_epi32(_mm256_add_epi32(l, one), go_left);
      }
    }
    const float* leaf_value = f.leaf_value.data() + base;
    for (int64_t g = 0; g < groups; ++g) sum[g] = _mm256_add_ps(sum[g], _mm256_i32gather_ps(leaf_value, idx[g], 4));
  }
  for (int64_t g = 0; g < groups; ++g) _mm256_storeu_ps(acc + g * kLanes, sum[g]);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

}  // namespace

void Forest::predict(const float* x, int64_t batch, float* out, bool output_margin) const {
  float acc[kRowBlock];
#ifdef HERA_FOREST_AVX2
  // Gather indices are int32: a block's x offsets must fit (true unless num_feature > 33M).
  const bool simd = cpu_has_avx2() && int64_t{num_feature} * kRowBlock < (int64_t{1} << 31);
#endif
  for (int64_t b = 0; b < batch; b += kRowBlock) {
    const int64_t nr = batch - b < kRowBlock ? batch - b : kRowBlock;
    for (int64_t r = 0; r < nr; ++r) acc[r] = base_margin;
    const float* xb = x + b * num_feature;
    const bool missing = any_nan(xb, nr * num_feature);
    int64_t done = 0;  // rows of this block already walked
#ifdef HERA_FOREST_AVX2
    if (simd && nr >= kLanes) {
      if (missing) {
        walk_avx2<true>(*this, xb, nr / kLanes, acc);
      } else {
        walk_avx2<false>(*this, xb, nr / kLanes, acc);
      }
      done = nr / kLanes * kLanes;
    }
#endif
    // The rest (and every row without AVX2): the scalar walk, unrolled for the common sizes.
    const int64_t rest = nr - done;
    const float* xr = xb + done * num_feature;
    if (missing) {
      walk_scalar_any<true>(*this, xr, rest, acc + done);
    } else {
      walk_scalar_any<false>(*this, xr, rest, acc + done);
    }
    for (int64_t r = 0; r < nr; ++r) {
      float y = acc[r];
      if (!output_margin && transform == ForestTransform::kSigmoid) y = 1.0f / (1.0f + std::exp(-y));
      out[b + r] = y;
    }
  }
}

}  // namespace hera
