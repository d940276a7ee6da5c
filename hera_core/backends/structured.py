"""Structured outputs: a request's `response_format`, checked once, and the check of an answer.

    fmt = ResponseFormat.parse({"type": "json_schema", "json_schema": {"name": "plan", "schema": {...}}})
    fmt.validate(text)  # None, or why the answer is not what was asked for

`json_object` asks for any JSON object; `json_schema` for an instance of its schema (`strict`
as OpenAI defines it: every property listed in `required`, no additional properties; the schema
is checked to be valid JSON Schema, and, with strict, to follow those rules). Both routes use
it: the cloud's answer is validated before it is returned; a local engine that can constrain
its decoding compiles `schema()` into a grammar, so its answer always validates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hera_core.backends.tools import ToolSet
from hera_core.errors import FieldError

_OBJECT = {"type": "object"}


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def schema_size(node: Any) -> int:
    """Properties declared anywhere in a JSON Schema: an object's own, and those of its property
    schemas, array items, `$defs`/`definitions` and `anyOf`/`oneOf`/`allOf` branches."""
    if not isinstance(node, dict):
        return 0
    subs: list[Any] = []
    props = node.get("properties")
    if isinstance(props, dict):
        subs += props.values()
    for key in ("$defs", "definitions"):
        if isinstance(node.get(key), dict):
            subs += node[key].values()
    for key in _SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            subs += node[key]
    for key in _SUBSCHEMA:
        sub = node.get(key)
        subs += sub if isinstance(sub, list) else [sub]
    return (len(props) if isinstance(props, dict) else 0) + sum(schema_size(x) for x in subs)


@dataclass(frozen=True)
class ResponseFormat:
    type: str  # "json_object" | "json_schema"
    json_schema: dict[str, Any] | None = None  # the schema of a json_schema format (None: json_object)
    name: str = ""  # json_schema.name
    strict: bool = False

    @classmethod
    def parse(cls, value: Any) -> "ResponseFormat | None":
        """The request's response_format, checked (a FieldError naming it otherwise); None for
        absent or {"type": "text"} (free text: nothing to constrain or validate)."""
        if value is None:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("type"), str):
            raise FieldError('response_format must be an object with a "type": "text", "json_object" or '
                             '"json_schema"', "response_format")
        kind = value["type"]
        if kind == "text":
            return None
        if kind == "json_object":
            return cls("json_object")
        if kind != "json_schema":
            raise FieldError(f"response_format.type {kind!r} is not one of 'text', 'json_object', 'json_schema'",
                             "response_format")
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise FieldError("response_format.json_schema must be an object with a name and a schema",
                             "response_format")
        name, schema, strict = spec.get("name"), spec.get("schema", _OBJECT), spec.get("strict")
        if not isinstance(name, str) or not 1 <= len(name) <= 64 or \
                not all(c.isalnum() or c in "_-" for c in name):
            raise FieldError("response_format.json_schema.name must be 1-64 letters, digits, _ or -",
                             "response_format")
        if not isinstance(schema, dict):
            raise FieldError("response_format.json_schema.schema must be a JSON Schema object", "response_format")
        if strict is not None and not isinstance(strict, bool):
            raise FieldError("response_format.json_schema.strict must be true or false", "response_format")
        _check_schema(schema)
        if strict:
            _check_strict(schema, "schema")
        return cls("json_schema", schema, name, bool(strict))

    def schema(self) -> dict[str, Any]:
        """The JSON Schema an answer must satisfy (json_object: any object)."""
        return self.json_schema if self.json_schema is not None else _OBJECT

    @property
    def size(self) -> int:
        """The schema's size as the predictor reads it: its properties at every depth ($defs and
        array items included); 0 for json_object (any object)."""
        return schema_size(self.json_schema) if self.json_schema is not None else 0

    def request_field(self) -> dict[str, Any]:
        """The field as a cloud request carries it."""
        if self.type == "json_object":
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"name": self.name, "schema": self.json_schema,
                                                        "strict": self.strict}}

    def validate(self, text: str) -> str | None:
        """Why `text` is not an answer in this format (not JSON, not an object, not valid against
        the schema), or None. The whole text must be the JSON value: no fences, no prose."""
        import jsonschema

        try:
            value = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            return f"the answer is not JSON ({getattr(exc, 'msg', exc)})"
        if self.type == "json_object":
            return None if isinstance(value, dict) else "the answer is JSON but not an object"
        try:
            jsonschema.validate(value, self.json_schema)
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path)
            return f"the answer does not match the schema{f' at {where}' if where else ''}: {exc.message}"
        return None


def _check_schema(schema: dict[str, Any]) -> None:
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise FieldError(f"response_format.json_schema.schema is not a valid JSON Schema: {exc.message}",
                         "response_format") from None


def _check_strict(schema: Any, where: str) -> None:
    """OpenAI's strict mode: every object lists all its properties in `required` and sets
    additionalProperties false (so the shape is fully determined)."""
    if isinstance(schema, list):
        for i, s in enumerate(schema):
            _check_strict(s, f"{where}[{i}]")
        return
    if not isinstance(schema, dict):
        return
    if schema.get("type") == "object" or "properties" in schema:
        props = schema.get("properties", {})
        if schema.get("additionalProperties", True) is not False:
            raise FieldError(f"response_format: strict schemas need additionalProperties: false at {where}",
                             "response_format")
        missing = sorted(set(props) - set(schema.get("required", [])))
        if missing:
            raise FieldError(f"response_format: strict schemas list every property in required; {where} "
                             f"leaves out {', '.join(missing)}", "response_format")
    for key in ("properties", "$defs", "definitions"):
        for k, sub in (schema.get(key) or {}).items():
            _check_strict(sub, f"{where}.{key}.{k}")
    for key in ("items", "anyOf", "allOf", "oneOf"):
        if key in schema:
            _check_strict(schema[key], f"{where}.{key}")


# --- the SLM's structured answer under the tool-call grammar ----------------------------------------
# Until the local engine compiles a response_format into a grammar of its own, a structured step on
# the SLM decodes as a forced call of one function whose parameters are the schema: the tool-call
# grammar (built from that schema by json_schema_to_gbnf) constrains every token, the arguments are
# validated with jsonschema, and they are the answer. The prompt then offers that one function.
ANSWER_TOOL = "hera_structured_answer"


def answer_toolset(fmt: ResponseFormat) -> "ToolSet | None":
    """The forced one-function ToolSet whose call is `fmt`'s answer; None where the schema's root is
    not an object (a function's arguments are one)."""
    schema = fmt.schema()
    if schema.get("type") != "object":
        return None
    what = f" ({fmt.name})" if fmt.name else ""
    tool = {"type": "function", "function": {"name": ANSWER_TOOL, "parameters": schema,
                                             "description": f"Give your answer{what} as this function's arguments."}}
    return ToolSet.parse([tool], {"type": "function", "function": {"name": ANSWER_TOOL}})


def schema_gbnf(schema: dict[str, Any], prop_order: list[str] | None = None) -> str:
    """llama-cpp-python's json_schema_to_gbnf, with each bounded integer compiled into a rule of
    exactly its range: the converter ignores minimum and maximum (a 2018 for an integer of at most
    14 parsed, then failed validation). Tool calls and structured answers both use it."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    ranges: list[str] = []
    gbnf = json_schema_to_gbnf(json.dumps(_placeholders(schema, ranges)), prop_order=prop_order)
    for i, alts in enumerate(ranges):
        literal = f'"\\"{_MARK}{i}a\\"" | "\\"{_MARK}{i}b\\""'
        if literal not in gbnf:  # laid out otherwise: the bounds are left to validation, as before
            gbnf = json_schema_to_gbnf(json.dumps(schema), prop_order=prop_order)
            break
        gbnf = gbnf.replace(literal, f"({alts}) space")
    # JSON strings hold no raw control characters (llama.cpp's own converter excludes them; the
    # Python port lets a newline into a string, and the answer then does not parse).
    return gbnf.replace(_LOOSE_CHAR, _JSON_CHAR)


_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


_MARK = "__hera_int_"


def _placeholders(schema: Any, ranges: list[str]) -> Any:
    """`schema` with every integer that has bounds replaced by a two-value enum of marker strings
    (the converter lays it out as one rule, replaced afterwards by the range's rule); `ranges`
    receives each range's GBNF alternation, in marker order."""
    if isinstance(schema, list):
        return [_placeholders(s, ranges) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if schema.get("type") == "integer" and "enum" not in schema and "const" not in schema:
        alts = int_range_gbnf(schema)
        if alts is not None:
            ranges.append(alts)
            i = len(ranges) - 1
            return {"enum": [f"{_MARK}{i}a", f"{_MARK}{i}b"]}
    return {k: _placeholders(v, ranges) if k not in ("enum", "const", "required") else v for k, v in schema.items()}


def _bound(schema: dict, inclusive: str, exclusive: str, step: int) -> int | None:
    """An integer schema's lowest (step 1) or highest (step -1) allowed value, or None: unbounded."""
    values = []
    if isinstance(schema.get(inclusive), (int, float)) and not isinstance(schema.get(inclusive), bool):
        v = schema[inclusive]
        values.append(int(v) if v == int(v) else (int(v) + (1 if step > 0 else 0)) if v > 0 else
                      int(v) + (0 if step > 0 else -1))
    if isinstance(schema.get(exclusive), (int, float)) and not isinstance(schema.get(exclusive), bool):
        v = schema[exclusive]
        values.append(int(v) + step if v == int(v) else _bound({inclusive: v}, inclusive, "", step))
    if not values:
        return None
    return max(values) if step > 0 else min(values)


def int_range_gbnf(schema: dict) -> str | None:
    """GBNF alternation matching exactly the JSON integers `schema` allows by minimum/maximum
    (exclusive ones too); None without bounds, or for an empty range (validation says no)."""
    lo = _bound(schema, "minimum", "exclusiveMinimum", 1)
    hi = _bound(schema, "maximum", "exclusiveMaximum", -1)
    if lo is None and hi is None or (lo is not None and hi is not None and lo > hi):
        return None
    alts: list[str] = []
    if lo is None or lo < 0:  # negatives: "-" and a magnitude from max(1, -hi) up to -lo (or unbounded)
        top = None if lo is None else -lo
        bottom = 1 if hi is None or hi >= 0 else -hi
        alts += [f'"-" {a}' for a in _magnitudes(bottom, top)]
    if hi is None or hi >= 0:
        alts += _magnitudes(max(lo or 0, 0), hi)
    return " | ".join(f"({a})" for a in alts)


def _magnitudes(lo: int, hi: int | None) -> list[str]:
    """GBNF sequences for the integers lo..hi (0 <= lo; hi None: no upper bound), no leading zeros."""
    out = []
    while hi is None or lo <= hi:
        top = 10 ** len(str(lo)) - 1
        if hi is None:
            out += _same_length(lo, top)
            out.append(" ".join(["[1-9]"] + ["[0-9]"] * len(str(lo)) + ["[0-9]*"]))  # every longer number
            return out
        top = min(hi, top)
        out += _same_length(lo, top)
        lo = top + 1
    return out


def _same_length(lo: int, hi: int) -> list[str]:
    """GBNF sequences for lo..hi, both of the same number of digits: each a fixed head, one digit
    class, then free digits (the regex-range construction)."""
    out = []
    start = lo
    while start <= hi:
        step = 1
        while start % (step * 10) == 0 and start + step * 10 - 1 <= hi and len(str(step * 10)) <= len(str(start)):
            step *= 10
        end = start + min((hi - start + 1) // step, 10 - (start // step) % 10) * step - 1
        k = len(str(step)) - 1
        s, e = str(start), str(end)
        head, a, b = s[: len(s) - k - 1], s[len(s) - k - 1], e[len(e) - k - 1]
        out.append(" ".join(([f'"{head}"'] if head else []) + [f"[{a}-{b}]" if a != b else f'"{a}"'] + ["[0-9]"] * k))
        start = end + 1
    return out


def is_answer_toolset(toolset: Any) -> bool:
    return toolset is not None and toolset.only == ANSWER_TOOL and len(toolset.tools) == 1


def answer_from_call(gen):
    """A generation under `answer_toolset` as the structured answer: the call's arguments are the
    text (none if the call was not valid: its tool_errors say why, and the step is escalated)."""
    import dataclasses

    if gen.tool_calls:
        return dataclasses.replace(gen, text=gen.tool_calls[0]["function"]["arguments"], tool_calls=[],
                                   finish_reason="stop" if gen.finish_reason == "tool_calls" else gen.finish_reason)
    return dataclasses.replace(gen, text="", tool_errors=gen.tool_errors or ["the SLM gave no structured answer"])
