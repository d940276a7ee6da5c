// Checks on numpy arrays handed to the native modules (the CPU one and the CUDA one): validated
// before any memory is touched, and the ValueError names the fix.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace hera {

// `obj` as a float32 [batch, n] C-contiguous array, or a ValueError that says what it is instead.
inline pybind11::array_t<float> as_float32_matrix(const pybind11::object& obj, const char* name) {
  namespace py = pybind11;
  if (!py::isinstance<py::array>(obj)) {
    throw py::value_error(std::string(name) + " must be a numpy float32 array, got " +
                          std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  const auto a = py::reinterpret_borrow<py::array>(obj);
  if (!py::isinstance<py::array_t<float>>(a) || a.dtype().kind() != 'f' || a.itemsize() != 4) {
    throw py::value_error(std::string(name) + " must be a float32 array, got dtype " +
                          std::string(py::str(a.dtype())));
  }
  if (a.ndim() != 2) {
    throw py::value_error(std::string(name) + " must be 2-D [batch, n], got " + std::to_string(a.ndim()) + "-D");
  }
  if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) + " must be C-contiguous (use np.ascontiguousarray)");
  }
  return py::reinterpret_borrow<py::array_t<float>>(a);
}

// `obj` as the rows of a predict call: float32 [batch, num_feature], checked as above.
inline pybind11::array_t<float> as_feature_matrix(const pybind11::object& obj, int64_t num_feature) {
  auto x = as_float32_matrix(obj, "X");
  if (x.shape(1) != num_feature) {
    throw pybind11::value_error("X has " + std::to_string(x.shape(1)) + " features, the model expects " +
                                std::to_string(num_feature));
  }
  return x;
}

}  // namespace hera
