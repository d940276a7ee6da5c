"""Logit features: the native kernel against its numpy twin, and bad input for both."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hera_core import native
from hera_core.native.features import LOGIT_FEATURE_NAMES, logit_features, logit_features_numpy

RTOL, ATOL = 1e-5, 1e-6


def native_features(logits: np.ndarray) -> np.ndarray:
    return native.load().logit_features(logits)


# The same behavioural tests run against both implementations.
IMPLEMENTATIONS = [pytest.param(native_features, id="native"), pytest.param(logit_features_numpy, id="numpy")]


def random_logits(batch: int, vocab: int, *, seed: int = 0, scale: float = 4.0, masked: float = 0.0) -> np.ndarray:
    """float32 [batch, vocab] normal logits; a `masked` share set to -inf (never a whole row)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((batch, vocab)) * scale).astype(np.float32)
    if masked:
        x[rng.random((batch, vocab)) < masked] = -np.inf
        x[np.arange(batch), rng.integers(0, vocab, batch)] = rng.standard_normal(batch).astype(np.float32)
    return x


# Logit values that stress the kernel: ordinary, exact ties, masked, tiny gaps, huge magnitudes.
logit_value = st.one_of(
    st.floats(-60, 60, width=32),
    st.sampled_from([0.0, 1.0, -1.0, 5.5]),
    st.just(-np.inf),
    st.sampled_from([1e30, -1e30, 3e38, -3e38, 1e-30]),
)


@st.composite
def logit_batches(draw) -> np.ndarray:
    batch = draw(st.integers(1, 4))
    vocab = draw(st.integers(1, 2100))  # crosses the native chunk (1024) and lane (16) edges
    x = draw(hnp.arrays(np.float32, (batch, vocab), elements=logit_value, fill=st.nothing()))
    # At least one possible token per row.
    cols = draw(st.lists(st.integers(0, vocab - 1), min_size=batch, max_size=batch))
    for r, c in enumerate(cols):
        if x[r, c] == -np.inf:
            x[r, c] = 0.0
    return x


@settings(max_examples=150, deadline=None)
@given(logit_batches())
def test_native_matches_numpy(x: np.ndarray) -> None:
    np.testing.assert_allclose(native_features(x), logit_features_numpy(x), rtol=RTOL, atol=ATOL)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 60000),
    st.floats(0.01, 30.0),
    st.sampled_from([0.0, 0.3, 0.99]),
    st.integers(0, 2**32 - 1),
)
def test_native_matches_numpy_wide_rows(batch: int, vocab: int, scale: float, masked: float, seed: int) -> None:
    x = random_logits(batch, vocab, seed=seed, scale=scale, masked=masked)
    np.testing.assert_allclose(native_features(x), logit_features_numpy(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("features", IMPLEMENTATIONS)
def test_known_values(features) -> None:
    uniform = np.zeros((1, 4), dtype=np.float32)
    out = features(uniform)
    np.testing.assert_allclose(out[0], [np.log(4.0), 0.25, 0.0], atol=ATOL)
    certain = np.array([[0.0, -np.inf, -np.inf]], dtype=np.float32)
    np.testing.assert_allclose(features(certain)[0], [0.0, 1.0, 1.0], atol=ATOL)
    huge = np.array([[1e30, 0.0, -1e30]], dtype=np.float32)  # e^(0 - 1e30) is exactly 0
    np.testing.assert_allclose(features(huge)[0], [0.0, 1.0, 1.0], atol=ATOL)
    tie = np.array([[3.0, 3.0, -np.inf]], dtype=np.float32)
    np.testing.assert_allclose(features(tie)[0], [np.log(2.0), 0.5, 0.0], atol=ATOL)
    assert out.dtype == np.float32 and out.shape == (1, len(LOGIT_FEATURE_NAMES))


@pytest.mark.parametrize("features", IMPLEMENTATIONS)
def test_empty_batch(features) -> None:
    assert features(np.zeros((0, 7), dtype=np.float32)).shape == (0, 3)


def test_dispatch_follows_hera_native(monkeypatch: pytest.MonkeyPatch) -> None:
    x = random_logits(3, 500, masked=0.2)
    monkeypatch.setenv("HERA_NATIVE", "0")
    np.testing.assert_array_equal(logit_features(x), logit_features_numpy(x))
    monkeypatch.setenv("HERA_NATIVE", "1")
    np.testing.assert_array_equal(logit_features(x), native_features(x))


def _bad_value(value: float, column: int) -> np.ndarray:
    x = random_logits(3, 2000, seed=1)
    x[1, column] = value
    return x


BAD_INPUTS = {
    "nan": _bad_value(np.nan, 5),
    "nan_in_tail": _bad_value(np.nan, 1999),
    "nan_late_chunk": _bad_value(np.nan, 1500),
    "pos_inf": _bad_value(np.inf, 17),
    "all_masked_row": np.array([[0.0, 1.0], [-np.inf, -np.inf]], dtype=np.float32),
    "float64": np.zeros((2, 3), dtype=np.float64),
    "float16": np.zeros((2, 3), dtype=np.float16),
    "int32": np.zeros((2, 3), dtype=np.int32),
    "one_d": np.zeros(3, dtype=np.float32),
    "three_d": np.zeros((2, 3, 4), dtype=np.float32),
    "zero_vocab": np.zeros((2, 0), dtype=np.float32),
    "non_contiguous": np.zeros((4, 6), dtype=np.float32)[:, ::2],
    "fortran_order": np.asfortranarray(np.zeros((4, 6), dtype=np.float32)),
}


@pytest.mark.parametrize("features", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_value_error(features, name: str) -> None:
    with pytest.raises(ValueError):
        features(BAD_INPUTS[name])


@pytest.mark.parametrize("features", IMPLEMENTATIONS)
def test_list_input_is_value_error(features) -> None:
    with pytest.raises(ValueError):
        features([[0.0, 1.0]])


def test_error_names_the_row_and_column() -> None:
    with pytest.raises(ValueError, match=r"row 1 column 17 is \+inf"):
        native_features(BAD_INPUTS["pos_inf"])
    with pytest.raises(ValueError, match="row 1 is all -inf"):
        native_features(BAD_INPUTS["all_masked_row"])


def test_concurrent_calls_are_independent() -> None:
    """The kernel keeps no shared state: threads (the GIL is released) get their own answers."""
    inputs = [random_logits(8, 49152 // 4, seed=s, masked=0.1) for s in range(4)]
    expected = [native_features(x) for x in inputs]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(5):
            results[i] = native_features(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(results[i], want)


def test_score_batcher_scores_a_lone_step_in_place_and_batches_concurrent_ones() -> None:
    """A step with nothing else ready in its loop turn is scored at once (no turn waited); steps
    that arrive in the same turn share one feature and predictor call; both give the same P."""
    import asyncio

    from hera_core.routing.scoring import ScoreBatcher

    calls = []

    def score_rows(rows: list[np.ndarray], structure: list[list[float]]):
        calls.append(len(rows))
        X = np.hstack([np.concatenate([logit_features(r.reshape(1, -1)) for r in rows]),
                       np.asarray(structure, dtype=np.float32)])
        return X[:, 0] / 100.0, X

    rng = np.random.default_rng(0)
    rows = [rng.normal(size=4096).astype(np.float32) for _ in range(4)]
    batcher = ScoreBatcher(score_rows)

    def in_place(coro):
        """The coroutine's result if it finishes without suspending (None if it waits)."""
        try:
            coro.send(None)
        except StopIteration as done:
            return done.value
        coro.close()
        return None

    async def lone():
        return in_place(batcher.score(rows[0], [1.0, 2.0]))

    async def lone_while_another_is_ready():
        asyncio.get_running_loop().call_soon(lambda: None)
        return in_place(batcher.score(rows[1], [1.0, 2.0]))

    async def together():
        return await asyncio.gather(*[batcher.score(r, [1.0, 2.0]) for r in rows])

    p0, X0 = asyncio.run(lone())
    assert calls == [1] and batcher.stats == {"batches": 1, "rows": 1}
    assert asyncio.run(lone_while_another_is_ready()) is None  # it waits for a batch ...
    assert calls == [1, 1]  # ... flushed at the next turn
    many = asyncio.run(together())
    assert calls == [1, 1, 4] and batcher.stats == {"batches": 3, "rows": 6}
    assert many[0][0] == pytest.approx(p0) and np.array_equal(many[0][1], X0)


def test_the_live_paths_one_call_score_equals_features_rows_and_predictor_apart(monkeypatch) -> None:
    """Predictor.score_logits (the live path: logit features, feature rows and the forest in one
    native call) gives exactly what logit_features + feature_matrix + predict give, for the shipped
    predictor (whose model reads a prefix of today's columns) and its numpy twin; bad input is a
    ValueError naming it."""
    from hera_core.native.forest import Forest
    from hera_core.routing.predictor import Predictor, feature_matrix, structure_features

    messages = [{"role": "user", "content": "What is 6 times 7?"}]
    rng = np.random.default_rng(3)
    rows = [rng.normal(scale=4.0, size=151_936).astype(np.float32) for _ in range(3)]
    rows[1][:100] = -np.inf  # masked tokens
    structure = [structure_features(i, 40 + 7 * i, messages, None, 3 * i) for i in range(3)]
    X_apart = feature_matrix(np.concatenate([native_features(r.reshape(1, -1)) for r in rows]), structure)

    # the six-family run's predictor: an older schema's file, whose model reads the first columns only
    older = Path(__file__).resolve().parents[1] / "bench" / "eval" / "predictor.json"
    predictor = Predictor.load(older)
    assert predictor._col_index is not None
    P, X = predictor.score_logits(rows, structure)
    assert predictor._fused is not None  # the native one-call path ran
    np.testing.assert_array_equal(X, X_apart)
    np.testing.assert_array_equal(P, predictor.predict(X_apart))
    P1, X1 = predictor.score_logits(rows[2:], structure[2:])  # one step (the lone step's case)
    np.testing.assert_array_equal(P1, P[2:])
    np.testing.assert_array_equal(X1, X[2:])
    shipped = Predictor.load()  # today's schema: its model reads the whole row
    P_all, X_all = shipped.score_logits(rows, structure)
    assert shipped._col_index is None and shipped._fused is not None
    np.testing.assert_array_equal(X_all, X_apart)
    np.testing.assert_array_equal(P_all, shipped.predict(X_apart))

    twin = Predictor.load(older)  # the numpy twins, as where the native core is not built
    forest = Forest.from_json_bytes(twin.model_json, native=False)
    twin._impl, twin._fused = forest.kernel, None
    P_twin, X_twin = twin.score_logits(rows, structure)
    np.testing.assert_allclose(P_twin, P, rtol=1e-5)
    np.testing.assert_allclose(X_twin, X, rtol=RTOL, atol=ATOL)
    P_py, X_py = forest.score_logits(rows, structure, predictor._col_index)
    np.testing.assert_allclose(P_py, P, rtol=1e-5)

    with pytest.raises(ValueError, match="10 structure features"):
        predictor.score_logits(rows[:1], [structure[0][:-1]])
    with pytest.raises(ValueError, match="float32"):
        predictor.score_logits([rows[0].astype(np.float64)], structure[:1])
    with pytest.raises(ValueError, match="C-contiguous"):
        predictor.score_logits([rows[0][::2]], structure[:1])
    bad = rows[0].copy()
    bad[7] = np.nan
    with pytest.raises(ValueError, match="column 7 is NaN"):
        predictor.score_logits([bad], structure[:1])
    with pytest.raises(ValueError, match="model reads"):
        native.load().Forest.from_json(predictor.model_json).score_logits(rows[:1], structure[:1], None)
