"""Forest: native and numpy twin against xgboost.Booster.inplace_predict; a fuzzed loader."""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import pytest
import xgboost as xgb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hera_core.native.forest import SUPPORTED_OBJECTIVES, Forest, ForestPy

TOL = 1e-6
BACKENDS = [pytest.param(True, id="native"), pytest.param(False, id="python")]


# ---------------------------------------------------------------------------------------------
# Factories


def make_data(rows: int, n_features: int, *, seed: int, missing: float = 0.0) -> np.ndarray:
    """float32 [rows, n_features] normal features, a `missing` share set to NaN."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n_features)).astype(np.float32)
    if missing:
        x[rng.random(x.shape) < missing] = np.nan
    return x


def train(
    *,
    depth: int = 4,
    n_trees: int = 10,
    n_features: int = 6,
    objective: str = "binary:logistic",
    missing: float = 0.2,
    seed: int = 0,
    rows: int = 400,
    **params: Any,
) -> xgb.Booster:
    """A real XGBoost model on random data (labels random too: trees still split to depth)."""
    rng = np.random.default_rng(seed + 1)
    x = make_data(rows, n_features, seed=seed, missing=missing)
    if objective.startswith("binary:") or objective == "reg:logistic":
        y = (rng.random(rows) < 0.4).astype(np.float32)
    elif objective == "count:poisson":
        y = rng.poisson(2.0, rows).astype(np.float32)
    else:
        y = (rng.standard_normal(rows) * 3).astype(np.float32)
    booster = xgb.train(
        {
            "max_depth": depth,
            "objective": objective,
            "nthread": 1,
            "min_child_weight": 0,
            "eta": 0.3,
            "seed": seed,
            **params,
        },
        xgb.DMatrix(x, label=y),
        num_boost_round=n_trees,
    )
    booster.set_param({"nthread": 1})
    return booster


def model_json(booster: xgb.Booster) -> bytes:
    return bytes(booster.save_raw(raw_format="json"))


def load(model: bytes, native: bool) -> Forest:
    return Forest.from_json_bytes(model, native=native)


def assert_matches_xgboost(booster: xgb.Booster, x: np.ndarray) -> None:
    model = model_json(booster)
    want = booster.inplace_predict(x)
    want_margin = booster.inplace_predict(x, predict_type="margin")
    for native in (True, False):
        forest = load(model, native)
        np.testing.assert_allclose(forest.predict(x), want, rtol=TOL, atol=TOL, err_msg=forest.backend)
        np.testing.assert_allclose(
            forest.predict(x, output_margin=True), want_margin, rtol=TOL, atol=TOL, err_msg=forest.backend
        )


@pytest.fixture(scope="module")
def small_model() -> bytes:
    return model_json(train(depth=3, n_trees=5, n_features=4, missing=0.3))


# ---------------------------------------------------------------------------------------------
# Parity with XGBoost


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    depth=st.integers(1, 8),
    n_trees=st.integers(1, 500),
    n_features=st.integers(1, 40),
    missing=st.sampled_from([0.0, 0.1, 0.5]),
    batch=st.integers(1, 300),
    seed=st.integers(0, 2**16),
)
def test_random_models_match_xgboost(depth, n_trees, n_features, missing, batch, seed) -> None:
    booster = train(depth=depth, n_trees=n_trees, n_features=n_features, missing=missing, seed=seed, rows=300)
    x = make_data(batch, n_features, seed=seed + 7, missing=missing)
    assert_matches_xgboost(booster, x)


@pytest.mark.parametrize("objective", sorted(SUPPORTED_OBJECTIVES))
def test_objectives_match_xgboost(objective: str) -> None:
    booster = train(objective=objective, depth=5, n_trees=30)
    assert_matches_xgboost(booster, make_data(257, 6, seed=3, missing=0.2))


def test_lossguide_deep_trees_match_xgboost() -> None:
    """Unbalanced trees (lossguide, no depth limit) take the compact, non-padded layout."""
    booster = train(
        depth=0, n_trees=20, grow_policy="lossguide", max_leaves=64, tree_method="hist", rows=2000, missing=0.1
    )
    assert_matches_xgboost(booster, make_data(333, 6, seed=4, missing=0.1))


def test_random_forest_and_base_score_match_xgboost() -> None:
    booster = train(num_parallel_tree=4, n_trees=3, subsample=0.8, colsample_bynode=0.8, base_score=0.2)
    assert_matches_xgboost(booster, make_data(100, 6, seed=5, missing=0.2))


def test_special_values_match_xgboost() -> None:
    """Missing values both ways, infinities, values exactly on thresholds, every batch tail."""
    booster = train(depth=6, n_trees=40, missing=0.3)
    trees = trees_of(json.loads(model_json(booster)))
    thresholds = np.array(
        [c for t in trees for c, left in zip(t["split_conditions"], t["left_children"]) if left != -1],
        dtype=np.float32,
    )
    x = make_data(200, 6, seed=9, missing=0.3)
    x[:50] = thresholds[np.arange(300) % len(thresholds)].reshape(50, 6)
    x[50:60] = np.inf
    x[60:70] = -np.inf
    x[70:80] = np.nan
    assert_matches_xgboost(booster, x)
    for batch in range(1, 20):  # SIMD groups of 8 plus scalar tails
        assert_matches_xgboost(booster, x[:batch])


def test_zero_trees_give_the_base_score() -> None:
    booster = train(n_trees=0, base_score=0.3)
    assert_matches_xgboost(booster, make_data(5, 6, seed=1))


# ---------------------------------------------------------------------------------------------
# API


@pytest.mark.parametrize("native", BACKENDS)
def test_properties_and_constructors(native: bool, tmp_path) -> None:
    booster = train(n_trees=7, n_features=5)
    x = make_data(10, 5, seed=2)
    path = tmp_path / "model.json"
    booster.save_model(path)
    forests = [
        Forest.from_booster(booster, native=native),
        Forest.from_file(path, native=native),
        Forest.from_json_bytes(model_json(booster), native=native),
    ]
    for forest in forests:
        assert (forest.n_trees, forest.n_features, forest.objective) == (7, 5, "binary:logistic")
        assert forest.backend == ("native" if native else "python")
        np.testing.assert_allclose(forest.predict(x), forests[0].predict(x), rtol=TOL, atol=TOL)
    twin = ForestPy.from_file(path)
    np.testing.assert_allclose(twin.predict(x), booster.inplace_predict(x), rtol=TOL, atol=TOL)


def test_hera_native_selects_the_twin(monkeypatch: pytest.MonkeyPatch, small_model: bytes) -> None:
    monkeypatch.setenv("HERA_NATIVE", "0")
    assert Forest.from_json_bytes(small_model).backend == "python"
    monkeypatch.setenv("HERA_NATIVE", "1")
    assert Forest.from_json_bytes(small_model).backend == "native"


@pytest.mark.parametrize("native", BACKENDS)
def test_empty_batch(native: bool, small_model: bytes) -> None:
    out = load(small_model, native).predict(np.zeros((0, 4), dtype=np.float32))
    assert out.shape == (0,) and out.dtype == np.float32


BAD_X = {
    "wrong_n_features": np.zeros((3, 5), dtype=np.float32),
    "float64": np.zeros((3, 4), dtype=np.float64),
    "int": np.zeros((3, 4), dtype=np.int32),
    "one_d": np.zeros(4, dtype=np.float32),
    "three_d": np.zeros((1, 3, 4), dtype=np.float32),
    "non_contiguous": np.zeros((3, 8), dtype=np.float32)[:, ::2],
    "fortran": np.asfortranarray(np.zeros((3, 4), dtype=np.float32)),
    "list": [[0.0, 0.0, 0.0, 0.0]],
}


@pytest.mark.parametrize("native", BACKENDS)
@pytest.mark.parametrize("name", sorted(BAD_X))
def test_bad_predict_input_is_value_error(native: bool, name: str, small_model: bytes) -> None:
    with pytest.raises(ValueError):
        load(small_model, native).predict(BAD_X[name])


def unsupported_booster(kind: str) -> xgb.Booster:
    if kind == "multiclass":
        x = make_data(90, 3, seed=0)
        label = (np.arange(90) % 3).astype(np.float32)
        return xgb.train({"objective": "multi:softprob", "num_class": 3, "nthread": 1}, xgb.DMatrix(x, label=label), 2)
    if kind == "poisson":
        return train(objective="count:poisson", n_trees=2)
    return train(booster=kind, n_trees=2)


@pytest.mark.parametrize("native", BACKENDS)
@pytest.mark.parametrize(
    ("kind", "match"),
    [("dart", "dart"), ("gblinear", "gblinear"), ("multiclass", "multi-class"), ("poisson", "objective")],
)
def test_unsupported_models_are_value_errors(native: bool, kind: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load(model_json(unsupported_booster(kind)), native)


@pytest.mark.parametrize("native", BACKENDS)
def test_categorical_splits_are_rejected(native: bool) -> None:
    rng = np.random.default_rng(0)
    x = np.stack([rng.integers(0, 5, 300), rng.standard_normal(300)], axis=1).astype(np.float32)
    dm = xgb.DMatrix(x, label=(x[:, 0] > 2).astype(np.float32), feature_types=["c", "q"], enable_categorical=True)
    booster = xgb.train({"objective": "binary:logistic", "nthread": 1, "max_cat_to_onehot": 1}, dm, 3)
    with pytest.raises(ValueError, match="categorical"):
        load(model_json(booster), native)


@pytest.mark.parametrize("native", BACKENDS)
def test_non_json_model_file_is_value_error(native: bool, tmp_path) -> None:
    booster = train(n_trees=2)
    path = tmp_path / "model.ubj"
    booster.save_model(path)
    with pytest.raises(ValueError, match="JSON"):
        Forest.from_file(path, native=native)


# ---------------------------------------------------------------------------------------------
# Loader fuzzing: whatever the bytes, a ValueError or a working model, never a crash.


def try_load(model: bytes, native: bool) -> Forest | None:
    try:
        return load(model, native)
    except ValueError:
        return None


def must_reject(model: bytes) -> None:
    for native in (True, False):
        with pytest.raises(ValueError):
            load(model, native)


@pytest.fixture(scope="module")
def fuzz_model() -> dict:
    return json.loads(model_json(train(depth=3, n_trees=3, n_features=4, missing=0.3)))


def dumps(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def trees_of(doc: dict) -> list[dict]:
    return doc["learner"]["gradient_booster"]["model"]["trees"]


@pytest.mark.reliability
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_truncated_model_is_rejected(small_model: bytes, data) -> None:
    cut = data.draw(st.integers(0, len(small_model) - 1))
    must_reject(small_model[:cut])


@pytest.mark.reliability
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_bytes_load_or_raise_value_error(small_model: bytes, data) -> None:
    model = bytearray(small_model)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(model) - 1))
        action = data.draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = data.draw(st.sampled_from(list(b'{}[]",:-.0123456789eE tfnu\\\x00\xff')) | st.integers(0, 255))
        if action == "replace":
            model[pos] = byte
        elif action == "insert":
            model.insert(pos, byte)
        else:
            del model[pos]
    forests = [try_load(bytes(model), native) for native in (True, False)]
    x = make_data(20, 4, seed=1, missing=0.3)
    if all(f is not None for f in forests):
        # Both accepted it: they read the same model.
        np.testing.assert_allclose(forests[0].predict(x), forests[1].predict(x), rtol=TOL, atol=TOL)
    for forest in forests:
        if forest is not None and forest.n_features == 4:
            assert forest.predict(x).shape == (20,)


@pytest.mark.reliability
@settings(max_examples=100, deadline=None)
@given(blob=st.binary(max_size=300))
def test_random_bytes_are_rejected(blob: bytes) -> None:
    must_reject(blob)


REQUIRED_FIELDS = [
    ("learner",),
    ("learner", "gradient_booster"),
    ("learner", "gradient_booster", "name"),
    ("learner", "gradient_booster", "model"),
    ("learner", "gradient_booster", "model", "trees"),
    ("learner", "gradient_booster", "model", "tree_info"),
    ("learner", "learner_model_param"),
    ("learner", "learner_model_param", "base_score"),
    ("learner", "learner_model_param", "num_feature"),
    ("learner", "objective"),
    ("learner", "objective", "name"),
    ("tree", "left_children"),
    ("tree", "right_children"),
    ("tree", "split_indices"),
    ("tree", "split_conditions"),
    ("tree", "default_left"),
]


def _parent(doc: dict, path: tuple[str, ...]) -> dict:
    if path[0] == "tree":
        return trees_of(doc)[1]
    node = doc
    for key in path[:-1]:
        node = node[key]
    return node


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(-1e3, 1e3), st.text(max_size=5))
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)


@pytest.mark.reliability
@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(REQUIRED_FIELDS), value=json_value, drop=st.booleans())
def test_wrong_types_and_missing_fields_are_rejected(fuzz_model: dict, field, value, drop: bool) -> None:
    doc = copy.deepcopy(fuzz_model)
    parent = _parent(doc, field)
    original = parent[field[-1]]
    if drop:
        del parent[field[-1]]
    else:
        # Same JSON type as the original can be valid (e.g. another string for a name); skip it.
        if type(value) is type(original) or (isinstance(original, list) and isinstance(value, list)):
            return
        if isinstance(original, str) and isinstance(value, str):
            return
        parent[field[-1]] = value
    must_reject(dumps(doc))


def _tree_with(fuzz_model: dict, **changes: Any) -> bytes:
    doc = copy.deepcopy(fuzz_model)
    tree = trees_of(doc)[0]
    for key, (index, value) in changes.items():
        tree[key][index] = value
    return dumps(doc)


@pytest.mark.reliability
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_child_out_of_range_is_rejected(fuzz_model: dict, data) -> None:
    tree = trees_of(fuzz_model)[0]
    n = len(tree["left_children"])
    internal = [i for i in range(n) if tree["left_children"][i] != -1]
    node = data.draw(st.sampled_from(internal))
    side = data.draw(st.sampled_from(["left_children", "right_children"]))
    bad = data.draw(st.one_of(st.integers(n, 2**40), st.integers(-(2**40), -2)))
    must_reject(_tree_with(fuzz_model, **{side: (node, bad)}))


@pytest.mark.reliability
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_cycles_and_shared_children_are_rejected(fuzz_model: dict, data) -> None:
    tree = trees_of(fuzz_model)[0]
    left, right = tree["left_children"], tree["right_children"]
    internal = [i for i in range(len(left)) if left[i] != -1]
    node = data.draw(st.sampled_from(internal))
    side = data.draw(st.sampled_from(["left_children", "right_children"]))
    # Point at the root, at itself, at its other child, or at any node reached before it.
    reachable_before = [0, node, right[node] if side == "left_children" else left[node]]
    reachable_before += [i for i in internal if i < node]
    target = data.draw(st.sampled_from(reachable_before))
    must_reject(_tree_with(fuzz_model, **{side: (node, target)}))


@pytest.mark.reliability
@pytest.mark.parametrize(
    "change",
    [
        {"split_indices": (0, 4)},  # the model has 4 features
        {"split_indices": (0, -1)},
        {"split_indices": (0, 2**62)},
        {"split_indices": (0, 2**70)},  # beyond int64
        {"split_conditions": (0, "0.5")},
        {"split_conditions": (0, None)},
        {"default_left": (0, 2)},
        {"left_children": (0, 1.0)},
        {"left_children": (0, True)},
    ],
    ids=lambda c: f"{next(iter(c))}={next(iter(c.values()))[1]!r}",
)
def test_bad_node_values_are_rejected(fuzz_model: dict, change: dict) -> None:
    must_reject(_tree_with(fuzz_model, **change))


@pytest.mark.reliability
@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"null",
        b"[]",
        b"{}",
        b'{"learner": {}}',
        b"[" * 100_000,
        b'{"a":' * 100_000,
        b"\xef\xbb\xbf{}",
        b'{"learner": NaN}',
    ],
    ids=["empty", "null", "array", "object", "empty_learner", "deep_array", "deep_object", "bom", "nan"],
)
def test_degenerate_documents_are_rejected(text: bytes) -> None:
    must_reject(text)


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("learner", "learner_model_param", "num_feature"), "0"),
        (("learner", "learner_model_param", "num_feature"), "-3"),
        (("learner", "learner_model_param", "num_feature"), "1e3"),
        (("learner", "learner_model_param", "base_score"), "[1E0]"),
        (("learner", "learner_model_param", "base_score"), "[0.1,0.2]"),
        (("learner", "learner_model_param", "base_score"), "nan"),
        (("learner", "learner_model_param", "base_score"), "[]"),
        (("learner", "learner_model_param", "num_class"), "3"),
        (("learner", "learner_model_param", "num_target"), "2"),
        (("learner", "gradient_booster", "model", "tree_info"), [0, 0]),
        (("learner", "gradient_booster", "model", "tree_info"), [0, 1, 0]),
    ],
)
def test_bad_learner_params_are_rejected(fuzz_model: dict, path: tuple, value: Any) -> None:
    doc = copy.deepcopy(fuzz_model)
    _parent(doc, path)[path[-1]] = value
    must_reject(dumps(doc))
