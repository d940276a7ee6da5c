"""Score a batch of subtasks on the GPU: SLM logits already in device memory -> logit features
(CUDA kernel) -> joined with the structure features -> forest (CUDA kernel) -> probabilities.

Nothing of vocabulary size crosses to the host. The copies are the structure rows going in
(batch x 4 float32) and the probabilities and row statuses coming out (batch float32 + int32):
for a batch of 64 on a 151,936-token vocabulary that is under 3 KB instead of 39 MB of logits.

Device buffers come from the library that holds the logits, imported only when its array type
is seen: torch (what TensorRT-LLM returns) or cupy (any other `__cuda_array_interface__` array is
wrapped by cupy without a copy). Every launch goes on that library's current stream, after the
work that produced the logits there; the caller must have produced them on that stream.

`score_batch_cpu` is the same batch on the host (native features + native forest): the reference
of the parity tests and the CPU side of bench/test_gpu_scoring.py. To score with a trained
predictor: `Forest.from_json_bytes(predictor.model_json).to_cuda()` gives the CudaForest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hera_core import native
from hera_core.native.features import LOGIT_FEATURE_NAMES, logit_features
from hera_core.native.forest import CudaForest, Forest
from hera_core.routing.predictor import feature_matrix

N_LOGIT_FEATURES = len(LOGIT_FEATURE_NAMES)  # columns the features kernel writes, first in each row

# Row statuses of the CUDA features kernel (csrc/cuda/kernels.cuh).
_STATUS_BAD_VALUE = 1  # the row holds NaN or +inf
_STATUS_ALL_MASKED = 2  # every logit of the row is -inf


@dataclass(frozen=True)
class DeviceMatrix:
    """A float32 row-major matrix in device memory, as read from `__cuda_array_interface__`."""

    ptr: int  # device address of element [0, 0]
    rows: int
    cols: int


def device_matrix(array: Any, *, name: str = "logits") -> DeviceMatrix:
    """Checks that `array` is a C-contiguous float32 [rows, cols >= 1] CUDA array; ValueError
    otherwise (a host array included: it names `score_batch_cpu`)."""
    try:
        iface = array.__cuda_array_interface__
    except AttributeError:  # numpy arrays, CPU torch tensors
        raise ValueError(
            f"{name} must be a CUDA device array (a torch CUDA tensor or a cupy array), got "
            f"{type(array).__name__}; score host arrays with score_batch_cpu"
        ) from None
    except (TypeError, RuntimeError) as exc:  # torch: bfloat16, or a tensor that requires grad
        raise ValueError(f"{name} cannot be read as a float32 CUDA array: {exc}") from None
    shape = tuple(iface["shape"])
    if iface["typestr"] != "<f4":
        raise ValueError(f"{name} must be float32, got typestr {iface['typestr']!r}")
    if len(shape) != 2:
        raise ValueError(f"{name} must be 2-D [batch, vocab], got {len(shape)}-D")
    rows, cols = shape
    if cols < 1:
        raise ValueError(f"{name} must have at least one column (vocab >= 1)")
    strides = iface.get("strides")  # None: C-contiguous; a stride over an axis of length 1 is moot
    if strides is not None and not ((rows <= 1 or strides[0] == cols * 4) and (cols <= 1 or strides[1] == 4)):
        raise ValueError(f"{name} must be C-contiguous (call .contiguous() / cupy.ascontiguousarray)")
    ptr = int(iface["data"][0])
    if rows > 0 and ptr == 0:
        raise ValueError(f"{name} has a null device pointer")
    return DeviceMatrix(ptr=ptr, rows=rows, cols=cols)


def structure_matrix(structure: Any, batch: int, n_columns: int) -> np.ndarray:
    """The structure features as float32 C-contiguous [batch, n_columns] (NaN = missing)."""
    s = np.ascontiguousarray(np.asarray(structure, dtype=np.float32))
    if s.ndim == 1 and batch == 0 and s.size == 0:
        s = s.reshape(0, n_columns)
    if s.ndim != 2:
        raise ValueError(f"structure must be 2-D [batch, {n_columns}], got {s.ndim}-D")
    if s.shape != (batch, n_columns):
        raise ValueError(f"structure has shape {list(s.shape)}, expected [{batch}, {n_columns}] "
                         f"(one row per logits row; the model takes {n_columns} structure features)")
    return s


def _structure_columns(n_features: int) -> int:
    n = n_features - N_LOGIT_FEATURES
    if n < 0:
        raise ValueError(f"the model takes {n_features} features, fewer than the {N_LOGIT_FEATURES} logit features")
    return n


def _raise_bad_rows(status: np.ndarray) -> None:
    """The CPU functions' ValueErrors, from the kernel's row statuses."""
    bad = np.flatnonzero(status)
    if bad.size == 0:
        return
    i = int(bad[0])
    if status[i] == _STATUS_ALL_MASKED:
        raise ValueError(f"logits row {i} is all -inf; at least one token must be possible")
    raise ValueError(f"logits row {i} holds NaN or +inf; logits must be finite or -inf")


class _TorchBuffers:
    """Device buffers, copies and the current stream, with torch."""

    def __init__(self, like: Any) -> None:
        import torch

        self._torch = torch
        self._device = like.device  # the logits' GPU; buffers and launches go there

    def scope(self):
        return self._torch.cuda.device(self._device)

    def stream(self) -> int:
        return int(self._torch.cuda.current_stream(self._device).cuda_stream)

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        return self._torch.empty(shape, dtype=getattr(self._torch, dtype), device=self._device)

    def upload(self, host: np.ndarray) -> Any:
        return self._torch.from_numpy(host).to(self._device)

    def hstack(self, left: Any, right: Any) -> Any:
        return self._torch.cat((left, right), dim=1).contiguous()

    @staticmethod
    def ptr(buf: Any) -> int:
        return int(buf.data_ptr())

    @staticmethod
    def download(buf: Any) -> np.ndarray:
        return buf.cpu().numpy()  # synchronises with the stream the kernels ran on


class _CupyBuffers:
    """The same with cupy (also wraps any other `__cuda_array_interface__` array, no copy)."""

    def __init__(self, like: Any) -> None:
        import cupy

        self._cupy = cupy
        self._device_id = int(cupy.asarray(like).device.id)

    def scope(self):
        return self._cupy.cuda.Device(self._device_id)

    def stream(self) -> int:
        return int(self._cupy.cuda.get_current_stream().ptr)

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        return self._cupy.empty(shape, dtype=dtype)

    def upload(self, host: np.ndarray) -> Any:
        return self._cupy.asarray(host)

    def hstack(self, left: Any, right: Any) -> Any:
        return self._cupy.ascontiguousarray(self._cupy.concatenate((left, right), axis=1))

    @staticmethod
    def ptr(buf: Any) -> int:
        return int(buf.data.ptr)

    def download(self, buf: Any) -> np.ndarray:
        return self._cupy.asnumpy(buf)


def _buffers_for(array: Any) -> _TorchBuffers | _CupyBuffers:
    if type(array).__module__.split(".")[0] == "torch":
        return _TorchBuffers(array)
    try:
        return _CupyBuffers(array)
    except ImportError:
        raise ValueError(
            f"logits of type {type(array).__name__} need cupy for the device buffers; "
            "pass a torch CUDA tensor, or install cupy (pip install cupy-cuda12x)"
        ) from None


def score_batch_device(logits: Any, forest: CudaForest, structure: Any, *,
                       output_margin: bool = False) -> np.ndarray:
    """P(the SLM is good enough) for each row, computed on the GPU.

    logits: device float32 [batch, vocab], C-contiguous (torch CUDA tensor or cupy array), the
    last-position logits of each prompt. structure: host [batch, forest.n_features - 3], the
    structure features in predictor order. Returns host float32 [batch]: probabilities for a
    logistic model (margins with output_margin=True). A NaN/+inf or all -inf logits row is a
    ValueError naming the row, as on the CPU. Needs hera_core._native_cuda and a GPU.
    """
    m = device_matrix(logits)
    n_struct = _structure_columns(forest.n_features)
    struct = structure_matrix(structure, m.rows, n_struct)
    if m.rows == 0:
        return np.empty(0, dtype=np.float32)
    cuda = native.load_cuda()
    buf = _buffers_for(logits)
    with buf.scope():
        stream = buf.stream()
        feats = buf.empty((m.rows, N_LOGIT_FEATURES), "float32")
        status = buf.empty((m.rows,), "int32")
        cuda.logit_features_device(m.ptr, m.rows, m.cols, buf.ptr(feats), buf.ptr(status), stream)
        # The forest reads rows of [logit features | structure]: the kernel writes [batch, 3]
        # densely, so the join is one small device concatenation after it on the same stream.
        X = buf.hstack(feats, buf.upload(struct)) if n_struct else feats
        out = buf.empty((m.rows,), "float32")
        forest.predict_device(buf.ptr(X), m.rows, buf.ptr(out), output_margin=output_margin, stream=stream)
        probs = buf.download(out)
        row_status = buf.download(status)
    _raise_bad_rows(row_status)
    return probs.astype(np.float32, copy=False)


def score_batch_cpu(logits: np.ndarray, forest: Forest, structure: Any, *,
                    output_margin: bool = False) -> np.ndarray:
    """The same batch on the host: native logit features, the predictor's feature join, the
    native forest. logits: float32 C-contiguous [batch, vocab] numpy."""
    n_struct = _structure_columns(forest.n_features)
    feats = logit_features(logits)
    struct = structure_matrix(structure, feats.shape[0], n_struct)
    if feats.shape[0] == 0:
        return np.empty(0, dtype=np.float32)
    X = feature_matrix(feats, struct) if n_struct else np.ascontiguousarray(feats)
    return forest.predict(X, output_margin=output_margin)
