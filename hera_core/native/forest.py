"""The subtask predictor at serving time: a trained XGBoost model evaluated without XGBoost.

XGBoost trains the model and stays the reference; scoring uses `Forest`, which loads XGBoost's
JSON model format into flat arrays (csrc/forest.cpp) and predicts a float32 batch in one native
call with the GIL released: about 4 microseconds for one row of a 200-tree depth-6 model, where
`Booster.inplace_predict` costs 120-150 (bench/test_scoring.py).

`ForestPy` is the pure-numpy twin: same loader rules, same arithmetic (float32 sums in tree
order), used under HERA_NATIVE=0 and as the reference in parity tests. `Forest.to_cuda()` gives a
`CudaForest` that runs the same walk as a CUDA kernel.

Supported models: gbtree boosters with one output and numeric splits; objectives
binary:logistic and reg:logistic (sigmoid output), binary:logitraw, reg:squarederror,
reg:absoluteerror, reg:pseudohubererror (raw output). Anything else, and any malformed model,
raises ValueError naming the problem.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from hera_core import native as native_lib
from hera_core.native.arrays import float32_matrix
from hera_core.native.features import logit_features_numpy

SIGMOID_OBJECTIVES = frozenset({"binary:logistic", "reg:logistic"})
IDENTITY_OBJECTIVES = frozenset(
    {"binary:logitraw", "reg:squarederror", "reg:absoluteerror", "reg:pseudohubererror"}
)
SUPPORTED_OBJECTIVES = SIGMOID_OBJECTIVES | IDENTITY_OBJECTIVES

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _fail(what: str) -> ValueError:
    return ValueError(f"invalid XGBoost JSON model: {what}")


def validate_features(X: Any, n_features: int) -> np.ndarray:
    """Checks a predict input: float32, 2-D [batch, n_features], C-contiguous (no silent copies)."""
    X = float32_matrix(X, "X")
    if X.shape[1] != n_features:
        raise ValueError(f"X has {X.shape[1]} features, the model expects {n_features}")
    return X


def _read_model_file(path: str | PathLike[str]) -> bytes:
    p = Path(path)
    if p.suffix.lower() in (".ubj", ".bin", ".model"):
        raise ValueError(f"{p}: only XGBoost's JSON model format is supported; save the model as .json")
    return p.read_bytes()


def _booster_json(booster: Any) -> bytes:
    save_raw = getattr(booster, "save_raw", None)
    if save_raw is None:
        raise ValueError(f"expected an xgboost.Booster, got {type(booster).__name__}")
    return bytes(save_raw(raw_format="json"))


# ---------------------------------------------------------------------------------------------
# Pure-Python twin


def _obj(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(f"{where} must be an object")
    return value


def _member(obj: dict, key: str, where: str) -> Any:
    if key not in obj:
        raise _fail(f"no {where}.{key}")
    return obj[key]


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(f"{where} must be a string")
    return value


def _int_list(value: Any, where: str) -> list[int]:
    # int64 like the native reader (bool is an int subclass in Python, but not a JSON number).
    if not isinstance(value, list) or not all(type(v) is int and -(2**63) <= v < 2**63 for v in value):
        raise _fail(f"{where} must be an array of 64-bit integers")
    return value


def _float_list(value: Any, where: str) -> list[float]:
    if not isinstance(value, list) or not all(type(v) in (int, float) for v in value):
        raise _fail(f"{where} must be an array of numbers")
    try:
        out = [float(v) for v in value]
    except OverflowError:
        raise _fail(f"{where}: number out of range") from None
    if not all(math.isfinite(v) for v in out):
        raise _fail(f"{where}: number out of range")
    return out


def _bool_list(value: Any, where: str) -> list[bool]:
    # XGBoost writes 0/1; older writers used true/false.
    if not isinstance(value, list) or not all(v in (0, 1) and type(v) in (int, bool) for v in value):
        raise _fail(f"{where} must be an array of 0/1")
    return [bool(v) for v in value]


def _int_from_str(s: str, what: str) -> int:
    try:
        if not s or s.strip() != s or s.startswith("+") or "_" in s:
            raise ValueError(s)
        return int(s, 10)
    except ValueError:
        raise _fail(f"{what} is not an integer: {s[:32]!r}") from None


def _scalar_from_str(s: str, what: str) -> float:
    # "[5.5E-1]" (XGBoost 3, a vector of one) or "5.5E-1".
    v = s
    if v.startswith("["):
        if len(v) < 2 or not v.endswith("]"):
            raise _fail(f"{what} is not a number: {s[:32]!r}")
        v = v[1:-1]
        if "," in v:
            raise _fail(f"{what} has several values; only single-output models are supported")
    if not v or v.strip() != v or v.startswith("+") or "_" in v:
        raise _fail(f"{what} is not a number: {s[:32]!r}")
    try:
        x = float(v)
    except ValueError:
        raise _fail(f"{what} is not a number: {s[:32]!r}") from None
    if v.lower().lstrip("-") in ("inf", "infinity", "nan") or not math.isfinite(x) or abs(x) > _FLOAT32_MAX:
        raise _fail(f"{what} is not a finite float")
    return x


def _to_float32(v: float) -> np.float32:
    """Thresholds beyond float32 range act as +-inf (the same rule as the native loader)."""
    if v > _FLOAT32_MAX:
        return np.float32(np.inf)
    if v < -_FLOAT32_MAX:
        return np.float32(-np.inf)
    return np.float32(v)


@dataclass(frozen=True)
class _PyTree:
    """One tree in XGBoost's own node numbering (the twin keeps it as written)."""

    left: np.ndarray  # int64 [n_nodes] left child id, -1 at leaves
    right: np.ndarray  # int64 [n_nodes] right child id, -1 at leaves
    feature: np.ndarray  # int64 [n_nodes] split column (0 at leaves)
    threshold: np.ndarray  # float32 [n_nodes] go left when x < threshold
    default_left: np.ndarray  # bool [n_nodes] missing (NaN) goes left
    leaf_value: np.ndarray  # float32 [n_nodes] leaf output in margin units (0 at splits)
    depth: int  # edges from the root to the deepest reachable leaf


def _check_tree(raw: Any, index: int, n_features: int) -> _PyTree:
    where = f"tree {index}"
    t = _obj(raw, where)
    left = _int_list(_member(t, "left_children", where), f"{where}.left_children")
    right = _int_list(_member(t, "right_children", where), f"{where}.right_children")
    feat = _int_list(_member(t, "split_indices", where), f"{where}.split_indices")
    cond = _float_list(_member(t, "split_conditions", where), f"{where}.split_conditions")
    dleft = _bool_list(_member(t, "default_left", where), f"{where}.default_left")
    n = len(left)
    if n == 0:
        raise _fail(f"{where}: has no nodes")
    if not (len(right) == len(feat) == len(cond) == len(dleft) == n):
        raise _fail(
            f"{where}: left_children, right_children, split_indices, split_conditions and "
            "default_left must have the same length"
        )
    split_type = t.get("split_type", [])
    if any(v != 0 for v in _int_list(split_type, f"{where}.split_type")) or _int_list(
        t.get("categories_nodes", []), f"{where}.categories_nodes"
    ):
        raise _fail(f"{where}: has categorical splits, which are not supported")
    param = _obj(t.get("tree_param", {}), f"{where}.tree_param")
    if "size_leaf_vector" in param:
        size = _int_from_str(_str(param["size_leaf_vector"], "size_leaf_vector"), "size_leaf_vector")
        if size > 1:
            raise _fail(f"{where}: has vector leaves (multi-target), which are not supported")

    # Breadth-first from the root: each node reached once (no cycles, no shared children).
    seen = bytearray(n)
    seen[0] = 1
    frontier = [(0, 0)]
    depth = 0
    threshold = np.zeros(n, dtype=np.float32)
    leaf_value = np.zeros(n, dtype=np.float32)
    while frontier:
        node, d = frontier.pop()
        lc, rc = left[node], right[node]
        if lc == -1 and rc == -1:
            v = cond[node]
            if not math.isfinite(v) or abs(v) > _FLOAT32_MAX:
                raise _fail(f"{where}: node {node} has a non-finite leaf value")
            leaf_value[node] = np.float32(v)
            depth = max(depth, d)
            continue
        for c in (lc, rc):
            if not 0 <= c < n:
                raise _fail(f"{where}: node {node} has child {c} out of range [0, {n})")
            if seen[c]:
                raise _fail(f"{where}: node {c} is reached twice (a cycle or a shared child)")
            seen[c] = 1
            frontier.append((c, d + 1))
        if not 0 <= feat[node] < n_features:
            raise _fail(
                f"{where}: node {node} splits on feature {feat[node]} but the model has {n_features} features"
            )
        if math.isnan(cond[node]):
            raise _fail(f"{where}: node {node} has a NaN threshold")
        threshold[node] = _to_float32(cond[node])
    feature = np.asarray(feat, dtype=np.int64)
    return _PyTree(
        left=np.asarray(left, dtype=np.int64),
        right=np.asarray(right, dtype=np.int64),
        feature=np.where(np.asarray(left) == -1, 0, feature),
        threshold=threshold,
        default_left=np.asarray(dleft, dtype=bool),
        leaf_value=leaf_value,
        depth=depth,
    )


def _reject_constant(name: str) -> None:
    raise _fail(f"{name} is not valid JSON")


class ForestPy:
    """Pure-numpy twin of the native forest, and its reference (same loader rules and sums)."""

    def __init__(self, *, n_features: int, objective: str, base_margin: np.float32, trees: list[_PyTree]) -> None:
        self._n_features = n_features  # columns the model was trained on
        self._objective = objective  # XGBoost objective name
        self._base_margin = np.float32(base_margin)  # intercept in margin units
        self._sigmoid = objective in SIGMOID_OBJECTIVES  # output = sigmoid(margin)
        self._trees = trees  # in boosting order (the order leaves are summed)

    @classmethod
    def from_json_bytes(cls, model: bytes | bytearray | memoryview) -> ForestPy:
        """Parses an XGBoost JSON model; ValueError naming the problem if malformed or unsupported."""
        try:
            doc = json.loads(bytes(model), parse_constant=_reject_constant)
        except RecursionError:
            raise _fail("nesting too deep") from None
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if str(exc).startswith("invalid XGBoost JSON model"):
                raise
            raise _fail(f"not JSON ({exc})") from None
        return cls._from_doc(doc)

    @classmethod
    def from_file(cls, path: str | PathLike[str]) -> ForestPy:
        return cls.from_json_bytes(_read_model_file(path))

    @classmethod
    def from_booster(cls, booster: Any) -> ForestPy:
        return cls.from_json_bytes(_booster_json(booster))

    @classmethod
    def _from_doc(cls, doc: Any) -> ForestPy:
        root = _obj(doc, "the document")
        if "learner" not in root:
            raise _fail("no 'learner' object (is this an XGBoost JSON model?)")
        learner = _obj(root["learner"], "learner")
        gb = _obj(_member(learner, "gradient_booster", "learner"), "learner.gradient_booster")
        booster = _str(gb.get("name", ""), "gradient_booster.name")
        if booster != "gbtree":
            raise _fail(f"booster '{booster}' is not supported; only gbtree (dart and gblinear are not)")
        model = _obj(_member(gb, "model", "gradient_booster"), "gradient_booster.model")
        trees = _member(model, "trees", "gradient_booster.model")
        if not isinstance(trees, list):
            raise _fail("gradient_booster.model.trees must be an array")
        param = _obj(_member(learner, "learner_model_param", "learner"), "learner_model_param")
        num_feature = _str(_member(param, "num_feature", "learner_model_param"), "num_feature")
        n_features = _int_from_str(num_feature, "num_feature")
        if not 1 <= n_features <= 2**31 - 1:
            raise _fail(f"num_feature must be >= 1, got {n_features}")
        if _int_from_str(_str(param.get("num_class", "0"), "num_class"), "num_class") > 1:
            raise _fail("multi-class models are not supported")
        if _int_from_str(_str(param.get("num_target", "1"), "num_target"), "num_target") > 1:
            raise _fail("multi-target models are not supported")
        tree_info = _int_list(model.get("tree_info", []), "tree_info")
        if len(tree_info) != len(trees):
            raise _fail("tree_info and trees differ in length")
        if any(g != 0 for g in tree_info):
            raise _fail("a tree belongs to another output group; only one output is supported")
        base_score_text = _str(_member(param, "base_score", "learner_model_param"), "base_score")
        base_score = _scalar_from_str(base_score_text, "base_score")
        objective = _str(_obj(learner.get("objective", {}), "learner.objective").get("name", ""), "objective.name")
        if objective not in SUPPORTED_OBJECTIVES:
            raise _fail(f"objective '{objective}' is not supported ({', '.join(sorted(SUPPORTED_OBJECTIVES))} are)")
        if objective in SIGMOID_OBJECTIVES:
            # XGBoost >= 2 stores base_score as a probability; the margin starts at its logit,
            # computed in float32 as XGBoost does.
            if not 0.0 < base_score < 1.0:
                raise _fail(f"base_score must be in (0, 1) for {objective}")
            b = np.float32(base_score)
            base_margin = -np.log(np.float32(1.0) / b - np.float32(1.0))
        else:
            base_margin = np.float32(base_score)
        checked = [_check_tree(t, i, n_features) for i, t in enumerate(trees)]
        return cls(n_features=n_features, objective=objective, base_margin=base_margin, trees=checked)

    @property
    def n_features(self) -> int:
        return self._n_features

    @property
    def n_trees(self) -> int:
        return len(self._trees)

    @property
    def objective(self) -> str:
        return self._objective

    def predict(self, X: np.ndarray, *, output_margin: bool = False) -> np.ndarray:
        """float32 [batch, n_features] (NaN = missing) -> float32 [batch]."""
        X = validate_features(X, self._n_features)
        batch = X.shape[0]
        rows = np.arange(batch)
        acc = np.full(batch, self._base_margin, dtype=np.float32)
        for t in self._trees:
            node = np.zeros(batch, dtype=np.int64)
            for _ in range(t.depth):
                leaf = t.left[node] == -1
                v = X[rows, t.feature[node]]
                # XGBoost's rule: missing follows the default direction, else left iff v < t.
                go_left = np.where(np.isnan(v), t.default_left[node], v < t.threshold[node])
                node = np.where(leaf, node, np.where(go_left, t.left[node], t.right[node]))
            acc += t.leaf_value[node]  # float32 adds in tree order, as XGBoost sums
        if self._sigmoid and not output_margin:
            with np.errstate(over="ignore"):  # e^-margin overflows to inf for margin < -88: output 0
                acc = np.float32(1.0) / (np.float32(1.0) + np.exp(-acc))
        return acc.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# Public API


class Forest:
    """A loaded XGBoost model. Native (csrc/forest.cpp) unless HERA_NATIVE=0 or native=False,
    in which case the numpy twin `ForestPy` runs; both give the same numbers."""

    def __init__(self, impl: Any, backend: str) -> None:
        # Use the from_* constructors; this only wraps a loaded implementation.
        self._impl = impl  # hera_core._native.Forest or ForestPy
        self._backend = backend  # "native" or "python"

    @classmethod
    def from_json_bytes(cls, model: bytes | bytearray | memoryview, *, native: bool | None = None) -> Forest:
        """Loads Booster.save_raw("json") bytes (or a .json model file's contents)."""
        if not isinstance(model, (bytes, bytearray, memoryview)):
            raise ValueError(f"model must be bytes, got {type(model).__name__}")
        use_native = native_lib.native_enabled() if native is None else native
        if use_native:
            return cls(native_lib.load().Forest.from_json(bytes(model)), "native")
        return cls(ForestPy.from_json_bytes(model), "python")

    @classmethod
    def from_file(cls, path: str | PathLike[str], *, native: bool | None = None) -> Forest:
        return cls.from_json_bytes(_read_model_file(path), native=native)

    @classmethod
    def from_booster(cls, booster: Any, *, native: bool | None = None) -> Forest:
        return cls.from_json_bytes(_booster_json(booster), native=native)

    @property
    def n_features(self) -> int:
        return self._impl.n_features

    @property
    def n_trees(self) -> int:
        return self._impl.n_trees

    @property
    def objective(self) -> str:
        return self._impl.objective

    @property
    def backend(self) -> str:
        """"native" or "python"."""
        return self._backend

    def predict(self, X: np.ndarray, *, output_margin: bool = False) -> np.ndarray:
        """float32 C-contiguous [batch, n_features], NaN = missing -> float32 [batch]: the
        probability for logistic objectives (the margin with output_margin=True), else the raw
        prediction. One call per batch, GIL released (native)."""
        if self._backend == "native":
            return self._impl.predict(X, output_margin)
        return self._impl.predict(X, output_margin=output_margin)

    def score_logits(self, rows: list[np.ndarray], structure: list[list[float]],
                     columns: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Steps scored from their SLM logits: per step the logit features of its logits row
        (float32 [vocab]) then its structure features make its row of X, and the model reads X's
        `columns` (int32 indices; None: all). (P float32 [n], X float32 [n, 3 + s]): one native call
        (GIL released once), or the numpy twins."""
        if self._backend == "native":
            return self._impl.score_logits(rows, structure, columns)
        feats = np.concatenate([logit_features_numpy(np.asarray(r).reshape(1, -1)) for r in rows])
        X = np.empty((len(rows), feats.shape[1] + len(structure[0])), dtype=np.float32)
        X[:, :feats.shape[1]] = feats
        X[:, feats.shape[1]:] = structure
        picked = X if columns is None else np.ascontiguousarray(X[:, np.asarray(columns, dtype=np.intp)])
        return self.predict(picked), X

    @property
    def kernel(self) -> Callable[[np.ndarray], np.ndarray]:
        """`predict` with nothing in between: X (float32 C-contiguous [batch, n_features]) -> P
        [batch], for callers that call it per step and have checked X themselves."""
        return self._impl.predict

    def to_cuda(self) -> CudaForest:
        """Uploads the model to the GPU (needs the native backend and hera_core._native_cuda)."""
        if self._backend != "native":
            raise ValueError("to_cuda() needs a native Forest (HERA_NATIVE=0 selected the Python twin)")
        impl = self._impl
        device = native_lib.load_cuda().Forest(impl.n_features, impl.base_margin, impl.sigmoid, impl.arrays())
        return CudaForest(device)

    def __repr__(self) -> str:
        return (
            f"Forest(n_trees={self.n_trees}, n_features={self.n_features}, "
            f"objective={self.objective!r}, backend={self._backend!r})"
        )


class CudaForest:
    """A forest in GPU memory. `predict` takes numpy arrays (copies through the device);
    `predict_device` takes device pointers (ints, e.g. cupy `.data.ptr`, torch `.data_ptr()`)
    and a stream, and returns at once. Free the memory with close() or a with-block."""

    def __init__(self, device_forest: Any) -> None:
        self._device = device_forest  # hera_core._native_cuda.Forest (owns the device arrays)

    @property
    def n_features(self) -> int:
        return self._device.n_features

    @property
    def n_trees(self) -> int:
        return self._device.n_trees

    def predict(self, X: np.ndarray, *, output_margin: bool = False) -> np.ndarray:
        return self._device.predict(X, output_margin)

    def predict_device(
        self, x_ptr: int, batch: int, out_ptr: int, *, output_margin: bool = False, stream: int = 0
    ) -> None:
        """X: device float32 [batch, n_features] row-major; out: device float32 [batch]."""
        self._device.predict_device(x_ptr, batch, out_ptr, output_margin, stream)

    def close(self) -> None:
        self._device.close()

    def __enter__(self) -> CudaForest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

