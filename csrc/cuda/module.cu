// hera_core._native_cuda: the CUDA scoring kernels, a module apart from _native so a CPU-only
// import never needs the CUDA runtime. Two kinds of entry points:
//   *_device(...): take device pointers as integers (from cupy, torch, cuda-python) and a stream;
//                  asynchronous, the caller owns the memory and synchronises.
//   host wrappers: take and return numpy arrays, copy through the device and raise ValueError
//                  like the CPU functions.
#include <cuda_runtime.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.cuh"
#include "../pyarrays.h"

namespace py = pybind11;

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a sticky launch error so later calls report their own
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
  }
}

template <class T>
T* as_device_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

cudaStream_t as_stream(uintptr_t address) { return reinterpret_cast<cudaStream_t>(address); }

// Owns one cudaMalloc allocation; freed on scope exit, also on exceptions.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) {
    if (bytes > 0) check(cudaMalloc(&ptr_, bytes), "cudaMalloc");
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_) { o.ptr_ = nullptr; }
  ~DeviceBuffer() { reset(); }
  void reset() {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
  }
  template <class T>
  T* get() const { return static_cast<T*>(ptr_); }
  void upload(const void* src, size_t bytes) {
    if (bytes > 0) check(cudaMemcpy(ptr_, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy to device");
  }

 private:
  void* ptr_ = nullptr;  // device allocation, or null
};

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver / no device: report 0, leave no error behind
    return 0;
  }
  return n;
}

using hera::as_float32_matrix;  // csrc/pyarrays.h

void logit_features_device(uintptr_t logits, int64_t batch, int64_t vocab, uintptr_t out, uintptr_t status,
                           uintptr_t stream) {
  if (batch < 0 || vocab < 1) throw py::value_error("logits must have shape [batch, vocab>=1]");
  if (batch > 0 && (logits == 0 || out == 0)) throw py::value_error("logits and out must be device pointers");
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = hera::cuda::launch_logit_features(as_device_ptr<const float>(logits), batch, vocab, as_device_ptr<float>(out),
                                           as_device_ptr<int32_t>(status), as_stream(stream));
  }
  check(err, "logit_features kernel launch");
}

py::array_t<float> logit_features_host(const py::object& logits_any) {
  auto logits = as_float32_matrix(logits_any, "logits");
  const int64_t batch = logits.shape(0), vocab = logits.shape(1);
  if (vocab < 1) throw py::value_error("logits must have at least one column (vocab >= 1)");
  py::array_t<float> out({batch, int64_t{3}});
  std::vector<int32_t> status(static_cast<size_t>(batch));
  if (batch == 0) return out;
  const float* src = logits.data();
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    const size_t in_bytes = static_cast<size_t>(batch) * vocab * sizeof(float);
    DeviceBuffer d_in(in_bytes), d_out(batch * 3 * sizeof(float)), d_status(batch * sizeof(int32_t));
    d_in.upload(src, in_bytes);
    check(hera::cuda::launch_logit_features(d_in.get<float>(), batch, vocab, d_out.get<float>(),
                                            d_status.get<int32_t>(), nullptr),
          "logit_features kernel launch");
    check(cudaMemcpy(dst, d_out.get<float>(), batch * 3 * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy to host");
    check(cudaMemcpy(status.data(), d_status.get<int32_t>(), batch * sizeof(int32_t), cudaMemcpyDeviceToHost),
          "cudaMemcpy to host");
  }
  for (int64_t i = 0; i < batch; ++i) {
    if (status[i] == hera::cuda::kLogitBadValue) {
      throw py::value_error("logits row " + std::to_string(i) + " holds NaN or +inf; logits must be finite or -inf");
    }
    if (status[i] == hera::cuda::kLogitAllMasked) {
      throw py::value_error("logits row " + std::to_string(i) + " is all -inf; at least one token must be possible");
    }
  }
  return out;
}

// A forest uploaded to the device. Built from the arrays of hera_core._native.Forest.arrays();
// they are validated here so no walk can index outside its tree or its row.
class CudaForest {
 public:
  CudaForest(int32_t num_feature, float base_margin, bool sigmoid, py::dict arrays) {
    auto get = [&](const char* key, auto tag) {
      using T = decltype(tag);
      if (!arrays.contains(key)) throw py::value_error(std::string("forest arrays lack '") + key + "'");
      py::array a = arrays[key];
      if (!py::isinstance<py::array_t<T>>(a) || a.itemsize() != sizeof(T) || a.ndim() != 1) {
        throw py::value_error(std::string("forest array '") + key + "' has the wrong dtype or shape");
      }
      auto c = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(a);
      return std::vector<T>(c.data(), c.data() + c.size());
    };
    const auto tree_offset = get("tree_offset", int32_t{});
    const auto tree_depth = get("tree_depth", int32_t{});
    const auto tree_complete = get("tree_complete", uint8_t{});
    const auto split = get("split", int32_t{});
    const auto threshold = get("threshold", float{});
    const auto left = get("left", int32_t{});
    const auto leaf_value = get("leaf_value", float{});
    validate(num_feature, tree_offset, tree_depth, tree_complete, split, threshold, left, leaf_value);

    view_.num_feature = num_feature;
    view_.n_trees = static_cast<int32_t>(tree_depth.size());
    view_.base_margin = base_margin;
    view_.sigmoid = sigmoid;
    view_.tree_offset = upload(tree_offset);
    view_.tree_depth = upload(tree_depth);
    view_.tree_complete = upload(tree_complete);
    view_.split = upload(split);
    view_.threshold = upload(threshold);
    view_.left = upload(left);
    view_.leaf_value = upload(leaf_value);
  }

  int32_t n_features() const { return view_.num_feature; }
  int32_t n_trees() const { return view_.n_trees; }

  void predict_device(uintptr_t x, int64_t batch, uintptr_t out, bool output_margin, uintptr_t stream) const {
    ensure_open();
    if (batch < 0) throw py::value_error("batch must be >= 0");
    if (batch > 0 && (x == 0 || out == 0)) throw py::value_error("X and out must be device pointers");
    cudaError_t err;
    {
      py::gil_scoped_release release;
      err = hera::cuda::launch_forest_predict(view_, as_device_ptr<const float>(x), batch, as_device_ptr<float>(out),
                                              output_margin, as_stream(stream));
    }
    check(err, "forest kernel launch");
  }

  py::array_t<float> predict_host(const py::object& x_any, bool output_margin) const {
    ensure_open();
    auto x = hera::as_feature_matrix(x_any, view_.num_feature);
    const int64_t batch = x.shape(0), nf = x.shape(1);
    py::array_t<float> out(batch);
    if (batch == 0) return out;
    const float* src = x.data();
    float* dst = out.mutable_data();
    {
      py::gil_scoped_release release;
      const size_t in_bytes = static_cast<size_t>(batch) * nf * sizeof(float);
      DeviceBuffer d_x(in_bytes), d_out(batch * sizeof(float));
      d_x.upload(src, in_bytes);
      check(hera::cuda::launch_forest_predict(view_, d_x.get<float>(), batch, d_out.get<float>(), output_margin,
                                              nullptr),
            "forest kernel launch");
      check(cudaMemcpy(dst, d_out.get<float>(), batch * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy to host");
    }
    return out;
  }

  void close() {
    buffers_.clear();
    closed_ = true;
  }

 private:
  static void validate(int32_t num_feature, const std::vector<int32_t>& tree_offset,
                       const std::vector<int32_t>& tree_depth, const std::vector<uint8_t>& tree_complete,
                       const std::vector<int32_t>& split, const std::vector<float>& threshold,
                       const std::vector<int32_t>& left, const std::vector<float>& leaf_value) {
    auto bad = [](const std::string& why) { throw py::value_error("invalid forest arrays: " + why); };
    if (num_feature < 1) bad("num_feature must be >= 1");
    const size_t n_trees = tree_depth.size();
    if (tree_offset.size() != n_trees + 1 || tree_complete.size() != n_trees) bad("tree array lengths differ");
    const size_t n_nodes = split.size();
    if (threshold.size() != n_nodes || left.size() != n_nodes || leaf_value.size() != n_nodes) {
      bad("node array lengths differ");
    }
    if (tree_offset[0] != 0 || static_cast<size_t>(tree_offset[n_trees]) != n_nodes) {
      bad("tree_offset must span the nodes");
    }
    for (size_t t = 0; t < n_trees; ++t) {
      const int64_t lo = tree_offset[t], hi = tree_offset[t + 1], size = hi - lo;
      if (size < 1) bad("tree " + std::to_string(t) + " is empty");
      const int32_t depth = tree_depth[t];
      if (depth < 0 || depth >= size) bad("tree " + std::to_string(t) + " has a bad depth");
      if (tree_complete[t] && (depth > 30 || (int64_t{2} << depth) - 1 != size)) {
        bad("tree " + std::to_string(t) + " is marked complete but has the wrong size");
      }
      for (int64_t n = lo; n < hi; ++n) {
        if ((split[n] & 0x7fffffff) >= num_feature) bad("a split column is out of range");
        // A step goes to left + 0 or left + 1, both inside the tree (leaves: left = self - 1).
        if (!tree_complete[t] && (left[n] < lo - 1 || left[n] + 1 >= hi)) bad("a child index leaves its tree");
      }
    }
  }

  template <class T>
  const T* upload(const std::vector<T>& v) {
    buffers_.emplace_back(v.size() * sizeof(T));
    buffers_.back().upload(v.data(), v.size() * sizeof(T));
    return buffers_.back().get<T>();
  }

  void ensure_open() const {
    if (closed_) throw py::value_error("the CUDA forest is closed");
  }

  hera::cuda::DeviceForestView view_{};  // device pointers into buffers_
  std::vector<DeviceBuffer> buffers_;    // owns the device copies of the node arrays
  bool closed_ = false;                  // close() freed the device memory
};

}  // namespace

PYBIND11_MODULE(_native_cuda, m) {
  m.doc() = "HERA CUDA kernels: batched logit features and tree-ensemble scoring";
  m.attr("__version__") = HERA_VERSION;
  m.attr("__source_hash__") = HERA_SOURCE_HASH;
  m.def("device_count", &device_count, "Visible CUDA devices; 0 when there is no driver or device.");
  m.def("logit_features_device", &logit_features_device, py::arg("logits"), py::arg("batch"), py::arg("vocab"),
        py::arg("out"), py::arg("status") = 0, py::arg("stream") = 0,
        "Launch the features kernel on device pointers: logits float32 [batch, vocab], out float32 "
        "[batch, 3], status int32 [batch] or 0 (0 ok, 1 NaN/+inf, 2 all -inf; bad rows get NaN "
        "features). Asynchronous on `stream` (a cudaStream_t as int, 0 = default stream).");
  m.def("logit_features", &logit_features_host, py::arg("logits"),
        "Host convenience: numpy float32 [batch, vocab] -> float32 [batch, 3] through the device; "
        "ValueError for NaN/+inf/all -inf rows like the CPU function.");
  py::class_<CudaForest>(m, "Forest", "A tree ensemble in device memory (see hera_core.native.forest.Forest.to_cuda).")
      .def(py::init<int32_t, float, bool, py::dict>(), py::arg("n_features"), py::arg("base_margin"),
           py::arg("sigmoid"), py::arg("arrays"))
      .def_property_readonly("n_features", &CudaForest::n_features)
      .def_property_readonly("n_trees", &CudaForest::n_trees)
      .def("predict_device", &CudaForest::predict_device, py::arg("X"), py::arg("batch"), py::arg("out"),
           py::arg("output_margin") = false, py::arg("stream") = 0,
           "Launch on device pointers: X float32 [batch, n_features] (NaN = missing), out float32 "
           "[batch]. Asynchronous on `stream`.")
      .def("predict", &CudaForest::predict_host, py::arg("X"), py::arg("output_margin") = false,
           "Host convenience: numpy float32 [batch, n_features] -> float32 [batch] through the device.")
      .def("close", &CudaForest::close, "Free the device memory now.");
}
