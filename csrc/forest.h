// Tree-ensemble evaluator for trained XGBoost models: the live router's predictor.
//
// XGBoost stays the trainer and the reference; this loads its JSON model format into flat arrays
// and evaluates a float32 [batch, n_features] batch with no per-call setup, so one row costs
// microseconds instead of XGBoost's ~100 us call floor.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace hera {

constexpr uint32_t kDefaultLeft = 0x80000000u;  // bit of Forest::split: missing goes left
constexpr int32_t kSplitColumn = 0x7fffffff;    // mask of Forest::split: the split column

// What turns the summed margin into the model's output.
enum class ForestTransform : int32_t {
  kIdentity = 0,  // raw margin (reg:squarederror, binary:logitraw, ...)
  kSigmoid = 1,   // 1 / (1 + e^-margin), XGBoost's float formula (binary:logistic, reg:logistic)
};

// A loaded model. Nodes of all trees live in one set of structure-of-arrays; tree t owns
// [tree_offset[t], tree_offset[t+1]), stored breadth-first from its root so a node's two children
// are adjacent (right = left + 1) and a step is `left + go_right`, with no branch. Leaves step to
// themselves (left = self - 1 and a NaN threshold, which always goes right), so every row walks a
// tree for exactly tree_depth levels, which lets the core overlap many rows' walks.
// Shallow trees are padded to complete binary trees (see tree_complete), where the children of
// position i are 2i+1 and 2i+2 and the walk computes them instead of loading `left`.
struct Forest {
  int32_t num_feature = 0;            // columns the model was trained on; predict needs exactly this
  float base_margin = 0.0f;           // intercept in margin space (base_score through the link)
  ForestTransform transform = ForestTransform::kIdentity;  // margin -> output
  std::string objective;              // XGBoost objective name, e.g. "binary:logistic"

  std::vector<int32_t> tree_offset;   // [n_trees + 1] index of each tree's root in the node arrays
  std::vector<int32_t> tree_depth;    // [n_trees] edges from the root to the deepest leaf
  std::vector<uint8_t> tree_complete; // [n_trees] 1: padded to a complete tree of tree_depth

  // Per node. The split column and the missing-value direction share one word so a walk step
  // loads it once (and a SIMD walk gathers it once).
  std::vector<int32_t> split;         // [n_nodes] bits 0-30: split column (0 for leaves);
                                      //   bit 31 (kDefaultLeft): a missing value (NaN) goes left
  std::vector<float> threshold;       // [n_nodes] go left when x < threshold; NaN for leaves
  std::vector<int32_t> left;          // [n_nodes] absolute node index of the left child (right is +1)
  std::vector<float> leaf_value;      // [n_nodes] leaf output in margin units; 0 for splits

  int32_t n_trees() const { return static_cast<int32_t>(tree_depth.size()); }
  int64_t n_nodes() const { return static_cast<int64_t>(split.size()); }

  // Parses an XGBoost JSON model (Booster.save_raw("json") or a saved .json file). Supports
  // gbtree boosters with one output and numeric splits. Throws std::invalid_argument naming
  // what is wrong for anything else or anything malformed (never reads out of bounds).
  static Forest from_json(std::string_view json);

  // x: row-major [batch, num_feature] float32, NaN = missing; out: [batch] outputs after the
  // transform (or the raw margins when output_margin). Pure C++: callers release the GIL.
  void predict(const float* x, int64_t batch, float* out, bool output_margin = false) const;
};

}  // namespace hera
