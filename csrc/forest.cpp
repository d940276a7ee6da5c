// Loading an XGBoost JSON model into a Forest (checked, never crashing on a bad file); inference
// is forest_predict.cpp, the JSON reader xgb_json.h.
#include "forest.h"
#include "xgb_json.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>

namespace hera {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// A tree with more nodes than this is not something XGBoost writes; the bound keeps every node
// index (and the sum over all trees) inside int32 without overflow checks in the hot loop.
constexpr int64_t kMaxNodesPerTree = int64_t{1} << 24;
constexpr int64_t kMaxTotalNodes = int64_t{1} << 30;

using xgb_json::JsonReader;
using xgb_json::fail;
using xgb_json::int_from_string;
using xgb_json::scalar_from_string;

// One tree as XGBoost writes it: parallel arrays indexed by node id, -1 for "no child".
struct RawTree {
  std::vector<int64_t> left;         // left child id, -1 at leaves
  std::vector<int64_t> right;        // right child id, -1 at leaves
  std::vector<int64_t> split_index;  // split feature
  std::vector<double> split_cond;    // threshold at splits, leaf value at leaves
  std::vector<uint8_t> default_left; // 1: missing goes left
  bool has_categorical = false;      // any categorical split (unsupported)
  bool has_vector_leaf = false;      // size_leaf_vector > 1: multi-target tree (unsupported)
};

// Everything the loader reads, before validation and flattening.
struct RawModel {
  bool have_learner = false;  // the document has a "learner" member
  std::string booster;        // gradient_booster.name
  std::string objective;      // objective.name
  std::string base_score;     // learner_model_param.base_score, as written
  std::string num_feature;    // learner_model_param.num_feature
  std::string num_class = "0";   // learner_model_param.num_class
  std::string num_target = "1";  // learner_model_param.num_target
  std::vector<int64_t> tree_info;  // output group of each tree
  std::vector<RawTree> trees;       // gradient_booster.model.trees, in boosting order
  bool have_trees = false;          // the "trees" member was present
};

// Reads the parts of an XGBoost model document that prediction needs into a RawModel.
class ModelParser {
 public:
  explicit ModelParser(std::string_view text) : r_(text) {}

  RawModel parse() {
    r_.object([&](const std::string& k) {
      if (k == "learner") {
        m_.have_learner = true;
        learner(1);
      } else {
        r_.skip_value(1);
      }
    }, 0);
    r_.expect_end();
    return std::move(m_);
  }

 private:
  void learner(int d) {
    r_.object([&](const std::string& k) {
      if (k == "gradient_booster") {
        booster(d + 1);
      } else if (k == "learner_model_param") {
        r_.object([&](const std::string& p) {
          if (p == "base_score") m_.base_score = r_.string();
          else if (p == "num_feature") m_.num_feature = r_.string();
          else if (p == "num_class") m_.num_class = r_.string();
          else if (p == "num_target") m_.num_target = r_.string();
          else r_.skip_value(d + 2);
        }, d + 1);
      } else if (k == "objective") {
        r_.object([&](const std::string& p) {
          if (p == "name") m_.objective = r_.string();
          else r_.skip_value(d + 2);
        }, d + 1);
      } else {
        r_.skip_value(d + 1);
      }
    }, d);
  }

  void booster(int d) {
    r_.object([&](const std::string& k) {
      if (k == "name") {
        m_.booster = r_.string();
      } else if (k == "model") {
        r_.object([&](const std::string& p) {
          if (p == "trees") {
            m_.have_trees = true;
            m_.trees.clear();
            r_.array([&] { tree(d + 3); }, d + 2);
          } else if (p == "tree_info") {
            m_.tree_info.clear();
            r_.array([&] { m_.tree_info.push_back(r_.integer()); }, d + 2);
          } else {
            r_.skip_value(d + 2);
          }
        }, d + 1);
      } else {
        r_.skip_value(d + 1);
      }
    }, d);
  }

  template <class T, class F>
  void vec(std::vector<T>& out, F&& read, int d) {
    out.clear();
    r_.array([&] { out.push_back(read()); }, d);
  }

  void tree(int d) {
    RawTree t;
    r_.object([&](const std::string& k) {
      if (k == "left_children") vec(t.left, [&] { return r_.integer(); }, d + 1);
      else if (k == "right_children") vec(t.right, [&] { return r_.integer(); }, d + 1);
      else if (k == "split_indices") vec(t.split_index, [&] { return r_.integer(); }, d + 1);
      else if (k == "split_conditions") vec(t.split_cond, [&] { return r_.number(); }, d + 1);
      else if (k == "default_left") vec(t.default_left, [&] { return uint8_t{r_.boolean_or_01()}; }, d + 1);
      else if (k == "split_type") {
        r_.array([&] { t.has_categorical |= r_.integer() != 0; }, d + 1);
      } else if (k == "categories_nodes") {
        r_.array([&] { r_.integer(); t.has_categorical = true; }, d + 1);
      } else if (k == "tree_param") {
        r_.object([&](const std::string& p) {
          if (p == "size_leaf_vector") {
            const int64_t n = int_from_string(r_.string(), "size_leaf_vector");
            t.has_vector_leaf |= n > 1;
          } else {
            r_.skip_value(d + 2);
          }
        }, d + 1);
      } else {
        r_.skip_value(d + 1);
      }
    }, d);
    m_.trees.push_back(std::move(t));
  }

  JsonReader r_;  // the input, read once front to back
  RawModel m_;    // what has been read so far
};

// Validates one tree and returns its nodes in breadth-first order from the root (raw ids, children
// of the k-th internal node adjacent) with the depth of each. Every node is placed once, so a
// cycle or a shared child (not a tree) is caught by `seen`; unreachable (deleted) nodes are dropped.
struct TreeShape {
  std::vector<int64_t> order;     // raw node ids in breadth-first order
  std::vector<int32_t> depth_of;  // depth of order[k] (root 0)
  int32_t max_depth = 0;          // deepest leaf
};

TreeShape check_tree(const RawTree& t, const std::string& where, int32_t num_feature) {
  const size_t n = t.left.size();
  if (n == 0) fail(where + "has no nodes");
  if (static_cast<int64_t>(n) > kMaxNodesPerTree) fail(where + "has too many nodes");
  if (t.right.size() != n || t.split_index.size() != n || t.split_cond.size() != n || t.default_left.size() != n) {
    fail(where + "left_children, right_children, split_indices, split_conditions and default_left "
         "must have the same length");
  }
  if (t.has_categorical) fail(where + "has categorical splits, which are not supported");
  if (t.has_vector_leaf) fail(where + "has vector leaves (multi-target), which are not supported");
  TreeShape s;
  s.order.push_back(0);
  s.depth_of.push_back(0);
  std::vector<uint8_t> seen(n, 0);
  seen[0] = 1;
  for (size_t k = 0; k < s.order.size(); ++k) {
    const int64_t id = s.order[k];
    const int64_t l = t.left[id], r = t.right[id];
    const double v = t.split_cond[id];
    if (l == -1 && r == -1) {
      if (!std::isfinite(v) || std::fabs(v) > std::numeric_limits<float>::max()) {
        fail(where + "node " + std::to_string(id) + " has a non-finite leaf value");
      }
      s.max_depth = std::max(s.max_depth, s.depth_of[k]);
      continue;
    }
    for (const int64_t c : {l, r}) {
      if (c < 0 || c >= static_cast<int64_t>(n)) {
        fail(where + "node " + std::to_string(id) + " has child " + std::to_string(c) + " out of range [0, " +
             std::to_string(n) + ")");
      }
      if (seen[c]) fail(where + "node " + std::to_string(c) + " is reached twice (a cycle or a shared child)");
      seen[c] = 1;
      s.order.push_back(c);
      s.depth_of.push_back(s.depth_of[k] + 1);
    }
    const int64_t feat = t.split_index[id];
    if (feat < 0 || feat >= num_feature) {
      fail(where + "node " + std::to_string(id) + " splits on feature " + std::to_string(feat) +
           " but the model has " + std::to_string(num_feature) + " features");
    }
    if (std::isnan(v)) fail(where + "node " + std::to_string(id) + " has a NaN threshold");
  }
  return s;
}

// Thresholds beyond float range act as +-inf (converting such a double to float is undefined).
float threshold_to_float(double v) {
  if (v > std::numeric_limits<float>::max()) return std::numeric_limits<float>::infinity();
  if (v < -std::numeric_limits<float>::max()) return -std::numeric_limits<float>::infinity();
  return static_cast<float>(v);
}

// Appends one node.
void push_node(Forest& f, int32_t feature, float threshold, int32_t left, uint8_t default_left, float leaf) {
  f.split.push_back(static_cast<int32_t>(static_cast<uint32_t>(feature) | (default_left ? kDefaultLeft : 0u)));
  f.threshold.push_back(threshold);
  f.left.push_back(left);
  f.leaf_value.push_back(leaf);
}

// Compact layout: the reachable nodes in breadth-first order, leaves stepping to themselves.
void append_compact(const RawTree& t, const TreeShape& s, Forest& f) {
  const int32_t base = static_cast<int32_t>(f.n_nodes());
  int32_t next_child = base + 1;  // slot of the next internal node's left child
  for (size_t k = 0; k < s.order.size(); ++k) {
    const int64_t id = s.order[k];
    const int32_t slot = base + static_cast<int32_t>(k);
    if (t.left[id] == -1) {
      push_node(f, 0, kNaN, slot - 1, 0, static_cast<float>(t.split_cond[id]));
    } else {
      push_node(f, static_cast<int32_t>(t.split_index[id]), threshold_to_float(t.split_cond[id]), next_child,
                t.default_left[id], 0.0f);
      next_child += 2;
    }
  }
}

// Complete layout: the tree padded to all 2^(D+1) - 1 positions of its depth D, so position i
// has children 2i+1 and 2i+2 and the walk needs no child array. A leaf above the last level
// becomes a pass-through node (NaN threshold: always right) whose right-most descendant on the
// last level carries its value.
void append_complete(const RawTree& t, const TreeShape& s, Forest& f) {
  const int32_t base = static_cast<int32_t>(f.n_nodes());
  const int64_t total = (int64_t{2} << s.max_depth) - 1;
  const int64_t first_leaf = total / 2;  // 2^D - 1: positions from here on are the last level
  std::vector<int64_t> src(total, -1);   // raw id at each position; -1 below a leaf (padding)
  std::vector<float> carried(total, 0.0f);  // leaf value a padding position passes down
  src[0] = 0;
  for (int64_t i = 0; i < total; ++i) {
    const int64_t id = src[i];
    const bool is_split = id >= 0 && t.left[id] != -1;
    const float value = id >= 0 && !is_split ? static_cast<float>(t.split_cond[id]) : carried[i];
    if (i >= first_leaf) {
      push_node(f, 0, kNaN, base + static_cast<int32_t>(i) - 1, 0, value);
    } else if (is_split) {
      push_node(f, static_cast<int32_t>(t.split_index[id]), threshold_to_float(t.split_cond[id]),
                base + static_cast<int32_t>(2 * i + 1), t.default_left[id], 0.0f);
      src[2 * i + 1] = t.left[id];
      src[2 * i + 2] = t.right[id];
    } else {
      push_node(f, 0, kNaN, base + static_cast<int32_t>(2 * i + 1), 0, 0.0f);
      carried[2 * i + 1] = carried[2 * i + 2] = value;
    }
  }
}

// Trees up to this depth are padded to complete trees when that costs at most kPadFactor times
// their node count (or under kPadFree nodes): the walk then computes children instead of loading
// them, one load fewer on the critical chain of every step.
constexpr int32_t kMaxCompleteDepth = 12;
constexpr int64_t kPadFactor = 4;
constexpr int64_t kPadFree = 256;

void append_tree(const RawTree& t, size_t index, int32_t num_feature, Forest& f) {
  const TreeShape s = check_tree(t, "tree " + std::to_string(index) + ": ", num_feature);
  const int64_t nodes = static_cast<int64_t>(s.order.size());
  const int64_t padded = s.max_depth <= kMaxCompleteDepth ? (int64_t{2} << s.max_depth) - 1 : -1;
  const bool complete = padded > 0 && (padded <= kPadFree || padded <= kPadFactor * nodes);
  if (f.n_nodes() + (complete ? padded : nodes) > kMaxTotalNodes) fail("too many nodes in total");
  if (complete) {
    append_complete(t, s, f);
  } else {
    append_compact(t, s, f);
  }
  f.tree_complete.push_back(complete ? 1 : 0);
  f.tree_offset.push_back(static_cast<int32_t>(f.n_nodes()));
  f.tree_depth.push_back(s.max_depth);
}

}  // namespace

Forest Forest::from_json(std::string_view json) {
  RawModel m = ModelParser(json).parse();
  if (!m.have_learner) fail("no 'learner' object (is this an XGBoost JSON model?)");
  if (m.booster != "gbtree") {
    fail("booster '" + m.booster + "' is not supported; only gbtree (dart and gblinear are not)");
  }
  if (!m.have_trees) fail("no gradient_booster.model.trees array");
  if (m.num_feature.empty()) fail("no learner_model_param.num_feature");
  const int64_t num_feature = int_from_string(m.num_feature, "num_feature");
  if (num_feature < 1 || num_feature > std::numeric_limits<int32_t>::max()) {
    fail("num_feature must be >= 1, got " + m.num_feature);
  }
  if (int_from_string(m.num_class, "num_class") > 1) fail("multi-class models are not supported");
  if (int_from_string(m.num_target, "num_target") > 1) fail("multi-target models are not supported");
  if (m.tree_info.size() != m.trees.size()) fail("tree_info and trees differ in length");
  for (const int64_t g : m.tree_info) {
    if (g != 0) fail("a tree belongs to output group " + std::to_string(g) + "; only one output is supported");
  }
  if (m.base_score.empty()) fail("no learner_model_param.base_score");
  const double base_score = scalar_from_string(m.base_score, "base_score");
  if (!std::isfinite(base_score) || std::fabs(base_score) > std::numeric_limits<float>::max()) {
    fail("base_score is not a finite float");
  }

  Forest f;
  f.num_feature = static_cast<int32_t>(num_feature);
  f.objective = m.objective;
  // XGBoost >= 2 stores base_score in output space; the margin starts from its inverse link.
  if (m.objective == "binary:logistic" || m.objective == "reg:logistic") {
    if (!(base_score > 0.0 && base_score < 1.0)) fail("base_score must be in (0, 1) for " + m.objective);
    const float b = static_cast<float>(base_score);
    f.base_margin = -std::log(1.0f / b - 1.0f);  // XGBoost's ProbToMargin, in float
    f.transform = ForestTransform::kSigmoid;
  } else if (m.objective == "reg:squarederror" || m.objective == "reg:absoluteerror" ||
             m.objective == "reg:pseudohubererror" || m.objective == "binary:logitraw") {
    // Identity link (binary:logitraw included: its base_score is already a margin).
    f.base_margin = static_cast<float>(base_score);
    f.transform = ForestTransform::kIdentity;
  } else {
    fail("objective '" + m.objective +
         "' is not supported (binary:logistic, reg:logistic, binary:logitraw, reg:squarederror, "
         "reg:absoluteerror, reg:pseudohubererror are)");
  }

  f.tree_offset.push_back(0);
  for (size_t i = 0; i < m.trees.size(); ++i) append_tree(m.trees[i], i, f.num_feature, f);
  return f;
}

}  // namespace hera
