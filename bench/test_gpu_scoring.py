"""The scoring batch on the GPU against the CPU path: logits -> features -> predictor.

Each side starts where its engine leaves the logits:
- gpu: logits already in device memory (TensorRT-LLM), `score_batch_device`: the CUDA features
  kernel, a device join with the structure rows, the CUDA forest, one small copy back.
- cpu: logits in host memory (llama.cpp), `score_batch_cpu`: native features, native forest.
- gpu_from_host: host logits copied to the device first, then the gpu path (what GPU scoring
  would cost behind an engine that returns host logits, such as llama.cpp's CUDA build).

Batch 1, 64 and 1024 rows of a 151,936-token vocabulary (Qwen2.5's), 200 trees of depth 6 on the
predictor's 7 features. The sides of one batch size share a benchmark group. Skips without a CUDA
device, or without torch or cupy for device arrays.
Run: pytest bench/test_gpu_scoring.py --benchmark-only
"""

from __future__ import annotations

import numpy as np
import pytest
import xgboost as xgb

from hera_core import native
from hera_core.native.forest import Forest
from hera_core.gpu.scoring import score_batch_cpu, score_batch_device
from hera_core.routing.predictor import FEATURE_NAMES, STRUCTURE_FEATURE_NAMES
from tests.factories import device_array_module, to_device

if not native.cuda_available():
    pytest.skip("no CUDA device visible (or hera_core._native_cuda not built)", allow_module_level=True)

VOCAB = 151936
BATCHES = [1, 64, 1024]
N_TREES, DEPTH = 200, 6
WARMUP_CALLS = 10


def batch_id(batch: int) -> str:
    return f"b{batch}"


@pytest.fixture(scope="module")
def xp():
    """torch (CUDA build) or cupy, for the device copies of the inputs."""
    return device_array_module()


@pytest.fixture(scope="module")
def forest() -> Forest:
    """200 trees of depth 6 on random rows of the predictor's features (random labels: full depth)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20_000, len(FEATURE_NAMES))).astype(np.float32)
    y = (rng.random(20_000) < 0.5).astype(np.float32)
    booster = xgb.train({"max_depth": DEPTH, "objective": "binary:logistic", "nthread": 1, "seed": 0},
                        xgb.DMatrix(x, label=y), num_boost_round=N_TREES)
    return Forest.from_booster(booster, native=True)


@pytest.fixture(scope="module")
def cuda_forest(forest: Forest):
    with forest.to_cuda() as f:
        yield f


_INPUTS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def inputs(batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Host logits [batch, VOCAB] and structure rows [batch, 4], made once per batch size."""
    if batch not in _INPUTS:
        rng = np.random.default_rng(batch)
        logits = (rng.standard_normal((batch, VOCAB), dtype=np.float32) * 4)
        structure = rng.integers(0, 4000, (batch, len(STRUCTURE_FEATURE_NAMES))).astype(np.float32)
        _INPUTS[batch] = (logits, structure)
    return _INPUTS[batch]


def warm(fn, *args) -> None:
    for _ in range(WARMUP_CALLS):
        fn(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", BATCHES, ids=batch_id)
def test_score_gpu(benchmark, xp, forest, cuda_forest, batch: int) -> None:
    """Logits already on the device: features kernel, join, forest kernel, probabilities back."""
    benchmark.group = f"scoring {batch_id(batch)}"
    logits, structure = inputs(batch)
    d_logits = to_device(xp, logits)
    np.testing.assert_allclose(score_batch_device(d_logits, cuda_forest, structure),
                               score_batch_cpu(logits, forest, structure), rtol=1e-5, atol=1e-6)
    warm(score_batch_device, d_logits, cuda_forest, structure)
    out = benchmark(score_batch_device, d_logits, cuda_forest, structure)
    assert out.shape == (batch,)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", BATCHES, ids=batch_id)
def test_score_cpu(benchmark, forest, batch: int) -> None:
    """Logits in host memory: native features (one pass per row) and the native forest."""
    benchmark.group = f"scoring {batch_id(batch)}"
    logits, structure = inputs(batch)
    warm(score_batch_cpu, logits, forest, structure)
    out = benchmark(score_batch_cpu, logits, forest, structure)
    assert out.shape == (batch,)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", BATCHES, ids=batch_id)
def test_score_gpu_from_host(benchmark, xp, cuda_forest, batch: int) -> None:
    """Host logits copied to the device, then the GPU path: the cost of the copy GPU scoring avoids."""
    benchmark.group = f"scoring {batch_id(batch)}"
    logits, structure = inputs(batch)

    def run():
        return score_batch_device(to_device(xp, logits), cuda_forest, structure)

    warm(run)
    out = benchmark(run)
    assert out.shape == (batch,)
