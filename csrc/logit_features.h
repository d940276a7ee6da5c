// Logit features of the SLM's last prefill position: the uncertainty signals the router reads.
#pragma once
#include <cstdint>

namespace hera {

// Columns of the features output, in order.
constexpr int kNumLogitFeatures = 3;  // entropy (nats), top-1 probability, top1 - top2 probability

// logits: row-major [batch, vocab] float32; out: row-major [batch, kNumLogitFeatures].
// Reads each row from memory once (chunked online max and sums of exponentials).
// Throws std::invalid_argument (ValueError in Python) for NaN, +inf, or a row that is all -inf.
// Pure C++: callers release the GIL around it.
void logit_features(const float* logits, int64_t batch, int64_t vocab, float* out);

}  // namespace hera
