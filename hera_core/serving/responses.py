"""`POST /v1/responses`: OpenAI's Responses API on the same per-step routing as chat completions.

A request is turned into a chat-completions request (instructions -> a system message, input text or
items -> messages, function tools flattened the Responses way -> chat tools, text.format ->
response_format, max_output_tokens -> max_tokens) and goes through the very code path
/v1/chat/completions uses (`server.prepare_routed`, `server.run_routed`): the same routing, ledger
rows, budgets and headers. The answer comes back as a Response object (`output`: a message and/or
function calls), or, streamed, as the Responses API's server-sent events.

`previous_response_id` continues a stored response: each response this node answers with
store != false is kept in an in-memory store (ResponseStore: bounded, the oldest dropped first,
lost when the server stops; per node, never shared by a fleet). Every request field is in
RESPONSE_FIELDS, honoured, sent to the cloud or refused by name, like chat completions' FIELDS.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from typing import Any

from aiohttp import web

from hera_core.errors import FieldError, HeraError, InvalidRequestError
from hera_core.serving.openai_api import Field_, Handling, error_from_exception, parse_request
from hera_core.serving import server as srv

MAX_STORED = 2000  # responses a node keeps for previous_response_id (in memory, oldest dropped first)


class ResponseStore:
    """Stored responses by id, bounded: the conversation (chat messages, the response's own answer
    last) and the Response object. One per app; what a restart forgets."""

    def __init__(self, max_entries: int = MAX_STORED) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._items: OrderedDict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = OrderedDict()

    def put(self, response_id: str, messages: list[dict[str, Any]], response: dict[str, Any]) -> None:
        self._items[response_id] = (messages, response)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def conversation(self, response_id: str) -> list[dict[str, Any]]:
        if response_id not in self._items:
            raise FieldError(f"Previous response with id {response_id!r} not found (this node keeps its last "
                             f"{self.max_entries} stored responses, in memory)", "previous_response_id")
        return list(self._items[response_id][0])

    def get(self, response_id: str) -> dict[str, Any] | None:
        item = self._items.get(response_id)
        return item[1] if item is not None else None

    def __len__(self) -> int:
        return len(self._items)


STORE = web.AppKey("responses_store", ResponseStore)


def _refuse_truncation(v: Any) -> str | None:
    return None if v in (None, "disabled") else "truncation 'auto' is not served: send 'disabled' or leave it out"


def _refuse_include(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, list) or any(x != "message.output_text.logprobs" for x in v):
        return "include: only 'message.output_text.logprobs' is served"
    return None


def _refuse_background(v: Any) -> str | None:
    return None if v in (None, False) else "background responses are not served: leave background out"


def _refuse_tier(v: Any) -> str | None:
    return None if v in (None, "auto", "default") else \
        f"service_tier {v!r}: HERA prices cloud steps at one tier; send 'auto', 'default' or leave it out"


# Every request field of the Responses API and what HERA does with it (model `hera`).
RESPONSE_FIELDS: dict[str, Field_] = {
    "model": Field_(Handling.HONOURED, "`hera` or `hera:<t>`; the Responses API serves routed models only"),
    "input": Field_(Handling.HONOURED, "text, or items: messages (input_text, output_text; images send the step "
                                       "to the cloud), function_call and function_call_output"),
    "instructions": Field_(Handling.HONOURED, "a system message first (not carried over by previous_response_id)"),
    "previous_response_id": Field_(Handling.HONOURED, "continues a response stored on this node"),
    "store": Field_(Handling.HONOURED, "default true: kept in the node's in-memory store; false: not kept"),
    "tools": Field_(Handling.HONOURED, "function tools, as chat completions' tools; other tool types are refused"),
    "tool_choice": Field_(Handling.HONOURED, "auto, none, required or {type: function, name}"),
    "parallel_tool_calls": Field_(Handling.HONOURED, "as in chat completions"),
    "max_output_tokens": Field_(Handling.HONOURED, "as max_tokens"),
    "temperature": Field_(Handling.HONOURED, "as in chat completions"),
    "top_p": Field_(Handling.HONOURED, "as in chat completions"),
    "stream": Field_(Handling.HONOURED, "the Responses API's server-sent events"),
    "stream_options": Field_(Handling.HONOURED, "include_obfuscation taken (nothing is obfuscated)"),
    "text": Field_(Handling.HONOURED, "format: text, json_object or json_schema, as response_format; verbosity "
                                      "sends the step to the cloud"),
    "include": Field_(Handling.HONOURED, "message.output_text.logprobs: as logprobs; anything else is refused",
                      refuse=_refuse_include),
    "top_logprobs": Field_(Handling.HONOURED, "with include logprobs: as in chat completions"),
    "reasoning": Field_(Handling.CLOUD, "reasoning settings: the step goes to the cloud (reason "
                                        "`reasoning_effort`)"),
    "metadata": Field_(Handling.FORWARDED, "kept on the stored response, sent with a cloud step"),
    "user": Field_(Handling.FORWARDED, "as in chat completions"),
    "safety_identifier": Field_(Handling.FORWARDED, "as in chat completions"),
    "prompt_cache_key": Field_(Handling.FORWARDED, "as in chat completions"),
    "prompt_cache_options": Field_(Handling.FORWARDED, "as in chat completions"),
    "prompt_cache_retention": Field_(Handling.FORWARDED, "as in chat completions"),
    "moderation": Field_(Handling.CLOUD, "as in chat completions"),
    "service_tier": Field_(Handling.FORWARDED, "as in chat completions", refuse=_refuse_tier),
    "truncation": Field_(Handling.HONOURED, "disabled only (a prompt too long for the SLM goes to the cloud)",
                         refuse=_refuse_truncation),
    "background": Field_(Handling.REFUSED, "background responses are not served", refuse=_refuse_background),
    "conversation": Field_(Handling.REFUSED, "conversations are not served: use previous_response_id"),
    "prompt": Field_(Handling.REFUSED, "stored prompt templates are not served"),
    "max_tool_calls": Field_(Handling.REFUSED, "not served: the agent decides how many calls it makes"),
    "background_options": Field_(Handling.REFUSED, "background responses are not served"),
    "context_management": Field_(Handling.REFUSED, "server-side context management is not served"),
    "image": Field_(Handling.REFUSED, "image generation is not served"),
    "access_programs": Field_(Handling.REFUSED, "access programs are not served"),
}


def fields_markdown() -> str:
    lines = ["| field | HERA | what happens |", "|---|---|---|"]
    lines += [f"| `{name}` | {f.handling.value} | {f.what} |" for name, f in RESPONSE_FIELDS.items()]
    return "\n".join(lines) + "\n"


def _check_fields(payload: dict[str, Any]) -> None:
    for name, value in payload.items():
        rule = RESPONSE_FIELDS.get(name)
        if rule is None:
            raise FieldError(f"Unrecognized request argument supplied: {name} (docs/openai-api.md lists every "
                             "field HERA takes)", name)
        if rule.handling is Handling.REFUSED and value not in (None, False):
            raise FieldError(f"{name}: {rule.what}", name)
        why = rule.refuse(value) if rule.refuse is not None else None
        if why:
            raise FieldError(why, name)


# --- request -> chat messages ------------------------------------------------------------------------
def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A Responses message's content as chat content: text parts joined; images as image_url parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise FieldError(f"{where}.content must be a string or a list of parts", "input")
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image" and (part.get("image_url") or part.get("file_id")):
            parts.append({"type": "image_url", "image_url": {"url": part.get("image_url") or part.get("file_id")}})
        else:
            raise FieldError(f"{where}.content[{i}]: part type {kind!r} is not served (input_text, output_text, "
                             "input_image)", "input")
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def input_messages(value: Any) -> list[dict[str, Any]]:
    """The request's input as chat messages: consecutive function_call items become one assistant
    message with tool_calls; a function_call_output becomes a tool message."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise FieldError("input must be a string or a non-empty list of items", "input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise FieldError(f"{where} must be an object", "input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise FieldError(f"{where}.role must be user, system, developer or assistant", "input")
            out.append({"role": role, "content": _content(item.get("content"), where)})
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise FieldError(f"{where}: a function_call needs call_id, name and arguments (strings)", "input")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str) or not isinstance(output, (str, list)):
                raise FieldError(f"{where}: a function_call_output needs call_id and output", "input")
            text = output if isinstance(output, str) else _content(output, where)
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": text if isinstance(text, str) else json.dumps(text)})
        elif kind == "reasoning":
            continue  # a reasoning model's summary of its own thinking: not part of the chat
        else:
            raise FieldError(f"{where}: item type {kind!r} is not served (message, function_call, "
                             "function_call_output)", "input")
    return out


def _chat_tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise FieldError("tools must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise FieldError(f"tools[{i}]: tool type {kind!r} is not served; only function tools are", "tools")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": fn})
    return out


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def to_chat(payload: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat-completions request a Responses request stands for (`history`: the conversation of
    its previous response)."""
    messages = list(history)
    if payload.get("instructions") is not None:
        if not isinstance(payload["instructions"], str):
            raise FieldError("instructions must be a string", "instructions")
        messages = [{"role": "system", "content": payload["instructions"]}] + \
            [m for m in messages if m.get("role") != "system"]
    messages += input_messages(payload.get("input"))
    chat: dict[str, Any] = {"model": payload.get("model"), "messages": messages}
    renames = {"max_output_tokens": "max_tokens"}
    for name in ("max_output_tokens", "temperature", "top_p", "tool_choice", "parallel_tool_calls", "user",
                 "safety_identifier", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
                 "moderation", "service_tier", "metadata", "stream", "top_logprobs"):
        if payload.get(name) is not None:
            chat[renames.get(name, name)] = payload[name]
    if "tool_choice" in chat:
        chat["tool_choice"] = _chat_tool_choice(chat["tool_choice"])
    tools = _chat_tools(payload.get("tools"))
    if tools:
        chat["tools"] = tools
    text = payload.get("text")
    if text is not None:
        if not isinstance(text, dict):
            raise FieldError("text must be an object ({format, verbosity})", "text")
        fmt = text.get("format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            chat["response_format"] = {"type": "json_schema", "json_schema": {
                k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
        elif fmt is not None:
            chat["response_format"] = fmt
        if text.get("verbosity") is not None:
            chat["verbosity"] = text["verbosity"]
    reasoning = payload.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    elif reasoning not in (None, {}):
        raise FieldError("reasoning must be an object like {\"effort\": \"low\"}", "reasoning")
    if payload.get("include"):
        chat["logprobs"] = True
    return chat


# --- answer -> Response object -------------------------------------------------------------------------
def _message_item(text: str, logprobs: list | None = None, status: str = "completed",
                  item_id: str | None = None) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs
    return {"type": "message", "id": item_id or f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
            "content": [part] if status == "completed" else []}


def _call_item(call: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}


def _response(rid: str, payload: dict[str, Any], *, status: str, output: list,
              model: str, usage: dict[str, Any] | None = None, incomplete: str | None = None,
              hera: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {"id": rid, "object": "response", "created_at": int(time.time()), "status": status, "model": model,
            "output": output, "error": None,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": payload.get("instructions"), "previous_response_id": payload.get("previous_response_id"),
            "tools": payload.get("tools") or [], "tool_choice": payload.get("tool_choice", "auto"),
            "parallel_tool_calls": payload.get("parallel_tool_calls", True),
            "temperature": payload.get("temperature"), "top_p": payload.get("top_p"),
            "max_output_tokens": payload.get("max_output_tokens"), "metadata": payload.get("metadata") or {},
            "text": payload.get("text") or {"format": {"type": "text"}}, "truncation": "disabled",
            "store": payload.get("store", True) is not False, "usage": usage}
    if hera is not None:
        body["hera"] = hera
    return body


def _usage(gen) -> dict[str, Any]:
    return {"input_tokens": gen.prompt_tokens, "input_tokens_details": {"cached_tokens": gen.cached_tokens},
            "output_tokens": gen.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": gen.prompt_tokens + gen.completion_tokens}


def _finished(rid, payload, chat, result, rt, session, message_id=None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The completed Response of a step, and the assistant message it adds to the conversation."""
    gen = result.generation
    logprobs = (gen.extra.get("logprobs") or {}).get("content") if chat.get("logprobs") else None
    output: list[dict[str, Any]] = []
    if gen.text.strip() or not gen.tool_calls:
        output.append(_message_item(gen.text, logprobs, item_id=message_id))
    output += [_call_item(c) for c in gen.tool_calls]
    incomplete = "max_output_tokens" if gen.finish_reason == "length" and not gen.tool_calls else None
    body = _response(rid, payload, status="incomplete" if incomplete else "completed", output=output,
                     model=gen.model, usage=_usage(gen), incomplete=incomplete,
                     hera=srv.hera_fields(rt, result, session))
    answer = {"role": "assistant", "content": gen.text if gen.text.strip() else None}
    if gen.tool_calls:
        answer["tool_calls"] = gen.tool_calls
    return body, answer


def _carried(payload: dict[str, Any], messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation a stored response hands to the next: its instructions are not carried over."""
    return messages[1:] if payload.get("instructions") is not None else messages


# --- the handlers --------------------------------------------------------------------------------------
async def create_response(request: web.Request) -> web.StreamResponse:
    rt, store = request.app[srv.RUNTIME], request.app[STORE]
    payload = srv._decoded_json(await request.read())
    if not isinstance(payload, dict):
        raise InvalidRequestError("request body must be a JSON object")
    _check_fields(payload)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise FieldError("model is required", "model")
    routed, fixed_threshold = srv._routed_threshold(model)
    if not routed:
        raise FieldError(f"model {model!r}: the Responses API serves the routed models 'hera' and 'hera:<t>'; "
                         "send other models to /v1/chat/completions", "model")
    previous = payload.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise FieldError("previous_response_id must be a string", "previous_response_id")
    history = store.conversation(previous) if previous else []
    chat = to_chat(payload, history)
    req = parse_request(chat)
    call = srv.prepare_routed(request, chat, req, fixed_threshold)
    rid = f"resp_{uuid.uuid4().hex}"
    session = call.session
    keep = payload.get("store", True) is not False
    if req.stream:
        return await _stream(request, rt, call, rid, payload, chat, store if keep else None)
    result = await srv.run_routed(request, call)
    body, answer = _finished(rid, payload, chat, result, rt, session)
    if keep:
        store.put(rid, _carried(payload, call.messages) + [answer], body)
    return web.json_response(body, headers=srv.routed_headers(result, session))


async def get_response(request: web.Request) -> web.Response:
    body = request.app[STORE].get(request.match_info["response_id"])
    if body is None:
        raise web.HTTPNotFound(reason=f"no stored response {request.match_info['response_id']!r} on this node")
    return web.json_response(body)


async def _stream(request: web.Request, rt, call, rid: str, payload: dict[str, Any], chat: dict[str, Any],
                  store: ResponseStore | None) -> web.StreamResponse:
    """The Responses API's events: response.created, in_progress, the message's output_item.added,
    content_part.added, output_text.delta per text delta, then the .done events, function calls
    (output_item.added/done with their arguments' delta and done), and response.completed."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    session = call.session
    seq = {"n": 0}
    msg_id = f"msg_{uuid.uuid4().hex}"
    model_name = {"name": ""}

    def event(kind: str, **fields) -> bytes:
        body = {"type": kind, "sequence_number": seq["n"], **fields}
        seq["n"] += 1
        return f"event: {kind}\ndata: {json.dumps(body)}\n\n".encode()

    def shell(status: str) -> dict[str, Any]:
        return _response(rid, payload, status=status, output=[], model=model_name["name"])

    async def on_decision(decision) -> None:
        model_name["name"] = rt.model_name(decision.route)
        response.headers.update(srv._decision_headers(decision))
        response.headers["x-hera-session"] = session
        await response.prepare(request)
        await response.write(event("response.created", response=shell("in_progress")))
        await response.write(event("response.in_progress", response=shell("in_progress")))

    opened = {"message": False}

    async def open_message() -> None:
        if not opened["message"]:
            opened["message"] = True
            await response.write(event("response.output_item.added", output_index=0,
                                       item=_message_item("", status="in_progress", item_id=msg_id)))
            await response.write(event("response.content_part.added", item_id=msg_id, output_index=0,
                                       content_index=0, part={"type": "output_text", "text": "", "annotations": []}))

    async def write_delta(delta: str) -> None:
        await open_message()
        await response.write(event("response.output_text.delta", item_id=msg_id, output_index=0,
                                   content_index=0, delta=delta, logprobs=[]))

    async def write_error(exc: HeraError) -> None:  # headers are gone: report in the stream
        status, body = error_from_exception(exc)
        err = body["error"]
        await response.write(event("error", code=err["code"], message=err["message"], param=err["param"]))
        failed = shell("failed")
        failed["error"] = {"code": err["code"], "message": err["message"]}
        await response.write(event("response.failed", response=failed))
        await response.write_eof()

    result = await srv.stream_while_routed(
        response, lambda on_text: srv.run_routed(request, call, on_text=on_text, on_decision=on_decision),
        write_delta=write_delta, write_error=write_error)
    body, answer = _finished(rid, payload, chat, result, rt, session, message_id=msg_id)
    index = 0
    for item in body["output"]:
        if item["type"] == "message":
            await open_message()
            part = item["content"][0]
            await response.write(event("response.output_text.done", item_id=msg_id, output_index=index,
                                       content_index=0, text=part["text"], logprobs=part.get("logprobs", [])))
            await response.write(event("response.content_part.done", item_id=msg_id, output_index=index,
                                       content_index=0, part=part))
        else:
            await response.write(event("response.output_item.added", output_index=index,
                                       item={**item, "arguments": "", "status": "in_progress"}))
            await response.write(event("response.function_call_arguments.delta", item_id=item["id"],
                                       output_index=index, delta=item["arguments"]))
            await response.write(event("response.function_call_arguments.done", item_id=item["id"],
                                       output_index=index, arguments=item["arguments"]))
        await response.write(event("response.output_item.done", output_index=index, item=item))
        index += 1
    kind = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
    await response.write(event(kind, response=body))
    await response.write_eof()
    if store is not None:
        store.put(rid, _carried(payload, call.messages) + [answer], body)
    return response


def add_routes(app: web.Application, max_stored: int = MAX_STORED) -> None:
    """The Responses API on `app` (create_app calls it), with its store."""
    app[STORE] = ResponseStore(max_stored)
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/responses/{response_id}", get_response)
