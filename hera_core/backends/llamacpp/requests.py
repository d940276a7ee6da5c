"""The requests the engine thread works on: a generation (`Decoding`) and a prompt being evaluated
(`Prompt`, a generation's or a routing prefill's), and how a prefill's result goes back to the
event loop that waits for it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from hera_core.backends.llamacpp.kvcache import Placed
from hera_core.backends.llamacpp.sampling import Grammar, Sampling
from hera_core.backends.tools import OPEN, ToolSet, parse_calls

Waiter = tuple  # (messages, toolset, asyncio.Future) of a routing prefill


@dataclass(eq=False)
class Prompt:
    """A prompt being evaluated a chunk at a time in the shared decode steps: a generation's (it
    then starts decoding) or a routing prefill's (its logits then go back to `waiter`)."""

    placed: Placed
    done: int  # tokens of the prompt in the slot's KV so far
    t0: float
    decoding: "Decoding | None" = None
    waiter: Waiter | None = None

    @property
    def tokens(self) -> list[int]:
        return self.placed.tokens


@dataclass(eq=False)
class Decoding:
    """A generation in progress, decoded a chunk at a time on the engine thread."""

    slot: int
    logits: np.ndarray | None  # the distribution of the next token (None while the prompt is evaluated)
    max_tokens: int
    stop: list[str]
    on_text: Callable[[str], None] | None
    t0: float
    prompt_tokens: int
    reused: int
    pinned: int  # index blocks of the prompt locked against eviction while decoding
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log-probability of each token of `out`
    top_k: int | None = None  # report logprobs with this many alternatives per token (None: not asked)
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # per token of `out`: (token, logprob), top_k
    text: str = ""
    sent: int = 0
    finish: str = "length"
    ttft: float | None = None
    done: bool = False
    released: bool = False  # the slot has been handed back
    cancelled: bool = False  # its caller went away: drop it from the shared decode loop
    parsed: tuple | None = None  # (content, tool_calls, errors) of the finished output, parsed once
    toolset: ToolSet | None = None
    grammar: Grammar | None = None  # active while a tool call is decoded
    sampling: Sampling | None = None  # a sampled generation's parameters (None: greedy)
    prompt: Prompt | None = None  # its prompt, while still being evaluated in the shared steps
    error: BaseException | None = None  # that evaluation failed

    def parsed_output(self) -> tuple:
        """The finished output of a generation with tools, split into content, calls and errors (once)."""
        if self.parsed is None:
            self.parsed = parse_calls(self.text, self.toolset)
        return self.parsed

    def content(self) -> str:
        """What may be streamed to the client as text so far: all of it, or what precedes a tool
        call; with tools offered, nothing while the answer could still be a call written without
        its tags (it starts with `{`, `[` or a code fence): that is decided when it ends."""
        if self.toolset is None:
            return self.text
        if self.done:
            return self.parsed_output()[0]
        head = self.text.split(OPEN, 1)[0]
        return "" if self.toolset.choice != "none" and head.lstrip()[:1] in ("{", "[", "`") else head


def deliver(taken: list[Waiter], results: list[object]) -> None:
    """Each prefill's result back to its caller's event loop: one callback per loop, so the
    callers of one batch resume in the same turn (and are scored together)."""
    def settle(batch: list[tuple[asyncio.Future, object]]) -> None:
        for fut, result in batch:
            if fut.done():
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for (_, _, fut), result in zip(taken, results):
        by_loop.setdefault(fut.get_loop(), []).append((fut, result))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(settle, batch)
        except RuntimeError:  # that caller's event loop is closed: nobody waits for it
            pass
