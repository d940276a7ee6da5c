"""JSON on the wire: the bodies `hera serve` reads and writes and those the cloud engine exchanges
with the provider, with orjson (about 1 us for a chat completion's body where the standard library
takes about 7, and a proxied request parses or writes four of them).

What differs from the standard library: `dumps` returns bytes, writes NaN and infinities as null
(the standard library writes `NaN`, which is not JSON), and writes numpy scalars as numbers;
`loads` refuses `NaN` literals, and its error is a `json.JSONDecodeError` (a ValueError) like the
standard library's. Where orjson would change a value or give up, the standard library does the
work: a body with an integer of 19 digits or more (orjson reads one beyond 64 bits as a float) is
read by it, and an object orjson cannot write (an integer beyond 64 bits, nesting deeper than 254)
is written by it.
"""

from __future__ import annotations

from typing import Any

import json
import re

import orjson

_LONG_INT = re.compile(rb"\d{19}")  # a run of 19 digits: maybe an integer orjson would read as a float


def loads(data: bytes | str) -> Any:
    raw = data.encode() if isinstance(data, str) else data
    if _LONG_INT.search(raw):
        return json.loads(raw, parse_constant=_not_json)
    return orjson.loads(raw)


def _not_json(literal: str) -> Any:
    raise json.JSONDecodeError(f"{literal} is not JSON", literal, 0)


def dumps(obj: Any, *, sort_keys: bool = False) -> bytes:
    option = orjson.OPT_SERIALIZE_NUMPY | (orjson.OPT_SORT_KEYS if sort_keys else 0)
    try:
        return orjson.dumps(obj, default=_plain, option=option)
    except orjson.JSONEncodeError:  # beyond 64 bits, or deeper than orjson goes
        return json.dumps(obj, default=_plain, sort_keys=sort_keys, allow_nan=False).encode()


def _plain(obj: Any) -> Any:
    item = getattr(obj, "item", None)  # a numpy scalar orjson does not take as it is
    if callable(item):
        return item()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")
