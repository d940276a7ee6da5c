"""The predictor's forest evaluator falls back, without changing a number: native forest, else
XGBoost where installed, else the numpy twin (a lean install without the native build or XGBoost)."""

import sys

import numpy as np

import hera_core.native
from hera_core.routing.predictor import Predictor


def _rows(predictor: Predictor, n: int = 64) -> np.ndarray:
    rng = np.random.default_rng(5)
    X = rng.normal(size=(n, len(predictor.input_names))).astype(np.float32)
    X[rng.random(X.shape) < 0.1] = np.nan  # missing values take the trees' default branches
    return X


def _without_native(monkeypatch):
    def not_built():
        raise ImportError("hera_core._native is not built (simulated)")
    monkeypatch.setattr(hera_core.native, "load", not_built)


def test_without_the_native_forest_or_xgboost_the_numpy_twin_predicts_the_same(monkeypatch):
    expected = Predictor.load().predict(_rows(Predictor.load()))
    _without_native(monkeypatch)
    monkeypatch.setitem(sys.modules, "xgboost", None)  # `import xgboost` raises ImportError
    lean = Predictor.load()
    np.testing.assert_allclose(lean.predict(_rows(lean)), expected, rtol=1e-6, atol=1e-7)


def test_without_the_native_forest_xgboost_predicts_the_same(monkeypatch):
    expected = Predictor.load().predict(_rows(Predictor.load()))
    _without_native(monkeypatch)
    fallback = Predictor.load()
    np.testing.assert_allclose(fallback.predict(_rows(fallback)), expected, rtol=1e-6, atol=1e-7)
