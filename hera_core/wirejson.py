"""JSON on the wire: the bodies `hera serve` reads and writes and those the cloud engine exchanges
with the provider, with orjson (about 1 us for a chat completion's body where the standard library
takes about 7, and a proxied request parses or writes four of them).

What differs from the standard library: `dumps` returns bytes, writes NaN and infinities as null
(the standard library writes `NaN`, which is not JSON), and writes numpy scalars as numbers;
`loads` refuses `NaN` literals and integers beyond 64 bits, and its error is a
`json.JSONDecodeError` (a ValueError) like the standard library's.
"""

from __future__ import annotations

from typing import Any

import orjson

loads = orjson.loads


def dumps(obj: Any, *, sort_keys: bool = False) -> bytes:
    option = orjson.OPT_SERIALIZE_NUMPY | (orjson.OPT_SORT_KEYS if sort_keys else 0)
    return orjson.dumps(obj, default=_plain, option=option)


def _plain(obj: Any) -> Any:
    item = getattr(obj, "item", None)  # a numpy scalar orjson does not take as it is
    if callable(item):
        return item()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")
