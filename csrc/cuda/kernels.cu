#include "kernels.cuh"

#include <cuda_runtime.h>

#include <cmath>

namespace hera {
namespace cuda {
namespace {

constexpr int kFeatureThreads = 256;  // threads per row: 8 warps keep one SM's loads in flight
constexpr int kWarps = kFeatureThreads / 32;
constexpr int kForestThreads = 128;   // rows per block of the forest kernel
constexpr unsigned kFullMask = 0xffffffffu;
// e^d below this is 0 in float (even as a denormal); such terms are skipped, which also avoids
// 0 * -inf when x - m overflows (logits near +-3e38).
constexpr float kExpMin = -104.0f;

// Partial reduction of a slice of one row. s0/s1 are relative to m: s0 = sum e^(x-m),
// s1 = sum e^(x-m) (x-m); entropy is log S0 - S1 / S0 once the row is done.
struct Partial {
  float m;    // max of the finite-or--inf logits seen (-inf if none)
  float s0;   // sum of e^(x - m)
  float s1;   // sum of e^(x - m) * (x - m)
  float t1;   // largest logit
  float t2;   // second largest (equal to t1 if the max repeats)
  int bad;    // a NaN or +inf was seen
};

__device__ inline void add_logit(Partial& p, float v) {
  if (!(v < INFINITY)) {  // NaN or +inf: the row is rejected, keep the sums finite
    p.bad = 1;
    return;
  }
  p.t2 = fmaxf(p.t2, fminf(p.t1, v));
  p.t1 = fmaxf(p.t1, v);
  if (v == -INFINITY) return;  // masked token: probability 0
  if (v > p.m) {
    const float delta = p.m - v;  // -inf on the first finite logit: the sums are still 0
    if (delta < kExpMin) {
      p.s0 = p.s1 = 0.0f;
    } else {  // shift the sums to the new max: e^(x-v) = e^(x-m) e^(m-v)
      const float f = expf(delta);
      p.s1 = f * (p.s1 + delta * p.s0);
      p.s0 = f * p.s0;
    }
    p.m = v;
  }
  const float d = v - p.m;
  if (d < kExpMin) return;
  const float e = expf(d);
  p.s0 += e;
  p.s1 += e * d;
}

__device__ inline void merge(Partial& a, const Partial& b) {
  a.bad |= b.bad;
  const float lo = fminf(a.t1, b.t1);
  a.t2 = fmaxf(lo, fmaxf(a.t2, b.t2));
  a.t1 = fmaxf(a.t1, b.t1);
  if (b.m == -INFINITY) return;
  if (a.m == -INFINITY) {
    a.m = b.m;
    a.s0 = b.s0;
    a.s1 = b.s1;
    return;
  }
  // Fold the smaller-max side into the larger: e^(x-m_lo) = e^(x-m_hi) e^(m_lo-m_hi).
  float m_hi = a.m, s0_hi = a.s0, s1_hi = a.s1, m_lo = b.m, s0_lo = b.s0, s1_lo = b.s1;
  if (b.m > a.m) {
    m_hi = b.m, s0_hi = b.s0, s1_hi = b.s1, m_lo = a.m, s0_lo = a.s0, s1_lo = a.s1;
  }
  const float delta = m_lo - m_hi;
  a.m = m_hi;
  if (delta < kExpMin) {  // the smaller side's terms are all 0 at the larger max
    a.s0 = s0_hi;
    a.s1 = s1_hi;
    return;
  }
  const float f = expf(delta);
  a.s0 = s0_hi + f * s0_lo;
  a.s1 = s1_hi + f * (s1_lo + delta * s0_lo);
}

__device__ inline Partial shfl_xor(const Partial& p, int lane_mask) {
  Partial q;
  q.m = __shfl_xor_sync(kFullMask, p.m, lane_mask);
  q.s0 = __shfl_xor_sync(kFullMask, p.s0, lane_mask);
  q.s1 = __shfl_xor_sync(kFullMask, p.s1, lane_mask);
  q.t1 = __shfl_xor_sync(kFullMask, p.t1, lane_mask);
  q.t2 = __shfl_xor_sync(kFullMask, p.t2, lane_mask);
  q.bad = __shfl_xor_sync(kFullMask, p.bad, lane_mask);
  return q;
}

__device__ inline void warp_reduce(Partial& p) {
  for (int off = 16; off > 0; off >>= 1) merge(p, shfl_xor(p, off));
}

// One block per row: strided coalesced reads, per-thread online sums, warp shuffles, then the
// 8 warp results through shared memory.
__global__ void __launch_bounds__(kFeatureThreads)
    logit_features_kernel(const float* __restrict__ logits, int64_t vocab, float* __restrict__ out,
                          int32_t* __restrict__ status) {
  const int64_t row = blockIdx.x;
  const float* x = logits + row * vocab;
  Partial p{-INFINITY, 0.0f, 0.0f, -INFINITY, -INFINITY, 0};
  for (int64_t j = threadIdx.x; j < vocab; j += kFeatureThreads) add_logit(p, __ldg(x + j));
  warp_reduce(p);
  __shared__ Partial warp_result[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_result[warp] = p;
  __syncthreads();
  if (warp != 0) return;
  p = lane < kWarps ? warp_result[lane] : Partial{-INFINITY, 0.0f, 0.0f, -INFINITY, -INFINITY, 0};
  warp_reduce(p);
  if (lane != 0) return;
  float* o = out + row * 3;
  int32_t st = kLogitOk;
  if (p.bad) {
    st = kLogitBadValue;
  } else if (p.m == -INFINITY) {
    st = kLogitAllMasked;
  }
  if (st != kLogitOk) {
    o[0] = o[1] = o[2] = NAN;
  } else {
    const double s0 = p.s0;
    o[0] = static_cast<float>(log(s0) - p.s1 / s0);
    o[1] = static_cast<float>(1.0 / s0);
    // p1 - p2 = (1 - e^(t2 - t1)) / S0; expm1 keeps close ties exact.
    o[2] = static_cast<float>(-expm1(static_cast<double>(p.t2) - p.t1) / s0);
  }
  if (status != nullptr) status[row] = st;
}

// One thread per row, trees in order (so the float sum matches the CPU and XGBoost). The node
// arrays are shared by all threads and read through the read-only cache.
__global__ void __launch_bounds__(kForestThreads)
    forest_kernel(DeviceForestView f, const float* __restrict__ x, int64_t batch, float* __restrict__ out,
                  bool output_margin) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= batch) return;
  const float* xr = x + row * f.num_feature;
  float acc = f.base_margin;
  for (int32_t t = 0; t < f.n_trees; ++t) {
    const int32_t base = __ldg(f.tree_offset + t);
    const int32_t depth = __ldg(f.tree_depth + t);
    const bool complete = __ldg(f.tree_complete + t) != 0;
    int32_t n = 0;  // tree-relative node
    for (int32_t d = 0; d < depth; ++d) {
      const int32_t sp = __ldg(f.split + base + n);
      const float th = __ldg(f.threshold + base + n);
      const float v = xr[sp & 0x7fffffff];
      // XGBoost's rule: NaN follows the default direction, else left iff v < threshold.
      const int32_t go_right = !(v < th) & !(isnan(v) & static_cast<int32_t>(static_cast<uint32_t>(sp) >> 31));
      const int32_t l = complete ? 2 * n + 1 : __ldg(f.left + base + n) - base;
      n = l + go_right;
    }
    acc += __ldg(f.leaf_value + base + n);
  }
  out[row] = (output_margin || !f.sigmoid) ? acc : 1.0f / (1.0f + expf(-acc));
}

}  // namespace

cudaError_t launch_logit_features(const float* logits, int64_t batch, int64_t vocab, float* out, int32_t* status,
                                  cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  if (batch < 0 || vocab < 1 || batch > 0x7fffffff) return cudaErrorInvalidValue;
  logit_features_kernel<<<static_cast<unsigned>(batch), kFeatureThreads, 0, stream>>>(logits, vocab, out, status);
  return cudaGetLastError();
}

cudaError_t launch_forest_predict(const DeviceForestView& forest, const float* x, int64_t batch, float* out,
                                  bool output_margin, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  if (batch < 0) return cudaErrorInvalidValue;
  const int64_t blocks = (batch + kForestThreads - 1) / kForestThreads;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  forest_kernel<<<static_cast<unsigned>(blocks), kForestThreads, 0, stream>>>(forest, x, batch, out, output_margin);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace hera
