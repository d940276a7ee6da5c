"""The slice of the OpenAI chat-completions API that HERA serves, validated with pydantic.

Shared by `hera cloud-sim` and `hera serve`: validate before use, so a malformed request is a
400 with an OpenAI-shaped error body and never a 500.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hera_core.errors import HeraError, InvalidRequestError


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, tool_call_id pass through

    role: Literal["system", "user", "assistant", "tool", "function", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields pass through to the cloud

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
    tools: list[dict[str, Any]] | None = None

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


def parse_request(payload: Any) -> ChatCompletionRequest:
    if not isinstance(payload, dict):
        raise InvalidRequestError("request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequestError(f"{where}: {first['msg']}") from None


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_from_exception(exc: HeraError) -> tuple[int, dict]:
    return exc.http_status, error_body(str(exc), exc.error_type, code=type(exc).__name__)


def completion_response(*, model: str, text: str, prompt_tokens: int, completion_tokens: int,
                        finish_reason: str, extra: dict[str, Any] | None = None, id: str | None = None,
                        message_fields: dict[str, Any] | None = None,
                        tool_calls: list[dict[str, Any]] | None = None,
                        more_choices: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """A chat.completion body; `message_fields` adds to the message (fields a cloud answered with);
    with `tool_calls`, content is null when there is no text, and finish_reason is tool_calls.
    `more_choices`: (text, finish_reason) of choices 1.. of an `n` > 1 request."""
    message: dict[str, Any] = {"role": "assistant", "content": text, **(message_fields or {})}
    if tool_calls:
        message["tool_calls"] = tool_calls
        message["content"] = text if text.strip() else None
        finish_reason = "tool_calls"
    choices = [{"index": 0, "message": message, "finish_reason": finish_reason}]
    choices += [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f}
                for i, (t, f) in enumerate(more_choices or [], start=1)]
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
                      tool_calls: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """A finished completion as OpenAI stream chunks (role, content, tool calls, finish)."""
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(delta: dict, finish: str | None) -> dict:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    return [chunk({"role": "assistant", "content": ""}, None), *([chunk({"content": text}, None)] if text else []),
            *(chunk(d, None) for d in tool_call_deltas(tool_calls or [])),
            chunk({}, "tool_calls" if tool_calls else finish_reason)]
