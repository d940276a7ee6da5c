#include "logit_features.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

// Let gcc if-convert the clamps in the exponential loop: with trapping math on (the default) it
// turns them into branches around the float multiplies and gives up vectorizing. Nothing here
// reads floating-point exception flags.
#pragma GCC optimize("no-trapping-math")

namespace hera {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
// Independent accumulators per row: 4 SSE, 2 AVX2 or 1 AVX-512 register(s), enough to hide the
// add latency; gcc -O3 vectorizes this width for plain x86-64 (SSE2) without -march=native.
// (32 lanes measured slower on Zen 4.)
constexpr int kLanes = 16;
// Floats per chunk (4 KiB). The chunk is swept twice (max, then exponentials), the second time
// from L1, so memory sees each row once. Small chunks also bound the float lane sums to 64 terms
// before they are folded into double totals (relative error well under 1e-6).
constexpr int64_t kChunk = 1024;
// e^d below this underflows a normal float (e^-87 = 1.6e-38); such tokens count as probability 0,
// which also covers masked (-inf) tokens without a 0 * -inf.
constexpr float kExpMin = -87.0f;

inline float bits_as_float(int32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

inline int32_t float_as_bits(float f) {
  int32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// e^d for d in [kExpMin, 0], branch-free so the loop that calls it vectorizes. Cephes expf:
// Cody-Waite reduction by n*ln2 then a degree-6 polynomial on [-ln2/2, ln2/2]; relative error
// about 1e-7 (std::exp does not vectorize without -ffast-math / libmvec).
inline float exp_nonpositive(float d) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const float t = d * 1.44269504088896341f + kRound;
  const float n = t - kRound;  // round(d / ln2), in [-126, 0]
  float r = d - n * 0.693359375f;  // ln2 split in two: n * hi is exact
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * (r * r) + r + 1.0f;
  // 2^n as float bits: the integer n sits in the mantissa of t.
  const int32_t ni = float_as_bits(t) - float_as_bits(kRound);
  return p * bits_as_float((ni + 127) << 23);
}

// Cold path: find and name the first bad entry of a row, for the error message.
[[noreturn]] void throw_bad_row(const float* x, int64_t vocab, int64_t row) {
  for (int64_t j = 0; j < vocab; ++j) {
    const float v = x[j];
    if (std::isnan(v) || v == kInf) {
      throw std::invalid_argument("logits row " + std::to_string(row) + " column " +
                                  std::to_string(j) + " is " + (std::isnan(v) ? "NaN" : "+inf") +
                                  "; logits must be finite or -inf");
    }
  }
  throw std::invalid_argument("logits row " + std::to_string(row) +
                              " is all -inf; at least one token must be possible");
}

// Running state of one row. Entropy via H = log S0 - S1 / S0 with S0 = sum e^(x-m) and
// S1 = sum e^(x-m) (x-m), m the running max; when m grows the totals are rescaled, so the
// row never needs a separate max pass and probabilities are never materialised.
struct RowState {
  float t1[kLanes];  // per lane: largest logit seen
  float t2[kLanes];  // per lane: second largest (equals t1 when the max repeats)
  int32_t bad[kLanes];  // per lane: nonzero once a NaN or +inf was seen
  float m = -kInf;   // running max over all lanes (the shift of S0 and S1)
  double s0 = 0.0;   // sum of e^(x - m) over the chunks done
  double s1 = 0.0;   // sum of e^(x - m) * (x - m) over the chunks done (<= 0)
};

// First sweep of a chunk: top-2 per lane and the bad-value flag. max/min written as selects that
// map onto maxps/minps (a NaN input leaves the lane unchanged; the flag catches it).
inline void sweep_top2(const float* x, int64_t n, RowState& st) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = x[j + l];
      st.bad[l] |= !(v < kInf);
      const float lo = v < st.t1[l] ? v : st.t1[l];
      st.t2[l] = st.t2[l] < lo ? lo : st.t2[l];
      st.t1[l] = st.t1[l] < v ? v : st.t1[l];
    }
  }
  for (int l = 0; j < n; ++j, ++l) {
    const float v = x[j];
    st.bad[l] |= !(v < kInf);
    const float lo = v < st.t1[l] ? v : st.t1[l];
    st.t2[l] = st.t2[l] < lo ? lo : st.t2[l];
    st.t1[l] = st.t1[l] < v ? v : st.t1[l];
  }
}

// Second sweep of a chunk (from L1): sums of e^(x-m) and e^(x-m)(x-m) for the current max m.
inline void sweep_exp(const float* x, int64_t n, float m, double& s0_out, double& s1_out) {
  float s0[kLanes] = {};
  float s1[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float d = x[j + l] - m;
      const float dc = d < kExpMin ? kExpMin : d;
      float e = exp_nonpositive(dc);
      e = d < kExpMin ? 0.0f : e;
      s0[l] += e;
      s1[l] += e * dc;
    }
  }
  for (int l = 0; j < n; ++j, ++l) {
    const float d = x[j] - m;
    if (d < kExpMin) continue;
    const float e = exp_nonpositive(d);
    s0[l] += e;
    s1[l] += e * d;
  }
  double a0 = 0.0, a1 = 0.0;
  for (int l = 0; l < kLanes; ++l) {
    a0 += s0[l];
    a1 += s1[l];
  }
  s0_out += a0;
  s1_out += a1;
}

// Cloned for x86-64-v4 (AVX-512) and x86-64-v3 (AVX2 + FMA) with a runtime dispatch (ifunc):
// 2-4x the vector width where the CPU has it (about 19 -> 10 us per 49152-logit row on Zen 4),
// while the module still loads on any x86-64.
#if defined(__x86_64__) && defined(__GNUC__)  // aarch64 (Jetson) has no such clones: plain NEON build
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void row_features(const float* x, int64_t vocab, int64_t row, float* out) {
  RowState st;
  for (int l = 0; l < kLanes; ++l) {
    st.t1[l] = -kInf;
    st.t2[l] = -kInf;
    st.bad[l] = 0;
  }
  for (int64_t c = 0; c < vocab; c += kChunk) {
    const int64_t n = vocab - c < kChunk ? vocab - c : kChunk;
    sweep_top2(x + c, n, st);
    float m = st.m;
    for (int l = 0; l < kLanes; ++l) m = m < st.t1[l] ? st.t1[l] : m;
    if (m == -kInf) continue;  // every token so far masked: nothing to add
    if (m > st.m && st.m != -kInf) {
      // Shift the totals from the old max to the new: e^(x-m') = e^(x-m) e^(m-m').
      const double delta = static_cast<double>(st.m) - m;
      const double f = std::exp(delta);
      st.s1 = f * (st.s1 + delta * st.s0);
      st.s0 = f * st.s0;
    }
    st.m = m;
    sweep_exp(x + c, n, m, st.s0, st.s1);
  }
  int32_t bad = 0;
  for (int l = 0; l < kLanes; ++l) bad |= st.bad[l];
  if (bad || st.m == -kInf) throw_bad_row(x, vocab, row);

  // Second largest of the row = second largest of the per-lane (t1, t2) pairs.
  float top1 = -kInf, top2 = -kInf;
  for (int l = 0; l < kLanes; ++l) {
    for (const float v : {st.t1[l], st.t2[l]}) {
      if (v > top1) {
        top2 = top1;
        top1 = v;
      } else if (v > top2) {
        top2 = v;
      }
    }
  }
  const double s0 = st.s0;
  const double p1 = 1.0 / s0;
  // p1 - p2 = (1 - e^(top2 - top1)) / S0; expm1 keeps the margin exact when the top two tie closely.
  const double margin = -std::expm1(static_cast<double>(top2) - top1) / s0;
  out[0] = static_cast<float>(std::log(s0) - st.s1 / s0);
  out[1] = static_cast<float>(p1);
  out[2] = static_cast<float>(margin);
}

}  // namespace

void logit_features(const float* logits, int64_t batch, int64_t vocab, float* out) {
  if (batch < 0 || vocab < 1) throw std::invalid_argument("logits must have shape [batch, vocab>=1]");
  for (int64_t i = 0; i < batch; ++i) {
    row_features(logits + i * vocab, vocab, i, out + i * kNumLogitFeatures);
  }
}

}  // namespace hera
