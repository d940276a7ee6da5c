"""Cloud LLM engine: any OpenAI-compatible /v1/chat/completions over aiohttp.

The HTTP session is created on first use inside the running event loop and closed by `close()`.
Retryable failures (connection errors, timeouts, 429 and 5xx) are retried with jittered
exponential backoff inside the request's deadline, honouring Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from ..errors import CloudError, CloudUnavailableError
from .base import Engine, Generation, Message

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})


class CloudEngine(Engine):
    is_local = False

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None,
                 timeout_s: float = 120.0, max_retries: int = 2) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = model
        self._api_key = api_key  # never logged, echoed or written anywhere
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self._session: aiohttp.ClientSession | None = None

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

    async def chat(self, payload: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """POST a chat-completions payload as is; returns (response JSON, latency seconds)."""
        deadline = time.monotonic() + self.timeout_s
        url = f"{self.base_url}/chat/completions"
        body = json.dumps(payload).encode()
        attempt = 0
        while True:
            t0 = time.perf_counter()
            remaining = deadline - time.monotonic()
            retry_after = None
            try:
                async with self._get_session().post(
                        url, data=body, headers=self._headers(),
                        timeout=aiohttp.ClientTimeout(total=max(0.01, remaining))) as resp:
                    if resp.status == 200:
                        try:
                            data = await resp.json(content_type=None)
                        except (json.JSONDecodeError, aiohttp.ContentTypeError, UnicodeDecodeError) as exc:
                            raise CloudError(f"cloud LLM at {self.base_url} sent malformed JSON: {exc}") from exc
                        if not isinstance(data, dict) or not data.get("choices"):
                            raise CloudError(f"cloud LLM at {self.base_url} sent a response without choices")
                        return data, time.perf_counter() - t0
                    text = (await resp.text())[:300]
                    if resp.status not in RETRYABLE_STATUSES or attempt >= self.max_retries:
                        raise CloudError(f"cloud LLM at {self.base_url} answered HTTP {resp.status}: {text}")
                    retry_after = _parse_retry_after(resp.headers.get("Retry-After"))
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                if attempt >= self.max_retries or time.monotonic() >= deadline:
                    raise CloudUnavailableError(
                        f"cannot reach the cloud LLM at {self.base_url} ({type(exc).__name__}); "
                        "check HERA_CLOUD_BASE_URL, or start the stand-in with `hera cloud-sim`") from None
            attempt += 1
            delay = retry_after if retry_after is not None else min(4.0, 0.1 * 2 ** attempt) * random.uniform(0.5, 1.5)
            if time.monotonic() + delay >= deadline:
                raise CloudUnavailableError(f"cloud LLM at {self.base_url} did not answer within {self.timeout_s}s")
            await asyncio.sleep(delay)

    async def generate(self, messages: list[Message], *, max_tokens: int = 256,
                       stop: list[str] | None = None, on_text: Callable[[str], None] | None = None,
                       extra: dict[str, Any] | None = None) -> Generation:
        """One chat completion. `extra` carries request fields passed through as they are (tools,
        response_format, ...); `on_text` streams text deltas as the upstream sends them."""
        payload: dict[str, Any] = {**(extra or {}), "model": self.name, "messages": messages,
                                   "max_tokens": max_tokens, "temperature": 0}
        if stop:
            payload["stop"] = stop
        if on_text is not None:
            return await self._generate_streaming(payload, on_text)
        data, latency = await self.chat(payload)
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        message = choice.get("message") or {}
        return Generation(text=message.get("content") or "",
                          prompt_tokens=int(usage.get("prompt_tokens", 0)),
                          completion_tokens=int(usage.get("completion_tokens", 0)),
                          latency_s=latency, ttft_s=latency,
                          finish_reason=choice.get("finish_reason") or "stop", model=self.name,
                          extra={"message": message} if set(message) - {"role", "content"} else {})

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST a streaming chat-completions payload; yields each server-sent JSON chunk.

        Only the connection is retried: once bytes have arrived a retry would duplicate output.
        """
        payload = {**payload, "stream": True, "stream_options": {"include_usage": True}}
        url = f"{self.base_url}/chat/completions"
        try:
            async with self._get_session().post(url, data=json.dumps(payload).encode(), headers=self._headers(),
                                                timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                if resp.status != 200:
                    text = (await resp.text())[:300]
                    raise CloudError(f"cloud LLM at {self.base_url} answered HTTP {resp.status}: {text}")
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        return
                    try:
                        yield json.loads(data)
                    except json.JSONDecodeError as exc:
                        raise CloudError(f"cloud LLM at {self.base_url} sent a malformed stream chunk: {exc}") from exc
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, aiohttp.ClientPayloadError) as exc:
            raise CloudUnavailableError(
                f"cloud LLM stream from {self.base_url} failed ({type(exc).__name__}); "
                "check HERA_CLOUD_BASE_URL, or start the stand-in with `hera cloud-sim`") from None

    async def _generate_streaming(self, payload: dict[str, Any], on_text: Callable[[str], None]) -> Generation:
        t0 = time.perf_counter()
        ttft = None
        parts: list[str] = []
        usage: dict[str, Any] = {}
        finish = "stop"
        async for chunk in self.stream(payload):
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    parts.append(delta)
                    on_text(delta)
                finish = choice.get("finish_reason") or finish
        latency = time.perf_counter() - t0
        text = "".join(parts)
        return Generation(text=text, prompt_tokens=int(usage.get("prompt_tokens", 0)),
                          completion_tokens=int(usage.get("completion_tokens", 0)), latency_s=latency,
                          ttft_s=ttft if ttft is not None else latency, finish_reason=finish, model=self.name)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _parse_retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
