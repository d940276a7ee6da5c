"""JSON on the wire (hera_core/wirejson.py): what the proxy and the cloud engine write is JSON."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hera_core import wirejson

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False,
                    allow_infinity=False) | st.text(), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(), inner, max_size=4), max_leaves=20)


@given(JSON)
def test_round_trips_like_the_standard_library(value):
    assert json.loads(wirejson.dumps(value)) == json.loads(json.dumps(value))
    assert wirejson.loads(json.dumps(value)) == json.loads(json.dumps(value))


def test_sorted_keys_make_one_text_of_equal_objects():
    assert wirejson.dumps({"b": 1, "a": [2]}, sort_keys=True) == wirejson.dumps({"a": [2], "b": 1}, sort_keys=True)


def test_numpy_scalars_and_non_finite_numbers():
    out = json.loads(wirejson.dumps({"p": np.float32(0.25), "n": np.int64(3), "x": np.float64(0.5), "nan": float("nan")}))
    assert out == {"p": 0.25, "n": 3, "x": 0.5, "nan": None}  # never the non-JSON literal NaN
    with pytest.raises(TypeError, match="not JSON serializable"):
        wirejson.dumps({"a": object()})
    with pytest.raises(json.JSONDecodeError):  # what the server maps to a 400
        wirejson.loads(b'{"a": NaN}')


def test_what_orjson_would_change_or_refuse_goes_to_the_standard_library():
    big = 123456789012345678901234567890
    assert wirejson.loads(f'{{"seed": {big}}}'.encode()) == {"seed": big}  # not a float
    assert json.loads(wirejson.dumps({"seed": 2**70})) == {"seed": 2**70}
    deep: list = []
    for _ in range(300):
        deep = [deep]
    assert json.loads(wirejson.dumps(deep)) == deep
    with pytest.raises(json.JSONDecodeError):
        wirejson.loads(f'{{"a": NaN, "seed": {big}}}'.encode())
