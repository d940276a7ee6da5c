// Python binding of hera::RadixIndex as hera_core._native.RadixIndex, the native twin of
// hera_core.native.radix.PyRadixIndex: same method and property names, same results, ValueError for
// caller mistakes, AssertionError from check_invariants().
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "radix.h"

namespace py = pybind11;

namespace {

// Token ids, validated before use: a 1-D C-contiguous int32 numpy array (borrowed, no copy) or a
// sequence of Python ints in int32 range (copied), the same rule as the twin's _token_list.
class Tokens {
 public:
  explicit Tokens(const py::object& obj) {
    if (py::isinstance<py::array>(obj)) {
      const auto a = py::reinterpret_borrow<py::array>(obj);
      if (!py::isinstance<py::array_t<int32_t>>(a)) {
        throw py::value_error("tokens must be an int32 array, got dtype " + std::string(py::str(a.dtype())));
      }
      if (a.ndim() != 1) throw py::value_error("tokens must be 1-D, got " + std::to_string(a.ndim()) + "-D");
      if (!(a.flags() & py::array::c_style)) {
        throw py::value_error("tokens must be C-contiguous (use np.ascontiguousarray)");
      }
      array_ = a;
      size_ = a.shape(0);
      const void* p = a.data();
      if (reinterpret_cast<uintptr_t>(p) % alignof(int32_t) == 0) {
        data_ = static_cast<const int32_t*>(p);
      } else {  // an unaligned view of a buffer: copy rather than read misaligned ints
        copy_.resize(static_cast<size_t>(size_));
        std::memcpy(copy_.data(), p, copy_.size() * sizeof(int32_t));
        data_ = copy_.data();
      }
      return;
    }
    if (py::isinstance<py::str>(obj) || py::isinstance<py::bytes>(obj) || !PySequence_Check(obj.ptr())) {
      throw py::value_error("tokens must be a 1-D int32 numpy array or a sequence of ints, got " +
                            std::string(py::str(py::type::of(obj).attr("__name__"))));
    }
    const auto seq = py::reinterpret_borrow<py::sequence>(obj);
    copy_.reserve(seq.size());
    for (const py::handle item : seq) {
      PyObject* index = PyNumber_Index(item.ptr());
      if (index == nullptr) {
        PyErr_Clear();
        throw py::value_error("tokens must be integers");
      }
      int overflow = 0;
      const long long v = PyLong_AsLongLongAndOverflow(index, &overflow);
      Py_DECREF(index);
      if (overflow != 0 || v < INT32_MIN || v > INT32_MAX) throw py::value_error("token ids must fit in int32");
      copy_.push_back(static_cast<int32_t>(v));
    }
    data_ = copy_.data();
    size_ = static_cast<int64_t>(copy_.size());
  }

  const int32_t* data() const { return data_; }
  int64_t size() const { return size_; }

 private:
  py::object array_;            // keeps a borrowed array alive while data_ points into it
  std::vector<int32_t> copy_;   // the ids when they could not be borrowed
  const int32_t* data_ = nullptr;
  int64_t size_ = 0;
};

// The index plus the mutex that serializes calls: match/insert/lock/release/truncate/evict run
// with the GIL released, so two Python threads may call in at once. A call that holds the mutex
// never waits for the GIL, so the two cannot deadlock.
struct RadixIndexPy {
  RadixIndexPy(int64_t block_size, int64_t bytes_per_token, int64_t byte_budget, int64_t max_slots)
      : index(block_size, bytes_per_token, byte_budget, max_slots) {}
  hera::RadixIndex index;
  std::mutex mu;
};

// Runs fn(index) with the GIL released and the mutex held.
template <class Fn>
auto without_gil(RadixIndexPy& self, Fn&& fn) {
  py::gil_scoped_release release;
  std::lock_guard<std::mutex> guard(self.mu);
  return fn(self.index);
}

// Reads a property with the GIL held (a few nanoseconds; waits only while a call is running).
template <class Fn>
auto with_lock(RadixIndexPy& self, Fn&& fn) {
  std::lock_guard<std::mutex> guard(self.mu);
  return fn(self.index);
}

py::list evicted_list(const std::vector<hera::RadixEvicted>& evicted) {
  py::list out(evicted.size());
  for (size_t k = 0; k < evicted.size(); ++k) {
    out[k] = py::make_tuple(evicted[k].slot, evicted[k].start, evicted[k].n);
  }
  return out;
}

}  // namespace

void hera_register_radix(py::module_& m) {
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const hera::InvariantError& e) {
      PyErr_SetString(PyExc_AssertionError, e.what());
    }
  });

  using Self = RadixIndexPy;
  py::class_<Self>(m, "RadixIndex",
                   "Block-granular radix index over token ids: which KV slots hold which prompt prefixes "
                   "(native twin of hera_core.native.radix.PyRadixIndex; same methods, same results).")
      .def(py::init<int64_t, int64_t, int64_t, int64_t>(), py::arg("block_size"), py::arg("bytes_per_token"),
           py::arg("byte_budget"), py::arg("max_slots") = 64,
           "ValueError unless block_size >= 1, bytes_per_token >= 1, 1 <= max_slots <= 64 and byte_budget "
           "holds at least one block.")
      .def(
          "match",
          [](Self& self, const py::object& tokens) {
            const Tokens t(tokens);
            const auto r = without_gil(self, [&](hera::RadixIndex& x) { return x.match(t.data(), t.size()); });
            return py::make_tuple(r.first, r.second);
          },
          py::arg("tokens"),
          "Longest cached block-aligned prefix: (tokens matched, holder slot or -1); the holder is the "
          "lowest slot holding the deepest matched block. Touches the path (LRU).")
      .def(
          "insert",
          [](Self& self, const py::object& tokens, int64_t slot) {
            const Tokens t(tokens);
            const auto ev =
                without_gil(self, [&](hera::RadixIndex& x) { return x.insert(t.data(), t.size(), slot); });
            return evicted_list(ev);
          },
          py::arg("tokens"), py::arg("slot"),
          "Record that `slot` holds the full blocks of `tokens` (dropping the slot's diverging blocks), "
          "evicting LRU unpinned leaves to fit; returns the evicted [(slot, start, n)].")
      .def(
          "truncate",
          [](Self& self, int64_t slot, int64_t n_tokens) {
            without_gil(self, [&](hera::RadixIndex& x) { x.truncate(slot, n_tokens); });
          },
          py::arg("slot"), py::arg("n_tokens"),
          "`slot` now holds only its first n_tokens tokens; ValueError if a locked block would lose its "
          "last holder.")
      .def(
          "lock",
          [](Self& self, const py::object& tokens) {
            const Tokens t(tokens);
            return without_gil(self, [&](hera::RadixIndex& x) { return x.lock(t.data(), t.size()); });
          },
          py::arg("tokens"), "Pin the cached blocks of `tokens`; returns how many were pinned.")
      .def(
          "release",
          [](Self& self, const py::object& tokens, int64_t n_blocks) {
            const Tokens t(tokens);
            without_gil(self, [&](hera::RadixIndex& x) { x.release(t.data(), t.size(), n_blocks); });
          },
          py::arg("tokens"), py::arg("n_blocks"), "Undo lock: unpin the first n_blocks blocks of `tokens`.")
      .def(
          "evict",
          [](Self& self, int64_t n_bytes) {
            return evicted_list(without_gil(self, [&](hera::RadixIndex& x) { return x.evict(n_bytes); }));
          },
          py::arg("n_bytes"), "Free at least n_bytes from LRU unpinned leaves; returns [(slot, start, n)].")
      .def(
          "slot_blocks", [](Self& self, int64_t slot) { return with_lock(self, [&](hera::RadixIndex& x) { return x.slot_blocks(slot); }); },
          py::arg("slot"), "How many blocks `slot` holds (its path length).")
      .def(
          "check_invariants",
          [](Self& self) { without_gil(self, [](hera::RadixIndex& x) { x.check_invariants(); }); },
          "Walks the whole tree; AssertionError naming the first invariant that does not hold.")
#define HERA_RADIX_PROPERTY(name)                                                                  \
  .def_property_readonly(#name, [](Self& self) {                                                  \
    return with_lock(self, [](hera::RadixIndex& x) { return x.name(); });                         \
  })
      HERA_RADIX_PROPERTY(block_size)
      HERA_RADIX_PROPERTY(bytes_per_token)
      HERA_RADIX_PROPERTY(byte_budget)
      HERA_RADIX_PROPERTY(max_slots)
      HERA_RADIX_PROPERTY(block_bytes)
      HERA_RADIX_PROPERTY(n_blocks)
      HERA_RADIX_PROPERTY(bytes_held)
      HERA_RADIX_PROPERTY(evictions)
      HERA_RADIX_PROPERTY(matched_tokens);
#undef HERA_RADIX_PROPERTY
}
