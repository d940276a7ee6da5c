"""Small factories for test inputs."""

from __future__ import annotations

import numpy as np

from hera_core.routing.predictor import FEATURE_NAMES, Kappa, Predictor


def random_predictor(seed: int = 0, kappa: Kappa = Kappa(), trees: int = 10) -> Predictor:
    """A real XGBoost predictor fitted on random rows: for plumbing, not for routing quality."""
    import xgboost as xgb

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(200, len(FEATURE_NAMES))).astype(np.float32)
    y = (X[:, 0] + rng.normal(scale=0.5, size=200) > 0).astype(np.float32)
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 3, "nthread": 1},
                        xgb.DMatrix(X, label=y), num_boost_round=trees)
    return Predictor(model_json=bytes(booster.save_raw("json")), kappa=kappa)


def trace(task_id: str, split: str, llm_correct: float, labels: list[int], probs_feature: list[float]) -> dict:
    """A profiled task as `hera profile` writes it; feature 0 carries the signal."""
    steps = []
    for k, (label, f0) in enumerate(zip(labels, probs_feature)):
        feats = [0.0] * len(FEATURE_NAMES)
        feats[0] = f0
        feats[3] = float(k)
        steps.append({"step": k, "features": feats, "label": label})
    return {"task_id": task_id, "family": "f", "split": split, "llm_correct": llm_correct, "steps": steps}


def device_array_module():
    """torch (CUDA build) or cupy for device copies of test inputs, else skip the caller."""
    import importlib
    import importlib.util

    import pytest

    for name in ("torch", "cupy"):
        if importlib.util.find_spec(name) is not None:
            module = importlib.import_module(name)
            if name == "torch" and not module.cuda.is_available():
                continue
            return module
    pytest.skip("needs torch (CUDA build) or cupy for device arrays")


def to_device(xp, host: np.ndarray):
    return xp.from_numpy(host).cuda() if xp.__name__ == "torch" else xp.asarray(host)


def constant_draft_stage(keep: bool, threshold: float = 0.5):
    """A real XGBoost second stage fitted on one label only: it always keeps, or always escalates."""
    import xgboost as xgb

    from hera_core.routing.predictor import DRAFT_STAGE_FEATURE_NAMES, DraftStage

    rng = np.random.default_rng(1)
    X = rng.normal(size=(64, len(DRAFT_STAGE_FEATURE_NAMES))).astype(np.float32)
    y = np.full(64, 1.0 if keep else 0.0, dtype=np.float32)
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 2, "nthread": 1, "base_score": 0.5},
                        xgb.DMatrix(X, label=y),
                        num_boost_round=5)
    return DraftStage(model_json=bytes(booster.save_raw("json")), keep_threshold=threshold)
