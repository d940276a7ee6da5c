// CUDA kernels for batched subtask scoring: logit features and the tree ensemble.
//
// Same semantics as the CPU code (csrc/features.cpp, csrc/forest.cpp): the features kernel
// reduces each row in one read, the forest kernel walks the same flat node layout (see
// csrc/forest.h) and adds leaves in tree order, so its margins equal the CPU's bit for bit.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace hera {
namespace cuda {

// Row outcome written by the features kernel (status array, one int32 per row).
enum LogitStatus : int32_t {
  kLogitOk = 0,       // features written
  kLogitBadValue = 1, // the row holds NaN or +inf (features are NaN)
  kLogitAllMasked = 2 // every logit is -inf (features are NaN)
};

// A forest in device memory, in the layout of hera::Forest. Pointers are device pointers.
struct DeviceForestView {
  int32_t num_feature;           // columns per input row
  int32_t n_trees;               // trees to add
  float base_margin;             // intercept in margin units
  bool sigmoid;                  // apply 1 / (1 + e^-margin)
  const int32_t* tree_offset;    // [n_trees + 1] first node of each tree
  const int32_t* tree_depth;     // [n_trees] levels to walk
  const uint8_t* tree_complete;  // [n_trees] 1: children of i are 2i+1, 2i+2 (tree-relative)
  const int32_t* split;          // [n_nodes] column in bits 0-30, missing-goes-left in bit 31
  const float* threshold;        // [n_nodes] go left when x < threshold; NaN at leaves
  const int32_t* left;           // [n_nodes] absolute left child (right = left + 1)
  const float* leaf_value;       // [n_nodes] leaf output, margin units
};

// logits: device [batch, vocab] float32 row-major; out: device [batch, 3] (entropy in nats,
// top-1 probability, top1 - top2 probability); status: device [batch] int32 or null. One block
// per row. Asynchronous on `stream`; returns the launch error, if any.
cudaError_t launch_logit_features(const float* logits, int64_t batch, int64_t vocab, float* out, int32_t* status,
                                  cudaStream_t stream);

// x: device [batch, num_feature] float32 (NaN = missing); out: device [batch]. One thread per row.
cudaError_t launch_forest_predict(const DeviceForestView& forest, const float* x, int64_t batch, float* out,
                                  bool output_margin, cudaStream_t stream);

}  // namespace cuda
}  // namespace hera
