"""The slice of the OpenAI chat-completions API that HERA serves, validated with pydantic.

Shared by `hera cloud-sim` and `hera serve`: validate before use, so a malformed request is a
400 with an OpenAI-shaped error body and never a 500.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hera_core.errors import FieldError, HeraError, InvalidRequestError


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, tool_call_id pass through

    role: Literal["system", "user", "assistant", "tool", "function", "developer"]
    content: str | list[dict[str, Any]] | None = None


class Handling(str, Enum):
    """What HERA does with a request field of model `hera` (see FIELDS)."""

    HONOURED = "honoured"  # on both routes, local and cloud
    CLOUD = "cloud"  # only the cloud can honour it: a step that sets it goes to the cloud (reason: its name)
    FORWARDED = "forwarded"  # says nothing about the answer (who asks, billing tags): sent with a cloud step
    REFUSED = "refused"  # a 400 naming the field


@dataclass(frozen=True)
class Field_:
    """One row of the field table: what HERA does with the field, in one line for the docs.
    `inert`: values that ask for nothing (a CLOUD field set to one of them stays routable);
    `refuse`: values refused although the field is honoured (None: every value is taken)."""

    handling: Handling
    what: str
    inert: tuple = (None,)
    refuse: Callable[[Any], str | None] | None = None


def _refuse_modalities(v: Any) -> str | None:
    return None if v in (None, ["text"]) else "HERA answers text only: send modalities ['text'] or leave it out"


def _refuse_store(v: Any) -> str | None:
    return None if v in (None, False) else "HERA does not store chat completions: send store false or leave it out"


def _refuse_tier(v: Any) -> str | None:
    return None if v in (None, "auto", "default") else \
        f"service_tier {v!r}: HERA prices cloud steps at one tier; send 'auto', 'default' or leave it out"


_DEPRECATED = "deprecated by OpenAI and not served: send tools and tool_choice instead"

# Every request field of chat completions, and what HERA does with it for model `hera` (any other
# model is forwarded to the cloud as it is). The one source of truth: parse_request enforces it,
# docs/openai-api.md renders it (`fields_markdown`), tests/test_openai_fields.py walks it.
FIELDS: dict[str, Field_] = {
    "model": Field_(Handling.HONOURED, "`hera` routes each step (`hera:<t>` with a fixed threshold t); any other "
                                       "name is forwarded to the cloud untouched"),
    "messages": Field_(Handling.HONOURED, "text content on both routes; a message with image or audio parts "
                                          "sends the step to the cloud (reason `cannot-serve-locally`)"),
    "max_tokens": Field_(Handling.HONOURED, "caps the answer on both routes (at most the server's max_tokens_cap)"),
    "max_completion_tokens": Field_(Handling.HONOURED, "as max_tokens (it wins when both are sent)"),
    "temperature": Field_(Handling.HONOURED, "n > 1: the choices are sampled with it on the route taken; n = 1: "
                                             "the cloud gets it, the SLM samples with it (its answer then arrives "
                                             "whole when streamed) except where it decodes greedily: tools offered, "
                                             "a json response_format, logprobs; absent: greedy"),
    "top_p": Field_(Handling.HONOURED, "as temperature"),
    "n": Field_(Handling.HONOURED, "choices sampled on the route taken, the prompt paid once; not with stream or "
                                   "tools (400)"),
    "seed": Field_(Handling.HONOURED, "seeds sampled choices (reproducible on the SLM); passed to the cloud"),
    "stop": Field_(Handling.HONOURED, "up to 4 stop strings, both routes"),
    "stream": Field_(Handling.HONOURED, "server-sent chunks in OpenAI's format, both routes"),
    "stream_options": Field_(Handling.HONOURED, "include_usage: a last chunk with empty choices and the usage"),
    "tools": Field_(Handling.HONOURED, "function tools; the SLM decodes a call under a grammar of their schemas, "
                                       "an invalid local call is escalated"),
    "tool_choice": Field_(Handling.HONOURED, "auto, none, required or one function, both routes"),
    "parallel_tool_calls": Field_(Handling.HONOURED, "false: at most one call per answer, both routes"),
    "response_format": Field_(Handling.HONOURED, "text, json_object or json_schema (strict checked); on the SLM "
                                                 "decoding is constrained by a grammar of the schema, on the "
                                                 "cloud the answer is validated (one retry, then a 502 that says "
                                                 "so); an answer that does not validate is never returned"),
    "logprobs": Field_(Handling.HONOURED, "each token's log-probability, from the SLM's decode or passed through "
                                          "from the cloud (an answer without them is a 502); streamed in one "
                                          "chunk after the text"),
    "top_logprobs": Field_(Handling.HONOURED, "with logprobs: that many alternatives per token (0-20)"),
    "logit_bias": Field_(Handling.CLOUD, "a non-empty bias sends the step to the cloud (reason `logit_bias`)",
                         inert=(None, {})),
    "presence_penalty": Field_(Handling.CLOUD, "non-zero: the step goes to the cloud (reason `presence_penalty`)",
                               inert=(None, 0, 0.0)),
    "frequency_penalty": Field_(Handling.CLOUD, "non-zero: the step goes to the cloud (reason `frequency_penalty`)",
                                inert=(None, 0, 0.0)),
    "reasoning_effort": Field_(Handling.CLOUD, "for reasoning models: the step goes to the cloud"),
    "verbosity": Field_(Handling.CLOUD, "the step goes to the cloud"),
    "prediction": Field_(Handling.CLOUD, "predicted output: the step goes to the cloud"),
    "web_search_options": Field_(Handling.CLOUD, "web search: the step goes to the cloud"),
    "user": Field_(Handling.FORWARDED, "an end-user id: sent with a cloud step"),
    "safety_identifier": Field_(Handling.FORWARDED, "as user"),
    "prompt_cache_key": Field_(Handling.FORWARDED, "the provider's cache hint: sent with a cloud step (the SLM "
                                                   "reuses cached prefixes whatever it says)"),
    "prompt_cache_options": Field_(Handling.FORWARDED, "as prompt_cache_key"),
    "prompt_cache_retention": Field_(Handling.FORWARDED, "as prompt_cache_key"),
    "moderation": Field_(Handling.CLOUD, "the provider's moderation of input and output: the step goes to the "
                                         "cloud"),
    "metadata": Field_(Handling.FORWARDED, "tags: sent with a cloud step"),
    "service_tier": Field_(Handling.FORWARDED, "auto or default: sent with a cloud step; other tiers are refused "
                                               "(the ledger prices one tier)", refuse=_refuse_tier),
    "store": Field_(Handling.FORWARDED, "false: sent with a cloud step; true is refused (HERA stores no "
                                        "completions)", refuse=_refuse_store),
    "modalities": Field_(Handling.HONOURED, "['text'] only; audio is refused", refuse=_refuse_modalities),
    "audio": Field_(Handling.REFUSED, "audio output is not served"),
    "functions": Field_(Handling.REFUSED, _DEPRECATED),
    "function_call": Field_(Handling.REFUSED, _DEPRECATED),
}


def fields_markdown() -> str:
    """The field table as docs/openai-api.md shows it (rendered from FIELDS, never by hand)."""
    lines = ["| field | HERA | what happens |", "|---|---|---|"]
    lines += [f"| `{name}` | {f.handling.value} | {f.what} |" for name, f in FIELDS.items()]
    return "\n".join(lines) + "\n"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # every field is in FIELDS; parse_request refuses the rest

    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    user: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None
    moderation: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    store: bool | None = None
    modalities: list[str] | None = None
    audio: Any = None
    functions: Any = None
    function_call: Any = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def sampling(self) -> dict[str, Any]:
        """How `n` > 1 choices are sampled: OpenAI's defaults (temperature 1, top_p 1)."""
        return {"temperature": 1.0 if self.temperature is None else self.temperature,
                "top_p": 1.0 if self.top_p is None else self.top_p, "seed": self.seed}

    def sampled(self) -> bool:
        """A single answer asked to be sampled (temperature above 0, or top_p below 1 at the default
        temperature 1), not greedy; temperature 0 is greedy whatever top_p says."""
        if self.temperature == 0:
            return False
        return self.temperature is not None or (self.top_p is not None and self.top_p < 1)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def token_limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def plain_messages(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]

    def has_non_text_content(self) -> bool:
        return any(isinstance(m.content, list) and any(p.get("type") != "text" for p in m.content)
                   for m in self.messages)

    def cloud_only_fields(self) -> list[str]:
        """The CLOUD fields this request sets to something other than an inert value, in table order."""
        return [name for name, f in FIELDS.items() if f.handling is Handling.CLOUD
                and getattr(self, name) not in f.inert]


def check_fields(payload: dict[str, Any]) -> None:
    """The field table enforced on a request to model `hera`: an unknown field, a REFUSED one or a
    refused value is a FieldError naming it (a 400 with `param`)."""
    for name, value in payload.items():
        rule = FIELDS.get(name)
        if rule is None:
            raise FieldError(f"Unrecognized request argument supplied: {name} (docs/openai-api.md lists every "
                             "field HERA takes)", name)
        if rule.handling is Handling.REFUSED and value is not None:
            raise FieldError(f"{name}: {rule.what}", name)
        why = rule.refuse(value) if rule.refuse is not None else None
        if why:
            raise FieldError(why, name)


def parse_request(payload: Any, *, routed: bool = True) -> ChatCompletionRequest:
    """A chat-completions request, validated. routed (model `hera`, and `hera cloud-sim`): the
    field table applies (check_fields); routed=False (a pass-through to the cloud): unknown fields
    are the upstream's to judge."""
    if not isinstance(payload, dict):
        raise InvalidRequestError("request body must be a JSON object")
    if routed:
        check_fields(payload)
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise FieldError(f"{where}: {first['msg']}", str(first["loc"][0]) if first["loc"] else "body") from None


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_from_exception(exc: HeraError) -> tuple[int, dict]:
    return exc.http_status, error_body(str(exc), exc.error_type, code=type(exc).__name__,
                                       param=getattr(exc, "param", None))


def answer_choice(text: str, finish_reason: str, *, tool_calls: list[dict[str, Any]] | None = None,
                  message_fields: dict[str, Any] | None = None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The first choice of a chat.completion: `message_fields` adds to the message (fields a cloud
    answered with); with `tool_calls`, content is null when there is no text, and finish_reason is
    tool_calls; `logprobs` is OpenAI's {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""
    message: dict[str, Any] = {"role": "assistant", "content": text, **(message_fields or {})}
    if tool_calls:
        message["tool_calls"] = tool_calls
        message["content"] = text if text.strip() else None
        finish_reason = "tool_calls"
    return {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": logprobs}


def completion_response(model: str, choice: dict[str, Any], usage: tuple[int, int], *,
                        more_choices: list[tuple[str, str]] | None = None, id: str | None = None,
                        extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A chat.completion body: `choice` (`answer_choice`), then `more_choices` (text, finish_reason)
    of an `n` > 1 request; `usage`: (prompt tokens, completion tokens); `extra` adds top-level fields."""
    choices = [choice] + [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f}
                          for i, (t, f) in enumerate(more_choices or [], start=1)]
    prompt_tokens, completion_tokens = usage
    body = {
        "id": id or f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }
    if extra:
        body.update(extra)
    return body


def tool_call_deltas(tool_calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stream deltas of finished tool calls, as OpenAI sends them: per call, one delta with its index,
    id, type and name (arguments empty), then its arguments (the SDKs concatenate by index)."""
    out = []
    for i, call in enumerate(tool_calls):
        fn = call["function"]
        out.append({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                    "function": {"name": fn["name"], "arguments": ""}}]})
        out.append({"tool_calls": [{"index": i, "function": {"arguments": fn["arguments"]}}]})
    return out


def completion_chunks(*, model: str, text: str, finish_reason: str,
                      tool_calls: list[dict[str, Any]] | None = None,
                      logprobs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """A finished completion as OpenAI stream chunks (role, content with its logprobs, tool calls, finish)."""
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(delta: dict, finish: str | None, lp: dict | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        if lp is not None:
            choice["logprobs"] = lp
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}

    return [chunk({"role": "assistant", "content": ""}, None),
            *([chunk({"content": text}, None, logprobs)] if text else []),
            *(chunk(d, None) for d in tool_call_deltas(tool_calls or [])),
            chunk({}, "tool_calls" if tool_calls else finish_reason)]
