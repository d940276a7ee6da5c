"""The engine interface every model backend implements.

A subtask is one chat completion. `generate` answers it; local engines also offer `prefill`,
which evaluates the prompt and returns its last-position logits (the router's features) and
leaves the KV in place so a following `generate` of the same prompt continues without a second
prefill.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Message = dict[str, Any]  # OpenAI chat message: {"role": ..., "content": ...}


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float  # request start to last token
    ttft_s: float  # request start to first token (= latency_s when not streamed)
    finish_reason: str  # "stop" or "length"
    cached_tokens: int = 0  # prompt tokens whose KV was reused instead of evaluated
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # engine-specific (e.g. cache hits)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI tool_calls, each schema-valid
    tool_errors: list[str] = field(default_factory=list)  # why a call the model wrote was not valid (not returned)


@dataclass
class Prefill:
    logits: np.ndarray  # float32 [vocab], last prompt position
    prompt_tokens: int
    cached_tokens: int  # of prompt_tokens, how many were reused from the KV cache
    latency_s: float


class Engine(abc.ABC):
    """Async model backend. Engines own their resources: use `async with` or call `close()`."""

    name: str  # model name reported in responses and the ledger
    is_local: bool

    @abc.abstractmethod
    async def generate(self, messages: list[Message], *, max_tokens: int = 256,
                       stop: list[str] | None = None, on_text: Callable[[str], None] | None = None,
                       toolset: Any = None, **kwargs: Any) -> Generation:
        """Greedy completion of a chat. `on_text` receives text deltas as they are produced;
        `toolset` (backends.tools.ToolSet) offers tools, whose calls come back in `tool_calls`."""

    async def generate_samples(self, messages: list[Message], n: int, *, max_tokens: int = 256,
                               stop: list[str] | None = None, temperature: float = 1.0, top_p: float = 1.0,
                               seed: int | None = None) -> list[Generation]:
        """`n` sampled completions of one chat (OpenAI's `n`), not streamed. The prompt is paid
        once: its usage is the first one's prompt_tokens plus every choice's completion_tokens
        (an engine that knows only the total puts it on the first and 0 on the others)."""
        from hera_core.errors import CannotServeLocallyError

        raise CannotServeLocallyError(f"{type(self).__name__} does not sample several completions (n > 1)")

    async def prefill(self, messages: list[Message], *, toolset: Any = None) -> Prefill:
        raise NotImplementedError(f"{type(self).__name__} has no prefill (only local engines do)")

    async def score_continuation(self, messages: list[Message], text: str) -> list[float]:
        """Log-probability of each token of `text` as this model's answer to `messages`
        (teacher-forced; local engines that expose their logits)."""
        raise NotImplementedError(f"{type(self).__name__} cannot score a continuation")

    def cache_stats(self) -> dict[str, float] | None:
        """KV-cache counters of a local engine (prefill_tokens, reused_tokens, hit_rate, ...);
        None for an engine without one."""
        return None

    async def forward(self, payload: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, float]]]:
        """Send an OpenAI chat-completions payload as it is (a pass-through request):
        (response JSON, attempts as (outcome, seconds))."""
        raise NotImplementedError(f"{type(self).__name__} does not forward raw requests (only remote engines do)")

    def forward_stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Like `forward`, streamed: yields each server-sent JSON chunk."""
        raise NotImplementedError(f"{type(self).__name__} does not forward raw requests (only remote engines do)")

    async def close(self) -> None:
        return None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def check_context(n_prompt_tokens: int, n_ctx: int) -> None:
    """A prompt must leave room for at least one generated token; refused before any work."""
    from hera_core.errors import ContextOverflowError

    if n_prompt_tokens + 1 > n_ctx:
        raise ContextOverflowError(
            f"prompt has {n_prompt_tokens} tokens, the local model's context window is {n_ctx}; "
            "shorten the conversation or raise local.n_ctx")
