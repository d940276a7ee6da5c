// A small schema-directed JSON reader for XGBoost's model files (csrc/forest.cpp loads them with
// it), and the numbers XGBoost stores as strings. Header-only: forest.cpp is its one user.
#pragma once

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace hera {
namespace xgb_json {

// Nesting deeper than this is malformed for a model file and would only exhaust the stack.
constexpr int kMaxJsonDepth = 64;

[[noreturn]] inline void fail(const std::string& what) {
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
inline double scalar_from_string(const std::string& s, const char* what) {
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

inline int64_t int_from_string(const std::string& s, const char* what) {
  int64_t v = 0;
  const auto r = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || r.ec != std::errc() || r.ptr != s.data() + s.size()) {
    fail(std::string(what) + " is not an integer: '" + s.substr(0, 32) + "'");
  }
  return v;
}

}  // namespace xgb_json
}  // namespace hera
