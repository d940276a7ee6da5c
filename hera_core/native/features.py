"""Logit features of the SLM prefill: the model's own uncertainty about the next token.

`logit_features` dispatches to the native kernel (csrc/features.cpp: one read of each row,
vectorized) or to `logit_features_numpy`, its pure-numpy twin and reference.
`logit_features_cuda` runs the CUDA kernel (csrc/cuda/) on host arrays; for logits already on
the GPU call `hera_core.native.load_cuda().logit_features_device` with device pointers.

Semantics (all three): per row of float32 [batch, vocab] logits, entropy of the softmax in nats,
top-1 probability, and top-1 minus top-2 probability. -inf marks an impossible token; NaN, +inf
or a row that is all -inf raise ValueError.
"""

from __future__ import annotations

import numpy as np

from hera_core import native
from hera_core.native.arrays import float32_matrix

LOGIT_FEATURE_NAMES = ("entropy", "top1_prob", "top_margin")


def _validate(logits: np.ndarray) -> np.ndarray:
    logits = float32_matrix(logits, "logits")
    if logits.shape[1] < 1:
        raise ValueError("logits must have at least one column (vocab >= 1)")
    return logits


def logit_features_numpy(logits: np.ndarray) -> np.ndarray:
    """Reference: float32 [batch, vocab] -> float32 [batch, 3] (entropy, top-1 prob, top1-top2 margin)."""
    x = _validate(logits).astype(np.float64)
    if np.isnan(x).any() or np.isposinf(x).any():
        raise ValueError("logits contain NaN or +inf; logits must be finite or -inf")
    m = x.max(axis=1, keepdims=True)
    if np.isneginf(m).any():
        raise ValueError("a logits row is all -inf; at least one token must be possible")
    d = x - m
    e = np.exp(d)
    s0 = e.sum(axis=1)
    s1 = np.where(e > 0, e * np.where(np.isneginf(d), 0.0, d), 0.0).sum(axis=1)
    if x.shape[1] > 1:
        top2 = np.partition(x, x.shape[1] - 2, axis=1)[:, -2]
    else:
        top2 = np.full(x.shape[0], -np.inf)
    p1 = 1.0 / s0
    p2 = np.exp(top2 - m[:, 0]) / s0
    out = np.stack([np.log(s0) - s1 / s0, p1, p1 - p2], axis=1)
    return out.astype(np.float32)


def logit_features(logits: np.ndarray) -> np.ndarray:
    """Batched logit features, one native call per batch (GIL released)."""
    if native.native_enabled():
        return native.load().logit_features(logits)
    return logit_features_numpy(logits)


def logit_features_cuda(logits: np.ndarray) -> np.ndarray:
    """The CUDA kernel on a host array (copies through the device). Needs hera_core._native_cuda
    and a GPU; ImportError / RuntimeError otherwise, ValueError for bad logits like the CPU."""
    return native.load_cuda().logit_features(logits)
