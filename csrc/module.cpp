// hera_core._native: the private native module behind hera_core. Few coarse entry points that take
// whole numpy batches and release the GIL; all argument errors surface as ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "logit_features.h"
#include "forest.h"
#include "pyarrays.h"

namespace py = pybind11;

void hera_register_radix(pybind11::module_&);  // csrc/radix_bindings.cpp

namespace {

using hera::as_float32_matrix;  // csrc/pyarrays.h

py::array_t<float> logit_features(const py::object& logits_any) {
  auto logits = as_float32_matrix(logits_any, "logits");
  const int64_t batch = logits.shape(0), vocab = logits.shape(1);
  if (vocab < 1) throw py::value_error("logits must have at least one column (vocab >= 1)");
  py::array_t<float> out({batch, static_cast<int64_t>(hera::kNumLogitFeatures)});
  const float* src = logits.data();
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    hera::logit_features(src, batch, vocab, dst);
  }
  return out;
}

// Copies of the flat node arrays, for tests and for uploading the model to a GPU.
py::dict forest_arrays(const hera::Forest& f) {
  auto copy = [](const auto& v) {
    using T = typename std::decay_t<decltype(v)>::value_type;
    py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
    if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(T));
    return a;
  };
  py::dict d;
  d["tree_offset"] = copy(f.tree_offset);
  d["tree_depth"] = copy(f.tree_depth);
  d["tree_complete"] = copy(f.tree_complete);
  d["split"] = copy(f.split);
  d["threshold"] = copy(f.threshold);
  d["left"] = copy(f.left);
  d["leaf_value"] = copy(f.leaf_value);
  return d;
}

py::array_t<float> forest_predict(const hera::Forest& f, const py::object& x_any, bool output_margin) {
  auto x = hera::as_feature_matrix(x_any, f.num_feature);
  const int64_t batch = x.shape(0);
  py::array_t<float> out(batch);
  const float* src = x.data();
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    f.predict(src, batch, dst, output_margin);
  }
  return out;
}

// The live path's whole score of a few steps in one call and one GIL release: per step, the logit
// features of its logits row (float32 C-contiguous, [vocab] or [1, vocab]) then its structure
// features (a list of numbers) make its row of X; the forest reads the columns `columns` of X
// (int32 indices; None: all of them, in order) and gives P. Returns (P float32 [n], X float32 [n, k]).
py::tuple forest_score_logits(const hera::Forest& f, const py::list& rows, const py::list& structure,
                              const py::object& columns) {
  const auto n = static_cast<int64_t>(rows.size());
  if (n < 1 || static_cast<int64_t>(structure.size()) != n) {
    throw py::value_error("need one structure row per logits row, and at least one row; got " +
                          std::to_string(n) + " logits rows and " + std::to_string(structure.size()) +
                          " structure rows");
  }
  // (the live path scores one step at a time: no heap allocation for up to kSmall rows)
  constexpr int64_t kSmall = 8;
  const float* src_small[kSmall];
  int64_t vocab_small[kSmall];
  std::vector<const float*> src_big;
  std::vector<int64_t> vocab_big;
  if (n > kSmall) {
    src_big.resize(n);
    vocab_big.resize(n);
  }
  const float** src = n > kSmall ? src_big.data() : src_small;
  int64_t* vocab = n > kSmall ? vocab_big.data() : vocab_small;
  for (int64_t i = 0; i < n; ++i) {
    const py::handle r = rows[i];
    if (!py::isinstance<py::array_t<float>>(r)) throw py::value_error("logits rows must be float32 numpy arrays");
    const auto a = py::reinterpret_borrow<py::array>(r);
    const bool one_row = a.ndim() == 1 || (a.ndim() == 2 && a.shape(0) == 1);
    if (a.dtype().kind() != 'f' || a.itemsize() != 4 || !one_row || a.size() < 1 ||
        !(a.flags() & py::array::c_style)) {
      throw py::value_error("logits row " + std::to_string(i) +
                            " must be a C-contiguous float32 [vocab] or [1, vocab] array, vocab >= 1");
    }
    src[i] = static_cast<const float*>(a.data());
    vocab[i] = a.size();
  }
  const int64_t s = static_cast<int64_t>(py::len(structure[0]));
  const int64_t k = hera::kNumLogitFeatures + s;
  py::array_t<float> x({n, k});
  float* xp = x.mutable_data();
  for (int64_t i = 0; i < n; ++i) {
    const py::handle row = structure[i];
    if (!PyList_Check(row.ptr()) || PyList_GET_SIZE(row.ptr()) != s) {
      throw py::value_error("structure row " + std::to_string(i) + " must be a list of " + std::to_string(s) +
                            " numbers");
    }
    for (int64_t j = 0; j < s; ++j) {
      const double v = PyFloat_AsDouble(PyList_GET_ITEM(row.ptr(), j));
      if (v == -1.0 && PyErr_Occurred()) throw py::error_already_set();
      xp[i * k + hera::kNumLogitFeatures + j] = static_cast<float>(v);
    }
  }
  py::array_t<int32_t, py::array::c_style | py::array::forcecast> c;  // (kept alive: cols points into it)
  const int32_t* cols = nullptr;
  int64_t m = k;
  if (!columns.is_none()) {
    c = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(columns);
    if (!c || c.ndim() != 1) throw py::value_error("columns must be a 1-D array of column indices");
    cols = c.data();
    m = c.size();
    for (int64_t j = 0; j < m; ++j) {
      if (cols[j] < 0 || cols[j] >= k) {
        throw py::value_error("column " + std::to_string(cols[j]) + " is not in a row of " + std::to_string(k) +
                              " features");
      }
    }
  }
  if (m != f.num_feature) {
    throw py::value_error("the model reads " + std::to_string(f.num_feature) + " features, the rows give it " +
                          std::to_string(m));
  }
  py::array_t<float> p(n);
  float* pp = p.mutable_data();
  {
    py::gil_scoped_release release;
    for (int64_t i = 0; i < n; ++i) hera::logit_features(src[i], 1, vocab[i], xp + i * k);
    if (cols == nullptr) {
      f.predict(xp, n, pp);
    } else {
      float picked_small[kSmall * 32];
      std::vector<float> picked_big;
      float* picked = picked_small;
      if (n * m > kSmall * 32) {
        picked_big.resize(static_cast<size_t>(n * m));
        picked = picked_big.data();
      }
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < m; ++j) picked[i * m + j] = xp[i * k + cols[j]];
      }
      f.predict(picked, n, pp);
    }
  }
  return py::make_tuple(p, x);
}

hera::Forest forest_from_json(const py::bytes& b) {
  std::string_view text = b;  // a view into the bytes object, which outlives the call
  py::gil_scoped_release release;
  return hera::Forest::from_json(text);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "HERA native core: batched subtask scoring";
  hera_register_radix(m);
  m.attr("__version__") = HERA_VERSION;
  m.attr("__source_hash__") = HERA_SOURCE_HASH;
  m.def("logit_features", &logit_features, py::arg("logits"),
        "Per row of float32 [batch, vocab] last-position logits: entropy (nats), top-1 probability, "
        "top1-top2 probability margin, as float32 [batch, 3]. One call per batch, GIL released.");

  py::class_<hera::Forest>(m, "Forest",
                           "A loaded XGBoost tree ensemble (gbtree, one output, numeric splits).")
      .def_static("from_json", &forest_from_json, py::arg("model"),
                  "Parse XGBoost JSON model bytes; ValueError naming the problem if malformed or "
                  "unsupported.")
      .def("predict", &forest_predict, py::arg("X"), py::arg("output_margin") = false,
           "float32 C-contiguous [batch, n_features] (NaN = missing) -> float32 [batch]. One call "
           "per batch, GIL released.")
      .def("score_logits", &forest_score_logits, py::arg("rows"), py::arg("structure"), py::arg("columns") = py::none(),
           "Steps scored from their SLM logits in one call: per step the logit features of its row "
           "(float32 [vocab]) then its structure features (a list of numbers) make its row of X; the "
           "forest reads X's `columns` (int32; None: all). (P float32 [n], X float32 [n, 3 + s]); GIL "
           "released once.")
      .def_property_readonly("n_features", [](const hera::Forest& f) { return f.num_feature; })
      .def_property_readonly("n_trees", [](const hera::Forest& f) { return f.n_trees(); })
      .def_property_readonly("n_nodes", &hera::Forest::n_nodes)
      .def_property_readonly("objective", [](const hera::Forest& f) { return f.objective; })
      .def_property_readonly("base_margin", [](const hera::Forest& f) { return f.base_margin; })
      .def_property_readonly("sigmoid", [](const hera::Forest& f) {
        return f.transform == hera::ForestTransform::kSigmoid;
      })
      .def("arrays", &forest_arrays,
           "Copies of the flat node arrays (tree_offset, tree_depth, tree_complete, split, threshold, left, "
           "leaf_value); split holds the column in bits 0-30 and missing-goes-left in bit 31.");
}
