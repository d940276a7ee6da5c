"""Cloud LLM engine: any OpenAI-compatible /v1/chat/completions over aiohttp.

The HTTP session is created on first use inside the running event loop and closed by `close()`.
Retryable failures (connection errors, timeouts, malformed bodies, 429 and 5xx) are retried with
jittered exponential backoff inside the request's deadline, honouring Retry-After. A circuit
breaker opens after repeated failures, so a dead cloud costs one fast error instead of a
deadline per request, and lets one probe through after a cool-down before closing again.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import aiohttp

from hera_core import wirejson
from hera_core.errors import CloudError, CloudRequestError, CloudUnavailableError, ConfigError
from hera_core.backends.tools import ToolSet
from hera_core.backends.base import Engine, Generation, Message

if TYPE_CHECKING:
    from hera_core.config import HeraSettings

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class CircuitBreaker:
    """closed -> (failure_threshold consecutive failures) -> open -> (reset_timeout_s) -> half-open:
    one probe; its success closes the circuit, its failure opens it again. `clock` gives seconds
    (monotonic; tests pass a fake one to move time without sleeping)."""

    def __init__(self, failure_threshold: int = 5, reset_timeout_s: float = 10.0, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._failures = 0  # consecutive failed requests
        self._opened_at: float | None = None  # monotonic time the circuit opened; None = closed
        self._probing = False  # a half-open probe is in flight
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half-open" if self._clock() - self._opened_at >= self.reset_timeout_s else "open"

    def allow(self) -> bool:
        with self._lock:
            if self._opened_at is None:
                return True
            if self._clock() - self._opened_at < self.reset_timeout_s or self._probing:
                return False
            self._probing = True
            return True

    def retry_in(self) -> float:
        if self._opened_at is None:
            return 0.0
        return max(0.0, self.reset_timeout_s - (self._clock() - self._opened_at))

    def success(self) -> None:
        with self._lock:
            self._failures, self._opened_at, self._probing = 0, None, False

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._probing or self._failures >= self.failure_threshold:
                self._opened_at = self._clock()
            self._probing = False


class CloudEngine(Engine):
    is_local = False

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout_s: float = 120.0,
                 max_retries: int = 2, breaker: CircuitBreaker | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = model
        self._api_key = api_key  # never logged, echoed or written anywhere
        self.timeout_s = timeout_s  # deadline of one request, all attempts and backoff included
        self.max_retries = max_retries
        self.breaker = breaker or CircuitBreaker()
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(cls, settings: "HeraSettings", *, base_url: str | None = None) -> "CloudEngine":
        """The engine the settings' [cloud] section describes (validated there); `base_url`
        overrides cloud.base_url (the address of a `hera cloud-sim` started for these settings)."""
        c = settings.cloud
        url = base_url or c.base_url
        if not url:
            raise ConfigError("cloud.base_url is not set and no cloud-sim address was given")
        return cls(url, c.model, api_key=c.api_key.get_secret_value() if c.api_key else None, timeout_s=c.timeout_s,
                   max_retries=c.max_retries, breaker=CircuitBreaker(c.breaker_failures, c.breaker_reset_s))

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30))
        return self._session

    def _check_breaker(self, attempts: list[tuple[str, float]]) -> None:
        if not self.breaker.allow():
            attempts.append(("circuit-open", 0.0))
            raise CloudUnavailableError(
                f"cloud LLM at {self.base_url} is failing: circuit open, next probe in "
                f"{self.breaker.retry_in():.0f}s", attempts)

    async def chat(self, payload: dict[str, Any]) -> tuple[dict[str, Any], float, list[tuple[str, float]]]:
        """POST a chat-completions payload as is; returns (response JSON, latency s, attempts)."""
        deadline = time.monotonic() + self.timeout_s
        url = f"{self.base_url}/chat/completions"
        body = wirejson.dumps(payload)
        attempts: list[tuple[str, float]] = []
        self._check_breaker(attempts)
        t_start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            retry_after = None
            error: CloudError
            try:
                async with self._get_session().post(
                        url, data=body, headers=self._headers(),
                        timeout=aiohttp.ClientTimeout(total=max(0.01, deadline - time.monotonic()))) as resp:
                    if resp.status == 200:
                        data = await resp.read()
                        try:
                            parsed = wirejson.loads(data)
                            if not isinstance(parsed, dict) or not parsed.get("choices"):
                                raise ValueError("no choices")
                        except (ValueError, UnicodeDecodeError) as exc:
                            outcome = "malformed"
                            error = CloudError(f"cloud LLM at {self.base_url} sent a malformed response ({exc})")
                        else:
                            attempts.append(("ok", time.perf_counter() - t0))
                            self.breaker.success()
                            return parsed, time.perf_counter() - t_start, attempts
                    else:
                        text = (await resp.text(errors="replace"))[:300]
                        outcome = str(resp.status)
                        if resp.status in RETRYABLE_STATUSES or resp.status in (401, 403):
                            error = CloudError(f"cloud LLM at {self.base_url} answered HTTP {resp.status}: {text}")
                        else:  # the request itself is wrong: retrying cannot help, the cloud is fine
                            attempts.append((outcome, time.perf_counter() - t0))
                            self.breaker.success()
                            raise CloudRequestError(f"the cloud LLM refused the request (HTTP {resp.status}): {text}",
                                                    attempts)
                        retry_after = _parse_retry_after(resp.headers.get("Retry-After"))
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                outcome = type(exc).__name__
                error = CloudUnavailableError(
                    f"cannot reach the cloud LLM at {self.base_url} ({outcome}); "
                    "check HERA_CLOUD_BASE_URL, or start the stand-in with `hera cloud-sim`")
            attempts.append((outcome, time.perf_counter() - t0))
            error.attempts = attempts
            retryable = outcome not in ("401", "403")
            delay = retry_after if retry_after is not None else \
                min(4.0, 0.1 * 2 ** (len(attempts) - 1)) * random.uniform(0.5, 1.5)
            if not retryable or len(attempts) > self.max_retries or time.monotonic() + delay >= deadline:
                self.breaker.failure()
                if time.monotonic() + delay >= deadline and retryable and len(attempts) <= self.max_retries:
                    error = CloudUnavailableError(f"cloud LLM at {self.base_url} did not answer within "
                                                  f"{self.timeout_s:g}s ({outcome})", attempts)
                raise error
            await asyncio.sleep(delay)

    async def generate(self, messages: list[Message], *, max_tokens: int = 256,
                       stop: list[str] | None = None, on_text: Callable[[str], None] | None = None,
                       extra: dict[str, Any] | None = None, toolset: ToolSet | None = None) -> Generation:
        """One chat completion. `extra` carries request fields passed through as they are
        (response_format, logprobs, a sampled answer's temperature, ...; greedy, temperature 0,
        unless it says otherwise); `on_text` streams text deltas as the upstream sends them; the
        calls of a `toolset` request come back in `tool_calls`, each checked against its schema
        (one that fails is left out and named in `tool_errors`). The choice's `logprobs`, when the
        upstream sends them, come back in extra["logprobs"] (streamed: their content joined)."""
        payload: dict[str, Any] = {"temperature": 0, **(extra or {}), "model": self.name, "messages": messages,
                                   "max_tokens": max_tokens}
        if stop:
            payload["stop"] = stop
        if toolset is not None:
            payload.update(toolset.request_fields())
        if on_text is not None:
            return _checked(await self._generate_streaming(payload, on_text), toolset)
        data, latency, attempts = await self.chat(payload)
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        message = choice.get("message") or {}
        extra_out: dict[str, Any] = {"attempts": attempts}
        if set(message) - {"role", "content", "tool_calls"}:
            extra_out["message"] = message
        if choice.get("logprobs"):
            extra_out["logprobs"] = choice["logprobs"]
        return _checked(Generation(text=message.get("content") or "",
                                   prompt_tokens=int(usage.get("prompt_tokens", 0)),
                                   completion_tokens=int(usage.get("completion_tokens", 0)),
                                   latency_s=latency, ttft_s=latency,
                                   finish_reason=choice.get("finish_reason") or "stop", model=self.name,
                                   extra=extra_out, tool_calls=list(message.get("tool_calls") or [])), toolset)

    async def generate_samples(self, messages: list[Message], n: int, *, max_tokens: int = 256,
                               stop: list[str] | None = None, temperature: float = 1.0, top_p: float = 1.0,
                               seed: int | None = None) -> list[Generation]:
        """`n` choices in one request (OpenAI's `n`); the total usage on the first (per-choice
        completion tokens are not reported)."""
        payload: dict[str, Any] = {"model": self.name, "messages": messages, "max_tokens": max_tokens, "n": n,
                                   "temperature": temperature, "top_p": top_p}
        if stop:
            payload["stop"] = stop
        if seed is not None:
            payload["seed"] = seed
        data, latency, attempts = await self.chat(payload)
        usage = data.get("usage") or {}
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise CloudError(f"the cloud LLM answered {len(choices)} choices for n = {n}", attempts)
        return [Generation(text=(c.get("message") or {}).get("content") or "",
                           prompt_tokens=int(usage.get("prompt_tokens", 0)) if i == 0 else 0,
                           completion_tokens=int(usage.get("completion_tokens", 0)) if i == 0 else 0,
                           latency_s=latency, ttft_s=latency, finish_reason=c.get("finish_reason") or "stop",
                           model=self.name, extra={"attempts": attempts} if i == 0 else {})
                for i, c in enumerate(choices)]

    async def forward(self, payload: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, float]]]:
        data, _, attempts = await self.chat(payload)
        return data, attempts

    def forward_stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self.stream(payload)

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST a streaming chat-completions payload; yields each server-sent JSON chunk.

        Only opening the stream is guarded by the breaker; once bytes have arrived a retry would
        duplicate output, so a stream cut mid-way is an error, not a retry.
        """
        attempts: list[tuple[str, float]] = []
        self._check_breaker(attempts)
        payload = {**payload, "stream": True, "stream_options": {"include_usage": True}}
        url = f"{self.base_url}/chat/completions"
        t0 = time.perf_counter()
        done = False
        try:
            async with self._get_session().post(url, data=json.dumps(payload).encode(), headers=self._headers(),
                                                timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                if resp.status != 200:
                    text = (await resp.text(errors="replace"))[:300]
                    attempts.append((str(resp.status), time.perf_counter() - t0))
                    if 400 <= resp.status < 500 and resp.status not in (401, 403, 408, 429):
                        self.breaker.success()
                        raise CloudRequestError(f"the cloud LLM refused the request (HTTP {resp.status}): {text}",
                                                attempts)
                    self.breaker.failure()
                    raise CloudError(f"cloud LLM at {self.base_url} answered HTTP {resp.status}: {text}", attempts)
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    try:
                        chunk = json.loads(data)
                    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                        raise CloudError(f"cloud LLM at {self.base_url} sent a malformed stream chunk: {exc}",
                                         attempts) from None
                    yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            attempts.append((type(exc).__name__, time.perf_counter() - t0))
            self.breaker.failure()
            raise CloudUnavailableError(
                f"cloud LLM stream from {self.base_url} failed ({type(exc).__name__}); "
                "check HERA_CLOUD_BASE_URL, or start the stand-in with `hera cloud-sim`", attempts) from None
        if not done:
            attempts.append(("stream-cut", time.perf_counter() - t0))
            self.breaker.failure()
            raise CloudUnavailableError(f"cloud LLM stream from {self.base_url} ended before [DONE]", attempts)
        attempts.append(("ok", time.perf_counter() - t0))
        self.breaker.success()

    async def _generate_streaming(self, payload: dict[str, Any], on_text: Callable[[str], None]) -> Generation:
        t0 = time.perf_counter()
        ttft = None
        parts: list[str] = []
        calls: dict[int, dict[str, Any]] = {}  # tool-call deltas by index, reassembled
        usage: dict[str, Any] = {}
        finish = "stop"
        logprobs: list[dict[str, Any]] = []  # the choice's logprobs.content, over all chunks
        async for chunk in self.stream(payload):
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                for tc in (choice.get("delta") or {}).get("tool_calls") or []:
                    call = calls.setdefault(int(tc.get("index", len(calls))),
                                            {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                    call["id"] = tc.get("id") or call["id"]
                    fn = tc.get("function") or {}
                    call["function"]["name"] += fn.get("name") or ""
                    call["function"]["arguments"] += fn.get("arguments") or ""
                logprobs += (choice.get("logprobs") or {}).get("content") or []
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    parts.append(delta)
                    on_text(delta)
                finish = choice.get("finish_reason") or finish
        latency = time.perf_counter() - t0
        return Generation(text="".join(parts), prompt_tokens=int(usage.get("prompt_tokens", 0)),
                          completion_tokens=int(usage.get("completion_tokens", 0)), latency_s=latency,
                          ttft_s=ttft if ttft is not None else latency, finish_reason=finish, model=self.name,
                          extra={"attempts": [("ok", latency)], **({"logprobs": {"content": logprobs}} if logprobs else {})},
                          tool_calls=[calls[i] for i in sorted(calls)])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _checked(gen: Generation, toolset: ToolSet | None) -> Generation:
    """Keep only the upstream's tool calls that are valid for the offered tools."""
    if not gen.tool_calls:
        return gen
    if toolset is None:
        gen.tool_errors, gen.tool_calls = ["the cloud called a tool, but none was offered"], []
        return gen
    gen.tool_calls, gen.tool_errors = toolset.check_openai_calls(gen.tool_calls)
    if gen.tool_errors and not gen.tool_calls and gen.finish_reason == "tool_calls":
        gen.finish_reason = "stop"
    return gen


def _parse_retry_after(value: str | None) -> float | None:
    try:
        return min(60.0, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None
