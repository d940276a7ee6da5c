"""Scoring benchmarks: the native forest against XGBoost, the native logit features against numpy.

Both sides of each comparison share a parameter id (`test_forest_native[b1]` and
`test_forest_xgboost[b1]`) and a benchmark group, and bench/conftest.py runs each pair back to
back so machine noise hits both alike. Everything is single-threaded (XGBoost nthread=1; ours has
no threads). Run: pytest bench/test_scoring.py --benchmark-only
"""

from __future__ import annotations

import numpy as np
import pytest
import xgboost as xgb

from hera_core import native
from hera_core.native.features import logit_features_numpy
from hera_core.native.forest import Forest

N_FEATURES = 32
N_TREES = 200
DEPTH = 6
VOCAB = 49152  # SmolLM2's vocabulary
FOREST_BATCHES = [1, 16, 256, 4096]
FEATURE_BATCHES = [1, 64]
WARMUP_CALLS = 20
INTERLEAVE_PAIRS = True  # bench/conftest.py runs each native/reference pair back to back


def batch_id(batch: int) -> str:
    return f"b{batch}"


@pytest.fixture(scope="module")
def booster() -> xgb.Booster:
    """200 trees of depth 6 on 32 random features (random labels: the trees use their full depth)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20_000, N_FEATURES)).astype(np.float32)
    y = (rng.random(20_000) < 0.5).astype(np.float32)
    params = {"max_depth": DEPTH, "objective": "binary:logistic", "nthread": 1, "seed": 0}
    model = xgb.train(params, xgb.DMatrix(x, label=y), num_boost_round=N_TREES)
    model.set_param({"nthread": 1})
    return model


@pytest.fixture(scope="module")
def forest(booster: xgb.Booster) -> Forest:
    f = Forest.from_booster(booster, native=True)
    x = features_batch(512)
    np.testing.assert_allclose(f.predict(x), booster.inplace_predict(x), rtol=1e-6, atol=1e-6)
    return f


def features_batch(batch: int) -> np.ndarray:
    """Subtask feature rows, 5% missing."""
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, N_FEATURES)).astype(np.float32)
    x[rng.random(x.shape) < 0.05] = np.nan
    return x


def logits_batch(batch: int) -> np.ndarray:
    """Last-position logits of a 49152-token vocabulary."""
    rng = np.random.default_rng(batch)
    return (rng.standard_normal((batch, VOCAB)) * 4).astype(np.float32)


def warm(fn, *args) -> None:
    """Page in the inputs, fill caches, settle XGBoost's per-booster setup before timing."""
    for _ in range(WARMUP_CALLS):
        fn(*args)


@pytest.mark.parametrize("batch", FOREST_BATCHES, ids=batch_id)
def test_forest_native(benchmark, forest: Forest, batch: int) -> None:
    """hera_core Forest.predict: one native call per batch, flat node arrays, no threads."""
    benchmark.group = f"forest {batch_id(batch)}"
    x = features_batch(batch)
    warm(forest.predict, x)
    out = benchmark(forest.predict, x)
    assert out.shape == (batch,)


@pytest.mark.parametrize("batch", FOREST_BATCHES, ids=batch_id)
def test_forest_xgboost(benchmark, booster: xgb.Booster, batch: int) -> None:
    """xgboost Booster.inplace_predict on the same model and rows, nthread=1 (the reference)."""
    benchmark.group = f"forest {batch_id(batch)}"
    x = features_batch(batch)
    warm(booster.inplace_predict, x)
    out = benchmark(booster.inplace_predict, x)
    assert out.shape == (batch,)


@pytest.mark.parametrize("batch", FEATURE_BATCHES, ids=batch_id)
def test_features_native(benchmark, batch: int) -> None:
    """Native logit features: one read of each 196 KiB row (online max / sum-exp, vectorized)."""
    benchmark.group = f"features {batch_id(batch)}"
    fn = native.load().logit_features
    x = logits_batch(batch)
    warm(fn, x)
    out = benchmark(fn, x)
    assert out.shape == (batch, 3)


@pytest.mark.parametrize("batch", FEATURE_BATCHES, ids=batch_id)
def test_features_numpy(benchmark, batch: int) -> None:
    """The numpy twin (float64 softmax, partition for the top two): the reference."""
    benchmark.group = f"features {batch_id(batch)}"
    x = logits_batch(batch)
    warm(logit_features_numpy, x)
    out = benchmark(logit_features_numpy, x)
    assert out.shape == (batch, 3)
