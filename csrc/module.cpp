// hera_core._native: the private native module behind hera_core. Few coarse entry points that take
// whole numpy batches and release the GIL; all argument errors surface as ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>

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
