#include "forest.h"

#include <algorithm>
#include <charconv>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

namespace hera {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// A tree with more nodes than this is not something XGBoost writes; the bound keeps every node
// index (and the sum over all trees) inside int32 without overflow checks in the hot loop.
constexpr int64_t kMaxNodesPerTree = int64_t{1} << 24;
constexpr int64_t kMaxTotalNodes = int64_t{1} << 30;
// Nesting deeper than this is malformed for a model file and would only exhaust the stack.
constexpr int kMaxJsonDepth = 64;

[[noreturn]] void fail(const std::string& what) {
  throw std::invalid_argument("invalid XGBoost JSON model: " + what);
}

// ---------------------------------------------------------------------------------------------
// A small schema-directed JSON reader (no dependency: the model loader must never crash, and a
// reader this size can be fuzzed completely). The model is read in one pass without building a document
// tree: callers say which keys they want and number arrays are parsed straight into vectors;
// anything else is skipped (still fully syntax-checked). Every read is bounds-checked, and every
// error is std::invalid_argument carrying the byte offset.
class JsonReader {
 public:
  explicit JsonReader(std::string_view text) : p_(text.data()), begin_(text.data()), end_(text.data() + text.size()) {}

  [[noreturn]] void error(const std::string& what) const {
    fail(what + " at byte " + std::to_string(p_ - begin_));
  }

  void skip_ws() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\n' || *p_ == '\r' || *p_ == '\t')) ++p_;
  }

  // Next non-space character, or '\0' at the end of input.
  char peek() {
    skip_ws();
    return p_ < end_ ? *p_ : '\0';
  }

  void expect(char c) {
    if (peek() != c) error(std::string("expected '") + c + "'");
    ++p_;
  }

  void expect_end() {
    if (peek() != '\0' || p_ != end_) error("trailing data after the model");
  }

  // Calls on_key(key) for each member; on_key must consume exactly the member's value.
  template <class F>
  void object(F&& on_key, int depth) {
    enter(depth);
    expect('{');
    if (peek() == '}') {
      ++p_;
      return;
    }
    for (;;) {
      if (peek() != '"') error("expected an object key");
      const std::string key = string();
      expect(':');
      on_key(key);
      const char c = peek();
      ++p_;
      if (c == '}') return;
      if (c != ',') error("expected ',' or '}' in object");
    }
  }

  // Calls on_elem() for each element; on_elem must consume exactly one value.
  template <class F>
  void array(F&& on_elem, int depth) {
    enter(depth);
    expect('[');
    if (peek() == ']') {
      ++p_;
      return;
    }
    for (;;) {
      on_elem();
      const char c = peek();
      ++p_;
      if (c == ']') return;
      if (c != ',') error("expected ',' or ']' in array");
    }
  }

  std::string string() {
    if (peek() != '"') error("expected a string");
    ++p_;
    std::string out;
    for (;;) {
      if (p_ >= end_) error("unterminated string");
      const unsigned char c = static_cast<unsigned char>(*p_++);
      if (c == '"') return out;
      if (c < 0x20) error("control character in string");
      if (c != '\\') {
        out.push_back(static_cast<char>(c));
        continue;
      }
      if (p_ >= end_) error("unterminated escape");
      const char e = *p_++;
      switch (e) {
        case '"': out.push_back('"'); break;
        case '\\': out.push_back('\\'); break;
        case '/': out.push_back('/'); break;
        case 'b': out.push_back('\b'); break;
        case 'f': out.push_back('\f'); break;
        case 'n': out.push_back('\n'); break;
        case 'r': out.push_back('\r'); break;
        case 't': out.push_back('\t'); break;
        case 'u': append_utf8(out, unicode_escape()); break;
        default: error("bad escape in string");
      }
    }
  }

  // A JSON number token, validated against the JSON grammar (no leading '+', no "NaN").
  std::string_view number_token() {
    skip_ws();
    const char* s = p_;
    const char* q = p_;
    auto digits = [&] {
      const char* d = q;
      while (q < end_ && *q >= '0' && *q <= '9') ++q;
      return q > d;
    };
    if (q < end_ && *q == '-') ++q;
    if (q < end_ && *q == '0') {
      ++q;
    } else if (!digits()) {
      error("expected a number");
    }
    if (q < end_ && *q == '.') {
      ++q;
      if (!digits()) error("expected digits after '.'");
    }
    if (q < end_ && (*q == 'e' || *q == 'E')) {
      ++q;
      if (q < end_ && (*q == '+' || *q == '-')) ++q;
      if (!digits()) error("expected digits in exponent");
    }
    p_ = q;
    return {s, static_cast<size_t>(q - s)};
  }

  double number() { return parse_double(number_token()); }

  int64_t integer() {
    const std::string_view tok = number_token();
    int64_t v = 0;
    const auto r = std::from_chars(tok.data(), tok.data() + tok.size(), v);
    if (r.ec != std::errc() || r.ptr != tok.data() + tok.size()) {
      p_ = tok.data();
      error("expected an integer, got '" + std::string(tok.substr(0, 32)) + "'");
    }
    return v;
  }

  // XGBoost writes default_left as 0/1; older writers used true/false. Accept both.
  bool boolean_or_01() {
    const char c = peek();
    if (c == 't' || c == 'f') return literal_bool();
    const int64_t v = integer();
    if (v != 0 && v != 1) error("expected 0 or 1");
    return v == 1;
  }

  void skip_value(int depth) {
    const char c = peek();
    if (c == '{') {
      object([&](const std::string&) { skip_value(depth + 1); }, depth);
    } else if (c == '[') {
      array([&] { skip_value(depth + 1); }, depth);
    } else if (c == '"') {
      string();
    } else if (c == 't' || c == 'f') {
      literal_bool();
    } else if (c == 'n') {
      literal("null");
    } else {
      number_token();
    }
  }

  static double parse_double(std::string_view tok) {
    double v = 0.0;
    const auto r = std::from_chars(tok.data(), tok.data() + tok.size(), v);
    if (r.ec == std::errc::result_out_of_range) {
      // Underflow is a tiny number, not an error; overflow is.
      bool nonzero_mantissa = false;
      for (const char ch : tok) {
        if (ch == 'e' || ch == 'E') break;
        if (ch >= '1' && ch <= '9') nonzero_mantissa = true;
      }
      const auto e = tok.find_first_of("eE");
      if (nonzero_mantissa && e != std::string_view::npos && e + 1 < tok.size() && tok[e + 1] == '-') return 0.0;
      fail("number out of range: " + std::string(tok.substr(0, 32)));
    }
    if (r.ec != std::errc() || r.ptr != tok.data() + tok.size()) fail("bad number: " + std::string(tok.substr(0, 32)));
    return v;
  }

 private:
  void enter(int depth) {
    if (depth > kMaxJsonDepth) error("nesting deeper than " + std::to_string(kMaxJsonDepth));
  }

  void literal(const char* word) {
    skip_ws();
    const size_t n = std::strlen(word);
    if (static_cast<size_t>(end_ - p_) < n || std::memcmp(p_, word, n) != 0) error(std::string("expected ") + word);
    p_ += n;
  }

  bool literal_bool() {
    if (peek() == 't') {
      literal("true");
      return true;
    }
    literal("false");
    return false;
  }

  uint32_t hex4() {
    if (end_ - p_ < 4) error("short \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const char h = *p_++;
      v <<= 4;
      if (h >= '0' && h <= '9') v |= h - '0';
      else if (h >= 'a' && h <= 'f') v |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') v |= h - 'A' + 10;
      else error("bad hex digit in \\u escape");
    }
    return v;
  }

  uint32_t unicode_escape() {
    uint32_t cp = hex4();
    if (cp >= 0xD800 && cp <= 0xDBFF) {  // high surrogate: a low one must follow
      if (end_ - p_ < 2 || p_[0] != '\\' || p_[1] != 'u') error("unpaired surrogate in string");
      p_ += 2;
      const uint32_t lo = hex4();
      if (lo < 0xDC00 || lo > 0xDFFF) error("unpaired surrogate in string");
      cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
    } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
      error("unpaired surrogate in string");
    }
    return cp;
  }

  static void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }

  const char* p_;      // next unread byte
  const char* begin_;  // start of the input (for offsets in messages)
  const char* end_;    // one past the last byte
};

// XGBoost stores some scalars as strings: "5", "[5.5E-1]" (3.x, a vector of one) or "5.5E-1".
double scalar_from_string(const std::string& s, const char* what) {
  std::string_view v(s);
  if (!v.empty() && v.front() == '[') {
    if (v.size() < 2 || v.back() != ']') fail(std::string(what) + " is not a number: '" + s.substr(0, 32) + "'");
    v = v.substr(1, v.size() - 2);
    if (v.find(',') != std::string_view::npos) {
      fail(std::string(what) + " has several values; only single-output models are supported");
    }
  }
  if (v.empty()) fail(std::string(what) + " is empty");
  return JsonReader::parse_double(v);
}

int64_t int_from_string(const std::string& s, const char* what) {
  int64_t v = 0;
  const auto r = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || r.ec != std::errc() || r.ptr != s.data() + s.size()) {
    fail(std::string(what) + " is not an integer: '" + s.substr(0, 32) + "'");
  }
  return v;
}

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
