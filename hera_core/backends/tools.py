"""Tool calls (OpenAI function calling) for engines that decode themselves.

A request's `tools`, `tool_choice` and `parallel_tool_calls` become a `ToolSet`: checked once
(a malformed tool is the client's mistake: InvalidRequestError), rendered into the prompt by the
model's own chat template, and turned into a llama.cpp grammar (GBNF, from the tools' JSON Schemas
through llama-cpp-python's converter) that the local decode follows once a call starts, so a local
call is well-formed JSON naming an offered tool with arguments of its schema. The arguments are
validated with `jsonschema` as well (the grammar converter does not cover every keyword); a call
that fails is never returned as valid: the runtime escalates the step.

Output format: the Hermes/Qwen convention the templates teach,

    <tool_call>
    {"name": "add", "arguments": {"a": 1, "b": 2}}
    </tool_call>

one block per call, parallel calls as consecutive blocks.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from hera_core.errors import InvalidRequestError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


@dataclass(frozen=True)
class ToolSet:
    tools: tuple[dict[str, Any], ...]  # OpenAI tool objects, as the request sent them
    choice: str = "auto"  # auto | none | required | function (then `only` names it)
    only: str | None = None
    parallel: bool = True

    @classmethod
    def parse(cls, tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = None) -> "ToolSet | None":
        """The request's tool fields, checked; None when it offers no tools."""
        if tools is None or tools == []:
            if tool_choice not in (None, "none", "auto"):
                raise InvalidRequestError("tool_choice needs tools")
            return None
        if not isinstance(tools, list):
            raise InvalidRequestError("tools must be a list of {\"type\": \"function\", \"function\": {...}} objects")
        names = []
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
                raise InvalidRequestError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
            name = fn.get("name")
            if not isinstance(name, str) or not _NAME.match(name):
                raise InvalidRequestError(f"tools[{i}].function.name must be 1-64 letters, digits, _ or -")
            if name in names:
                raise InvalidRequestError(f"tools[{i}]: a second function named {name!r}")
            names.append(name)
            params = fn.get("parameters", {"type": "object", "properties": {}})
            if not isinstance(params, dict):
                raise InvalidRequestError(f"tools[{i}].function.parameters must be a JSON Schema object")
            _check_schema(params, f"tools[{i}].function.parameters")
        only = None
        if tool_choice is None:
            choice = "auto"
        elif tool_choice in ("auto", "none", "required"):
            choice = tool_choice
        elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and \
                isinstance(tool_choice.get("function"), dict):
            choice, only = "function", tool_choice["function"].get("name")
            if only not in names:
                raise InvalidRequestError(f"tool_choice names function {only!r}, which is not among the tools")
        else:
            raise InvalidRequestError("tool_choice must be 'auto', 'none', 'required' or "
                                      "{\"type\": \"function\", \"function\": {\"name\": ...}}")
        if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
            raise InvalidRequestError("parallel_tool_calls must be true or false")
        return cls(tuple(tools), choice, only, parallel_tool_calls is not False and choice != "function")

    @cached_property
    def schemas(self) -> dict[str, dict[str, Any]]:
        """Function name -> its parameters' JSON Schema."""
        return {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "properties": {}})
                for t in self.tools}

    def callable_names(self) -> list[str]:
        return [self.only] if self.only else list(self.schemas)

    def grammar(self, opened: bool) -> str:
        """GBNF for the tool-call blocks; `opened`: the first `<tool_call>` is already decoded
        (auto mode, where the model chose to call), else the output must start with it."""
        from hera_core.backends.structured import schema_gbnf  # (it builds on this module)

        calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                  "properties": {"name": {"const": n}, "arguments": self.schemas[n]}} for n in self.callable_names()]
        body = schema_gbnf({"anyOf": calls} if len(calls) > 1 else calls[0], prop_order=["name", "arguments"])
        body = re.sub(r"^root ::=", "hera-call ::=", body, flags=re.M)
        block = f'"\\n" hera-call "\\n{CLOSE}"'
        more = f' ( "\\n"? "{OPEN}" {block} )*' if self.parallel else ""
        first = block if opened else f'"{OPEN}" {block}'
        # A newline may follow the last call: the template ends a call's line before the turn ends,
        # and without it a model that writes one would be forced into another call.
        return f'root ::= {first}{more} "\\n"?\n{body}\n'

    def request_fields(self) -> dict[str, Any]:
        """The OpenAI request fields that offer these tools (to send them on to another server)."""
        choice: Any = self.choice if self.choice != "function" else {"type": "function",
                                                                    "function": {"name": self.only}}
        fields: dict[str, Any] = {"tools": list(self.tools), "tool_choice": choice}
        if not self.parallel and self.choice != "function":
            fields["parallel_tool_calls"] = False
        return fields

    def check_openai_calls(self, calls: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
        """OpenAI tool_calls from elsewhere (a cloud answer) -> (the valid ones, why the others are not)."""
        valid, errors = [], []
        for c in calls:
            fn = c.get("function") if isinstance(c, dict) else None
            try:
                args = json.loads(fn.get("arguments") or "{}") if isinstance(fn, dict) else None
            except (json.JSONDecodeError, TypeError):
                errors.append("a tool call's arguments are not JSON")
                continue
            why = self.validate(fn.get("name") if fn else None, args) if fn else "a tool call has no function"
            if why:
                errors.append(why)
            else:
                valid.append({"id": c.get("id") or openai_call(fn["name"], args)["id"], "type": "function",
                              "function": {"name": fn["name"], "arguments": fn.get("arguments") or "{}"}})
        return valid, errors

    def validate(self, name: str, arguments: Any) -> str | None:
        """Why this call is not valid for these tools, or None."""
        import jsonschema

        if name not in self.callable_names():
            return f"function {name!r} is not among the callable tools"
        if not isinstance(arguments, dict):
            return f"arguments of {name!r} must be a JSON object"
        try:
            jsonschema.validate(arguments, self.schemas[name])
        except jsonschema.ValidationError as exc:
            return f"arguments of {name!r} do not match its schema: {exc.message}"
        return None


def _check_schema(schema: dict[str, Any], where: str) -> None:
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidRequestError(f"{where} is not a valid JSON Schema: {exc.message}") from None


def _bare_calls(text: str) -> list[Any] | None:
    """A whole answer that is nothing but call objects without the tags (small models often write
    `{"name": ..., "arguments": ...}`, fenced or not): those objects, else None."""
    body = _FENCE.sub(r"\1", text.strip()).strip()
    if not body.startswith(("{", "[")):
        return None
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    objs = obj if isinstance(obj, list) else [obj]
    if objs and all(isinstance(o, dict) and set(o) == {"name", "arguments"} for o in objs):
        return objs
    return None


def parse_calls(text: str, toolset: ToolSet) -> tuple[str, list[dict[str, Any]], list[str]]:
    """Model output -> (content before the first call, OpenAI tool_calls, why each invalid call is
    invalid). A block that is not JSON, names no offered tool or breaks its schema is an error."""
    calls, errors = [], []
    if OPEN in text:
        content = text.split(OPEN, 1)[0]
        blocks: list[Any] = _BLOCK.findall(text)
        if len(blocks) != text.count(OPEN):
            errors.append("a tool call was not closed")
    else:
        bare = _bare_calls(text) if toolset.choice != "none" else None
        content, blocks = ("", bare) if bare else (text, [])
    for raw in blocks:
        try:
            obj = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError as exc:
            errors.append(f"a tool call is not JSON ({exc.msg})")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            errors.append("a tool call has no function name")
            continue
        why = toolset.validate(obj["name"], obj.get("arguments"))
        if why:
            errors.append(why)
            continue
        calls.append(openai_call(obj["name"], obj["arguments"]))
    if toolset.choice in ("required", "function") and not calls and not errors:
        errors.append(f"tool_choice {toolset.choice!r} but the model called no tool")
    return content, calls, errors


def openai_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as chat templates expect them: an assistant's tool-call arguments as objects
    (OpenAI sends JSON strings), no None content."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if m.get("content") is None or calls:
            m = {**m, "content": m.get("content") or ""}
        if calls:
            fixed = []
            for c in calls:
                fn = dict(c.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        raise InvalidRequestError("an assistant tool call's arguments are not valid JSON") from None
                fixed.append({**c, "function": fn})
            m["tool_calls"] = fixed
        out.append(m)
    return out
