"""CUDA kernels (hera_core._native_cuda) against the CPU references.

Built wherever nvcc is found; the tests that launch kernels are marked gpu and skip cleanly when
the module is missing or no device is visible (no driver, no GPU).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import xgboost as xgb

from hera_core import native
from hera_core.native.features import logit_features_cuda, logit_features_numpy
from hera_core.native.forest import Forest

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def cuda_module():
    # Not there (no nvcc at build time, or not installed): skip. Present but stale or broken: fail.
    if importlib.util.find_spec("hera_core._native_cuda") is None:
        pytest.skip("hera_core._native_cuda is not built or not installed (it needs nvcc at build time)")
    return native.load_cuda()


@pytest.fixture(scope="module")
def gpu(cuda_module):
    if cuda_module.device_count() == 0:
        pytest.skip("no CUDA device visible")
    return cuda_module


def random_logits(batch: int, vocab: int, *, seed: int = 0, masked: float = 0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((batch, vocab)) * 4).astype(np.float32)
    x[rng.random(x.shape) < masked] = -np.inf
    x[:, 0] = 1.0  # every row keeps a possible token
    return x


def trained(
    depth: int = 6, n_trees: int = 50, n_features: int = 8, missing: float = 0.2
) -> tuple[xgb.Booster, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, n_features)).astype(np.float32)
    x[rng.random(x.shape) < missing] = np.nan
    y = (rng.random(500) < 0.4).astype(np.float32)
    params = {"max_depth": depth, "nthread": 1, "objective": "binary:logistic"}
    booster = xgb.train(params, xgb.DMatrix(x, label=y), n_trees)
    booster.set_param({"nthread": 1})
    return booster, x


def test_module_imports_without_a_device(cuda_module) -> None:
    """Importing the CUDA module and asking for devices never fails, GPU or not: with every device
    hidden (CUDA_VISIBLE_DEVICES=""), a fresh process imports it, counts 0 and reports CUDA off."""
    import os
    import subprocess
    import sys

    count = cuda_module.device_count()
    assert isinstance(count, int) and native.cuda_available() == (count > 0)
    probe = ("from hera_core import native; m = native.load_cuda(); "
             "print(m.device_count(), native.cuda_available())")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["0", "False"]


@pytest.mark.gpu
def test_features_match_numpy(gpu) -> None:
    x = random_logits(64, 49152)
    x[3, 7] = 1e30
    x[4, :] = -np.inf
    x[4, 100] = -1e30
    np.testing.assert_allclose(logit_features_cuda(x), logit_features_numpy(x), rtol=RTOL, atol=ATOL)
    small = random_logits(5, 3, masked=0.0)
    np.testing.assert_allclose(logit_features_cuda(small), logit_features_numpy(small), rtol=RTOL, atol=ATOL)


@pytest.mark.gpu
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_features_bad_rows_are_value_errors(gpu, value: float) -> None:
    x = random_logits(3, 1000)
    x[2, 999] = value
    with pytest.raises(ValueError, match="row 2"):
        logit_features_cuda(x)
    x = random_logits(3, 1000)
    x[1] = -np.inf
    with pytest.raises(ValueError, match="row 1 is all -inf"):
        logit_features_cuda(x)


@pytest.mark.gpu
def test_forest_matches_xgboost(gpu) -> None:
    booster, x = trained()
    with Forest.from_booster(booster, native=True).to_cuda() as device_forest:
        np.testing.assert_allclose(device_forest.predict(x), booster.inplace_predict(x), rtol=RTOL, atol=ATOL)
        margin = booster.inplace_predict(x, predict_type="margin")
        np.testing.assert_allclose(device_forest.predict(x, output_margin=True), margin, rtol=RTOL, atol=ATOL)
        with pytest.raises(ValueError):
            device_forest.predict(x[:, :3].copy())


@pytest.mark.gpu
def test_forest_compact_layout_matches_xgboost(gpu) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 6)).astype(np.float32)
    y = (rng.random(2000) < 0.5).astype(np.float32)
    params = {"max_depth": 0, "grow_policy": "lossguide", "max_leaves": 64, "nthread": 1}
    params["objective"] = "binary:logistic"
    booster = xgb.train(params, xgb.DMatrix(x, label=y), 10)
    with Forest.from_booster(booster).to_cuda() as device_forest:
        np.testing.assert_allclose(device_forest.predict(x), booster.inplace_predict(x), rtol=RTOL, atol=ATOL)


@pytest.mark.gpu
def test_device_pointer_entry_points(gpu) -> None:
    cupy = pytest.importorskip("cupy")
    logits = random_logits(8, 4096)
    d_logits = cupy.asarray(logits)
    d_out = cupy.empty((8, 3), dtype=cupy.float32)
    d_status = cupy.empty(8, dtype=cupy.int32)
    gpu.logit_features_device(d_logits.data.ptr, 8, 4096, d_out.data.ptr, d_status.data.ptr, 0)
    cupy.cuda.Device().synchronize()
    np.testing.assert_allclose(cupy.asnumpy(d_out), logit_features_numpy(logits), rtol=RTOL, atol=ATOL)
    assert not cupy.asnumpy(d_status).any()

    booster, x = trained()
    d_x = cupy.asarray(x)
    d_pred = cupy.empty(len(x), dtype=cupy.float32)
    with Forest.from_booster(booster).to_cuda() as device_forest:
        device_forest.predict_device(d_x.data.ptr, len(x), d_pred.data.ptr)
        cupy.cuda.Device().synchronize()
    np.testing.assert_allclose(cupy.asnumpy(d_pred), booster.inplace_predict(x), rtol=RTOL, atol=ATOL)


def test_forest_arrays_are_validated(cuda_module) -> None:
    """The device forest checks the arrays it is given (no GPU needed: it fails before upload)."""
    booster, _ = trained(n_trees=3)
    forest = native.load().Forest.from_json(bytes(booster.save_raw(raw_format="json")))
    arrays = forest.arrays()
    bad = dict(arrays, split=arrays["split"] | np.int32(100))  # columns beyond n_features
    with pytest.raises(ValueError, match="split column"):
        cuda_module.Forest(forest.n_features, 0.0, True, bad)
    bad = dict(arrays, threshold=arrays["threshold"][:-1])
    with pytest.raises(ValueError, match="lengths"):
        cuda_module.Forest(forest.n_features, 0.0, True, bad)
    bad = dict(arrays, tree_offset=arrays["tree_offset"].astype(np.int64))
    with pytest.raises(ValueError, match="dtype"):
        cuda_module.Forest(forest.n_features, 0.0, True, bad)
