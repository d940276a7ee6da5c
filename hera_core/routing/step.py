"""One subtask as the runtime sees it: what the client asks (`StepRequest`), the step while it is
decided and answered (`StepRun`), and what comes back (`SubtaskResult`).

    request = StepRequest(messages, session="s1", max_tokens=256, toolset=tools)
    result = await runtime.run_step(request)        # or runtime.complete(messages, session="s1", ...)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hera_core.backends.base import Generation, Message, Prefill
from hera_core.backends.structured import ResponseFormat
from hera_core.backends.tools import ToolSet
from hera_core.checks.drafts import DraftCheck
from hera_core.errors import InvalidRequestError
from hera_core.routing.plan import StepPlan
from hera_core.routing.policy import Decision, Override, Route

if TYPE_CHECKING:
    from hera_core.routing.shadow import TrafficLearning


def step_index(messages: list[Message]) -> int:
    """A subtask's position in its session: the number of assistant turns so far."""
    return sum(1 for m in messages if m.get("role") == "assistant")


@dataclass(slots=True)
class StepRequest:
    """What one subtask (one chat completion of an agent step) asks of the runtime.

    `local_can_serve=False` (images) sends the step to the cloud; a prompt longer than the SLM's
    window does too. `cloud_extra` holds request fields only the cloud understands. `toolset`
    offers tools (both routes); a local answer whose tool call is not valid for them is never
    returned: the step is escalated to the cloud (reason `invalid-tool-call`), or, where it may not
    leave the device, answered without the call (`tool-call-dropped`). `on_text` receives the
    answer's text deltas as they are produced (streaming); `on_decision` is awaited once the route
    is known, before generation (response headers). `threshold` replaces kappa(step) for this call.
    `samples` > 1 (OpenAI's `n`): that many completions sampled with `sampling` (temperature,
    top_p, seed) on the route taken, the prompt paid once; not streamed, no tools, no draft. With
    samples = 1, `sampling` asks for one sampled answer (arriving whole from the SLM). `trace=False`
    keeps the step out of the learning loop (no shadow draft, no audit, no trace).
    `response_format` (structured output): a cloud answer is validated, retried once, else a
    StructuredOutputError; the SLM decodes under the schema's grammar (or as a forced call whose
    arguments are the schema's instance) and a local answer that does not validate is never
    returned. `logprobs` (k alternatives per token, 0-20): the answer carries them, from the SLM
    where it reports them, else from the cloud. A structured or logprobs step is planned like a
    tool step (drafted, never voted on). `cloud_reason`: the request asks for something only the
    cloud serves (a field's name): the step goes there with that reason.
    """

    messages: list[Message]
    session: str
    step: int | None = None  # None: the number of assistant turns in `messages`
    max_tokens: int | None = None  # None: the runtime's
    stop: list[str] | None = None
    override: Override = Override.AUTO
    run: str | None = None  # ledger label (None: the runtime's)
    local_can_serve: bool = True
    on_text: Callable[[str], None] | None = None
    on_decision: Callable[[Decision], Awaitable[None]] | None = None
    cloud_extra: dict[str, Any] | None = None
    threshold: float | None = None
    toolset: ToolSet | None = None
    samples: int = 1
    sampling: dict[str, Any] | None = None
    trace: bool = True
    response_format: ResponseFormat | None = None
    logprobs: int | None = None
    cloud_reason: str | None = None

    def __post_init__(self) -> None:
        if self.samples > 1 and (self.on_text is not None or self.toolset is not None):
            raise InvalidRequestError("n > 1 is answered without streaming and without tools; send n = 1 for those")
        if self.step is None:
            self.step = step_index(self.messages)


@dataclass(slots=True)
class Score:
    p_local: float  # the predictor's P(the SLM's output at this step is good enough)
    threshold: float  # kappa at this step (cost-weighted if the predictor is) + offset - hot-prefix discount
    prefill: Prefill
    features: np.ndarray  # float32 [1, len(FEATURE_NAMES)], the predictor's input row


@dataclass(slots=True)
class StepRun:
    """One subtask in flight: its request, its plan, and what deciding it has produced so far."""

    req: StepRequest
    max_tokens: int  # the request's, else the runtime's
    toolset: ToolSet | None  # the request's, or the forced answer call a structured answer is asked as
    learning: "TrafficLearning | None" = None  # the learning loop, unless off (or off for this request)
    cloud_reason: str | None = None  # what the request asks that only the cloud serves (a field's name)
    t0: float = field(default_factory=time.perf_counter)  # when the step arrived
    engine_extra: dict[str, Any] = field(default_factory=dict)  # the SLM's generate is asked besides (format, logprobs)
    features: np.ndarray | None = None  # the predictor's input row [k] (None: not scored)
    plan: StepPlan | None = None
    decision: Decision | None = None  # the route as decided so far (what a cancellation books)
    draft: Generation | None = None  # the SLM's draft of a drafted step (the answer if kept)
    check: DraftCheck | None = None  # its checks
    draft_s: float = 0.0  # time the SLM spent drafting and checking a step that was then escalated
    hold: list = field(default_factory=list)  # the budget's hold on the step's cloud call, settled when booked

    @property
    def session(self) -> str:
        return self.req.session

    @property
    def step(self) -> int:
        return self.req.step

    @property
    def messages(self) -> list[Message]:
        return self.req.messages

    @property
    def where(self) -> tuple[str | None, str, int]:
        """(run, session, step) of the step's ledger rows."""
        return self.req.run, self.req.session, self.req.step

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def structured_on_slm(self) -> bool:
        """The SLM decodes under the response format's own grammar."""
        return "response_format" in self.engine_extra


@dataclass(slots=True)
class SubtaskResult:
    text: str
    route: Route
    decision: Decision
    generation: Generation
    cost_usd: float  # on the route taken
    cloud_cost_usd: float  # had it gone to the cloud (estimated from token counts when local)
    step: int
    ledger_id: int
    draft: DraftCheck | None = None  # the checks of the SLM's draft, for a step that was drafted first
    samples: list[Generation] = field(default_factory=list)  # every choice of an n > 1 step (the first is `generation`)


def with_usage_of_all(gens: list[Generation]) -> Generation:
    """The first of `n` samples carrying the usage of all (the prompt once, every completion): what
    the ledger books."""
    return dataclasses.replace(gens[0], completion_tokens=sum(g.completion_tokens for g in gens),
                               latency_s=max(g.latency_s for g in gens))
