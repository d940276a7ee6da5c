"""The in-process API: route one subtask (one chat completion of an agent step) and book it.

    async with Runtime(local, cloud, predictor, ledger, prices) as rt:
        result = await rt.complete(messages, session="s1")

Flow per subtask: SLM prefill (KV reused across steps) -> logit + structure features ->
predictor -> the step plan (`hera_core.routing.plan`, the decision `hera eval` replays too) ->
local decode continuing from that prefill, or the cloud -> ledger row. Where the plan says so
(|P - kappa| < draft_band, an unfamiliar step under policy.unfamiliar = "draft", a step the vote
stage decides) the SLM drafts the step first; the draft is checked on the device (its program
runs, its answer parses, the prompt's examples pass; `hera_core.checks.drafts`), voted on by
samples where the plan asks, and kept or the step escalated to the cloud, booked as one row with
the draft's time and energy added (reason `escalated`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hera_core.config import PriceSettings
from hera_core.routing.budget import Budget
from hera_core.backends.base import Engine, Generation, Message, Prefill
from hera_core.backends.structured import ResponseFormat, answer_from_call, answer_toolset, is_answer_toolset
from hera_core.backends.tools import ToolSet
from hera_core.errors import (BudgetExceededError, CannotServeLocallyError, CloudError, CloudRequestError,
                               InvalidRequestError, StructuredOutputError)
from hera_core.routing.ledger import Ledger, LedgerRow
from hera_core.routing.plan import (Action, DraftOutcome, StepFacts, StepPlan, after_budget, after_cloud_failure,
                                    after_invalid_tool_call, decide_after_draft, may_leave_device, plan_step,
                                    samples_wanted, vote_key_wanted)
from hera_core.routing.policy import Decision, Override, Route
from hera_core.checks.drafts import FIRST_VOTES, DraftCheck, agreement, check_draft, votable, vote_key
from hera_core.routing.predictor import Predictor, VoteStage, structure_features
from hera_core.routing.scoring import ScoreBatcher

if TYPE_CHECKING:
    from hera_core.routing.shadow import TrafficLearning


@dataclass
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


@dataclass
class Score:
    p_local: float  # the predictor's P(the SLM's output at this step is good enough)
    threshold: float  # kappa at this step (cost-weighted if the predictor is) + offset - hot-prefix discount
    prefill: Prefill
    features: np.ndarray  # float32 [1, len(FEATURE_NAMES)], the predictor's input row


@dataclass
class _StepRun:
    """One subtask in flight: the request, its plan, and what deciding it has produced so far."""

    messages: list[Message]
    session: str
    run: str | None  # ledger label (None: the runtime's)
    step: int
    max_tokens: int
    stop: list[str] | None
    toolset: ToolSet | None
    samples: int
    sampling: dict[str, Any] | None
    on_text: Callable[[str], None] | None
    cloud_extra: dict[str, Any] | None
    t0: float  # time.perf_counter() when the step arrived
    learning: "TrafficLearning | None" = None  # the learning loop, unless off (or off for this request)
    features: np.ndarray | None = None  # the predictor's input row [k] (None: not scored)
    plan: StepPlan | None = None
    decision: Decision | None = None  # the route as decided so far (what a cancellation books)
    draft: Generation | None = None  # the SLM's draft of a drafted step (the answer if kept)
    check: DraftCheck | None = None  # its checks
    draft_s: float = 0.0  # time the SLM spent drafting and checking a step that was then escalated
    hold: list = field(default_factory=list)  # the budget's hold on the step's cloud call, settled when booked
    response_format: ResponseFormat | None = None  # structured output asked for (None: free text)
    logprobs: int | None = None  # the answer must carry its tokens' log-probabilities, with this many alternatives
    engine_extra: dict[str, Any] = field(default_factory=dict)  # what the SLM's generate is asked besides (format, logprobs)


def _budget_message(exceeded: str) -> str:
    if exceeded == "unchecked":
        return "the cloud budget cannot be checked (the shared ledger's database is unreachable)"
    return f"the {exceeded} cloud budget is spent"


async def _sampled(engine: Engine, messages: list[Message], n: int, max_tokens: int, stop: list[str] | None,
                   sampling: dict[str, Any] | None) -> tuple[Generation, list[Generation]]:
    """`n` samples of the step on `engine`, and the first of them carrying the usage of all (the
    prompt once, every completion): what the ledger books."""
    gens = await engine.generate_samples(messages, n, max_tokens=max_tokens, stop=stop, **(sampling or {}))
    usage = dataclasses.replace(gens[0], completion_tokens=sum(g.completion_tokens for g in gens),
                                latency_s=max(g.latency_s for g in gens))
    return usage, gens


def step_index(messages: list[Message]) -> int:
    """A subtask's position in its session: the number of assistant turns so far."""
    return sum(1 for m in messages if m.get("role") == "assistant")


def predictor_version(predictor: Predictor) -> str:
    """The name of a predictor on ledger rows: its version in a learning folder (v0, v1, ...), else
    a short hash of its model, so rows of different predictors never share a name."""
    version = getattr(predictor, "meta", {}).get("version")
    if version:
        return str(version)
    model = getattr(predictor, "model_json", None)
    return "sha-" + hashlib.sha256(model).hexdigest()[:10] if model else type(predictor).__name__


class Runtime:
    def __init__(self, local: Engine, cloud: Engine, predictor: Predictor, ledger: Ledger,
                 prices: PriceSettings, *, run: str = "default", threshold_offset: float = 0.0,
                 max_tokens: int = 512, budget: "Budget | None" = None, fallback: str = "local",
                 hot_prefix_discount: float = 0.0, draft_band: float | None = None,
                 draft_check_timeout_s: float = 5.0, unfamiliar: str = "cloud", agreement_k: int = 0,
                 agreement_min: float = 0.5, vote: str = "auto") -> None:
        self.local = local
        self.cloud = cloud
        self.predictor = predictor
        self.ledger = ledger
        self._scorer = ScoreBatcher(lambda X: self.predictor.predict(X))  # the predictor of the moment
        # Learning from served traffic (shadow drafts, audits, swaps; hera_core.routing.shadow), or None.
        self.learning: "TrafficLearning | None" = None
        # A database over the network (CostLedger.remote, PgLedger): bookings off the event loop. No
        # ledger: a runtime that only plans steps (tests/test_plan.py).
        self._ledger_remote = ledger is not None and ledger.remote
        self.prices = prices
        self.run = run  # ledger label of this runtime's rows
        self.threshold_offset = threshold_offset
        self.max_tokens = max_tokens
        self.budget = budget  # cloud spend caps; None = unlimited
        self.fallback = fallback  # cloud failed: "local" serves the step on the SLM, "fail" raises
        # A prompt whose prefix is already in the device's KV cache is cheap to finish locally:
        # kappa is lowered by this much times the share of the prompt that was cached.
        self.hot_prefix_discount = hot_prefix_discount
        # |P - threshold| below this: the SLM drafts, the draft is checked, then kept or escalated.
        # None: the band calibrated with the predictor's draft stage (no stage: no drafting).
        self.draft_band = draft_band
        self.draft_check_timeout_s = draft_check_timeout_s
        # Samples of a drafted step that vote on its answer (0: none); the draft is kept only if at
        # least `agreement_min` of them agree with it, and the majority answer is the local answer.
        self.agreement_k, self.agreement_min = agreement_k, agreement_min
        # A step unlike the predictor's training tasks: "cloud", "draft" (the checks alone decide) or "trust".
        self.unfamiliar = unfamiliar
        # "auto": the predictor's vote stage (if it has one) decides a task's first steps; "off": kappa does.
        self.vote = vote
        self.vote_concurrently = True  # a vote step's draft and first samples decode together (False: in turn)

    @property
    def predictor(self) -> Predictor:
        return self._predictor

    @predictor.setter
    def predictor(self, predictor: Predictor) -> None:
        """Swapped between requests (a learned version, a rollback): a step in flight keeps the
        version that scored it, and every ledger row names the version that decided it."""
        self._predictor = predictor
        self.predictor_version = predictor_version(predictor)

    @property
    def score_stats(self) -> dict[str, int]:
        """Score batching so far: {"batches": flushes that scored steps, "rows": steps scored}
        (rows / batches is the mean batch; a copy)."""
        return self._scorer.stats

    def vote_stage(self, step: int) -> VoteStage | None:
        """The predictor's vote stage when it decides this step."""
        stage = self.predictor.vote if self.vote == "auto" else None
        return stage if stage is not None and step < stage.steps else None

    async def score(self, messages: list[Message], step: int, toolset: ToolSet | None = None) -> "Score":
        """SLM prefill + features + predictor for one subtask (the prompt as the local answer
        would continue it: with the offered tools rendered)."""
        pre = await self.local.prefill(messages, **({"toolset": toolset} if toolset is not None else {}))
        p, X = await self._scorer.score(pre.logits, structure_features(step, pre.prompt_tokens, messages, toolset))
        hot = pre.cached_tokens / pre.prompt_tokens if pre.prompt_tokens else 0.0
        kappa = self.predictor.kappa.at(step, pre.prompt_tokens)
        return Score(p, kappa + self.threshold_offset - self.hot_prefix_discount * hot, pre, X)

    def is_unfamiliar(self, messages: list[Message]) -> bool:
        """The step is unlike every task the predictor was trained on (and the policy distrusts that)."""
        fam = self.predictor.familiarity
        return self.unfamiliar != "trust" and fam is not None and not fam.familiar(messages)

    async def _local_generate(self, messages, max_tokens, stop, on_text, toolset: ToolSet | None,
                              extra: dict[str, Any] | None = None) -> Generation:
        """The SLM's answer. With tools offered, or a structured answer, it is not streamed while it
        decodes: one that turns out invalid must be escalable without the client having seen any of
        it. `extra`: the engine's response_format (its grammar) and logprobs, where asked."""
        extra = extra or {}
        if toolset is None:
            return await self.local.generate(messages, max_tokens=max_tokens, stop=stop, **extra,
                                             on_text=None if "response_format" in extra else on_text)
        gen = await self.local.generate(messages, max_tokens=max_tokens, stop=stop, toolset=toolset, **extra)
        return answer_from_call(gen) if is_answer_toolset(toolset) else gen

    @staticmethod
    def _vote_seed(messages) -> int:
        return zlib.crc32(json.dumps(messages, sort_keys=True, default=str).encode())

    async def _samples(self, messages, n: int, max_tokens, stop, seed: int) -> list[Generation] | None:
        """n samples of the step (temperature 0.7, sharing the prompt's KV); None if the engine cannot
        sample (an engine without sampling, or fewer slots than n: the step is then decided without
        a vote, never failed for it)."""
        try:
            return await self.local.generate_samples(messages, n, max_tokens=max_tokens, stop=stop,
                                                     temperature=0.7, seed=seed)
        except InvalidRequestError:  # CannotServeLocallyError among them
            return None

    async def _draft_with_samples(self, messages, max_tokens, stop, n: int):
        """The greedy draft, with the vote's first n samples started alongside so that they decode
        in the same batch (bench/test_votes.py measures it): (draft, the samples' task). The
        caller awaits the task only if the draft is voted on, else cancels it."""
        samples = asyncio.ensure_future(self._samples(messages, n, max_tokens, stop, self._vote_seed(messages)))
        samples.add_done_callback(lambda t: t.cancelled() or t.exception())  # a failure is read, never left unread
        try:
            draft = await self._local_generate(messages, max_tokens, stop, None, None)
        except BaseException:
            samples.cancel()
            raise
        return draft, samples

    async def _vote(self, messages, draft: Generation, max_tokens, stop, k: int, draft_key: str | None = None,
                    first: list[Generation] | None = None):
        """k samples of the step (temperature 0.7, seeded by the prompt, sharing its KV) vote on the
        draft's answer: FIRST_VOTES first (`first`: already drawn), the rest only if those do not all
        agree. (Agreement, the answer of the largest group); (None, draft) if the engine cannot sample."""
        seed = self._vote_seed(messages)
        key_of = functools.partial(vote_key, timeout_s=self.draft_check_timeout_s)
        if draft_key is None:
            draft_key = await asyncio.to_thread(key_of, draft.text)
        gens: list[Generation] = []
        keys: list[str] = []
        for n in (min(FIRST_VOTES, k), k - min(FIRST_VOTES, k)):
            if n == 0 or (keys and all(key == draft_key for key in keys)):
                break  # the first samples agree: stop early
            more = first if first is not None and not gens else \
                await self._samples(messages, n, max_tokens, stop, seed + len(gens))
            if more is None:
                return None, draft
            gens += more
            keys += [await asyncio.to_thread(key_of, g.text) for g in more]
        vote = agreement(draft_key, keys)
        if vote.majority == 0 or keys[vote.majority - 1] == "out:(failed)":  # never swap in a failed program
            return vote, draft
        return vote, gens[vote.majority - 1]

    async def draft_step(self, messages: list[Message], plan: StepPlan, prefill_row: np.ndarray | None, *,
                         max_tokens: int, stop: list[str] | None = None, toolset: ToolSet | None = None,
                         extra: dict[str, Any] | None = None):
        """Execute a DRAFT or VOTE plan: the SLM's draft of the step (decoding on from the prefill
        that scored it), its checks, the draft stage's verdict or the samples' vote as the plan
        asks, and the decision (`decide_after_draft`): (the draft or the samples' majority answer,
        its checks, the decision). A vote plan's first samples decode alongside the draft."""
        samples = None  # the vote's first samples, drawn alongside the draft
        if plan.action is Action.VOTE and toolset is None and self.vote_concurrently:
            draft, samples = await self._draft_with_samples(messages, max_tokens, stop, min(FIRST_VOTES, plan.votes_k))
        else:
            draft = await self._local_generate(messages, max_tokens, stop, None, toolset, extra)
        try:
            return await self._check_and_vote(messages, plan, prefill_row, max_tokens, stop, draft, samples)
        finally:
            if samples is not None and not samples.done():
                samples.cancel()  # not voted on (the draft failed, or is free text): not waited for

    async def _check_and_vote(self, messages, plan: StepPlan, prefill_row, max_tokens, stop, draft: Generation,
                              samples) -> tuple[Generation, DraftCheck, Decision]:
        check = await asyncio.to_thread(check_draft, messages, draft.text, completion_tokens=draft.completion_tokens,
                                        token_logprobs=draft.extra.get("token_logprobs"),
                                        timeout_s=self.draft_check_timeout_s)
        outcome = DraftOutcome(check.passed, tool_calls=bool(draft.tool_calls), tool_errors=bool(draft.tool_errors),
                               stage_keep=self.predictor.keep_draft(prefill_row, check)[0]
                               if plan.draft_stage_decides else None)
        draft_key = None
        if vote_key_wanted(plan, outcome):
            draft_key = await asyncio.to_thread(vote_key, draft.text, self.draft_check_timeout_s)
            outcome = dataclasses.replace(outcome, votable=votable(draft_key))
        k = samples_wanted(plan, outcome)
        if k:
            first = await samples if samples is not None else None
            check.agreement, chosen = await self._vote(messages, draft, max_tokens, stop, k, draft_key, first)
            if check.agreement is not None:
                draft = chosen  # the majority answer (the draft itself unless others outvote it)
            outcome = dataclasses.replace(outcome, agreement=check.agreement)
        return draft, check, decide_after_draft(plan, outcome)

    async def plan(self, messages: list[Message], *, step: int, override: Override = Override.AUTO,
                   local_can_serve: bool = True, threshold: float | None = None, toolset: ToolSet | None = None,
                   samples: int = 1, cloud_reason: str | None = None,
                   shaped: bool = False) -> tuple[StepPlan, Score | None]:
        """The step plan (`hera_core.routing.plan`) of one subtask with this runtime's settings and
        its predictor's stages, and the score it was made from: the SLM prefill scores the step
        unless it goes to the cloud whatever P is (cloud-only, non-text content). A prompt the SLM
        cannot take (longer than its window, tools it cannot decode) is planned for the cloud."""
        why_not_local = None if local_can_serve else "the request needs the cloud (non-text content)"
        if cloud_reason is not None:
            why_not_local = f"the request asks for {cloud_reason}, which only the cloud serves"
        score = None
        if override is not Override.CLOUD_ONLY and why_not_local is None:
            try:
                score = await self.score(messages, step, toolset)
            except CannotServeLocallyError as exc:  # too long for its window, tools it cannot decode
                why_not_local = str(exc)
        band = self.draft_band if self.draft_band is not None else \
            (self.predictor.draft.band if self.predictor.draft is not None else 0.0)
        facts = StepFacts(
            step=step, p_local=score.p_local if score else None,
            threshold=(threshold if threshold is not None else score.threshold) if score else None,
            override=override, why_not_local=why_not_local,
            unfamiliar=override is Override.AUTO and why_not_local is None and self.is_unfamiliar(messages),
            on_unfamiliar=self.unfamiliar, draft_band=band, vote=self.predictor.vote if self.vote == "auto" else None,
            fixed_threshold=threshold is not None, tools=toolset is not None or shaped, samples=samples,
            agreement_k=self.agreement_k, agreement_min=self.agreement_min)
        return plan_step(facts), score

    async def complete(self, messages: list[Message], *, session: str, step: int | None = None,
                       max_tokens: int | None = None, stop: list[str] | None = None,
                       override: Override = Override.AUTO, run: str | None = None,
                       local_can_serve: bool = True, on_text: Callable[[str], None] | None = None,
                       cloud_extra: dict[str, Any] | None = None, threshold: float | None = None,
                       on_decision: Callable[[Decision], Awaitable[None]] | None = None,
                       toolset: ToolSet | None = None, samples: int = 1,
                       sampling: dict[str, Any] | None = None, trace: bool = True,
                       response_format: ResponseFormat | None = None, logprobs: int | None = None,
                       cloud_reason: str | None = None) -> SubtaskResult:
        """Route and run one subtask, book it, return the answer with its route and cost.

        local_can_serve=False (images) sends the step to the cloud; a prompt longer than the
        SLM's window does too. `cloud_extra` holds request fields only the cloud understands.
        `toolset` offers tools (both routes); a local answer whose tool call is not valid for
        them is never returned: the step is escalated to the cloud (reason `invalid-tool-call`),
        or, where it may not leave the device, answered without the call (`tool-call-dropped`).
        `on_text` receives the answer's text deltas as they are produced (streaming);
        `on_decision` is awaited once the route is known, before generation (response headers).
        `threshold` replaces kappa(step) for this call. `samples` > 1 (OpenAI's `n`): that many
        completions sampled with `sampling` (temperature, top_p, seed) on the route taken, the
        prompt paid once (locally its KV is shared by the samples); not streamed, no tools, no draft.
        `trace=False` keeps the step out of the learning loop (no shadow draft, no audit, no trace).
        With samples = 1, `sampling` asks for one sampled answer (not streamed token by token: the
        SLM's arrives whole; with tools the SLM still decodes greedily under the call grammar).
        `response_format` (structured output): a cloud answer is validated, retried once, else a
        StructuredOutputError; the SLM decodes under the schema's grammar (an engine with
        `structured_outputs`; else as the forced call of one function whose parameters are the
        schema), a local answer that does not validate is never returned. `logprobs` (k
        alternatives per token, 0-20): the answer carries them (Generation.extra["logprobs"],
        OpenAI's shape), from the SLM where it `reports_logprobs`, else from the cloud. A structured
        or logprobs step is planned like a tool step (drafted, never voted on by samples). `cloud_reason`: the request asks
        for something only the cloud serves (a field's name): the step goes there with that reason.
        """
        if samples > 1 and (on_text is not None or toolset is not None):
            raise InvalidRequestError("n > 1 is answered without streaming and without tools; send n = 1 for those")
        step = step_index(messages) if step is None else step
        st = _StepRun(messages, session, run, step, max_tokens or self.max_tokens, stop, toolset, samples, sampling,
                      on_text, cloud_extra, time.perf_counter(), learning=self.learning if trace else None,
                      response_format=response_format, logprobs=logprobs)
        cloud_reason = self._shape_local_answer(st, cloud_reason)
        toolset = st.toolset  # (a structured answer may be asked of the SLM as a forced call)
        with self._client_on_slm():  # scoring and drafting use the SLM: no shadow draft meanwhile
            st.plan, score = await self.plan(messages, step=step, override=override, local_can_serve=local_can_serve,
                                             threshold=threshold, toolset=toolset, samples=samples,
                                             cloud_reason=cloud_reason, shaped=bool(st.engine_extra))
            st.features = score.features[0] if score is not None else None
            await self._decide(st, score)
            if cloud_reason is not None and st.decision.reason == "cannot-serve-locally":
                st.decision = dataclasses.replace(st.decision, reason=cloud_reason)
        await self._within_budget(st)
        # A local answer with tools offered is announced once its calls are known to be valid.
        held = toolset is not None or "response_format" in st.engine_extra  # its text waits for validation
        announce = on_decision if held and st.decision.route is Route.LOCAL and st.draft is None \
            else None
        if on_decision is not None and announce is None:
            await on_decision(st.decision)
        try:
            gen, gens, attempts = await self._answer(st, announce)
            if response_format is not None and st.decision.route is Route.LOCAL and not gen.tool_calls:
                why = response_format.validate(gen.text)
                if why is not None:  # (a local-only step whose constrained answer failed: never returned)
                    elapsed = time.perf_counter() - st.t0
                    self._book(run, session, step, st.decision, model=gen.model, gen=gen, latency_s=elapsed,
                               cost=self.prices.local_cost(elapsed), status="StructuredOutputError")
                    raise StructuredOutputError(f"the SLM's structured answer is not valid: {why}; "
                                                f"{'; '.join(gen.tool_errors)}".rstrip("; "))
            elapsed = time.perf_counter() - st.t0  # scoring prefill included: it is the local prefill
            cloud_cost = self.prices.cloud_cost(gen.prompt_tokens, gen.completion_tokens)
            # an escalated step also paid for its draft
            cost = self.prices.local_cost(elapsed) if st.decision.route is Route.LOCAL else \
                cloud_cost + self.prices.local_cost(st.draft_s)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):  # the client went away mid-answer: book what was spent
                self._record_cancelled(run, session, step, st.decision, time.perf_counter() - st.t0)
            for h in st.hold:  # nothing was spent on the cloud that the ledger knows of
                self.budget.settle(session, h, 0.0)
            raise
        row_id = await self._ledger_io(self._book_and_settle, st.hold, run, session, step, st.decision,
                                       model=gen.model, gen=gen, latency_s=max(elapsed, gen.latency_s), cost=cost,
                                       cloud_cost=cloud_cost, attempts=attempts)
        if st.learning is not None and st.decision.route is Route.LOCAL:
            self._maybe_audit(st, gen)
        return SubtaskResult(text=gen.text, route=st.decision.route, decision=st.decision, generation=gen,
                             cost_usd=cost, cloud_cost_usd=cloud_cost, step=step, ledger_id=row_id, draft=st.check,
                             samples=gens)

    async def _decide(self, st: "_StepRun", score: Score | None) -> None:
        """The plan's decision; a drafted step's once its draft is checked (and voted on)."""
        plan = st.plan
        if plan.action not in (Action.DRAFT, Action.VOTE):
            st.decision = plan.decision
            return
        try:
            st.draft, st.check, st.decision = await self.draft_step(
                st.messages, plan, score.features, max_tokens=st.max_tokens, stop=st.stop, toolset=st.toolset,
                extra=st.engine_extra)
        except asyncio.CancelledError:
            self._record_cancelled(st.run, st.session, st.step, plan.drafting, time.perf_counter() - st.t0)
            raise
        if st.decision.route is Route.CLOUD:
            st.draft_s = time.perf_counter() - st.t0

    def _shape_local_answer(self, st: "_StepRun", cloud_reason: str | None) -> str | None:
        """What the SLM is asked besides the text (st.engine_extra: the response format's grammar,
        logprobs) for a structured or logprobs step, or the reason only the cloud can serve it."""
        fmt, logprobs = st.response_format, st.logprobs
        native = fmt is not None and getattr(self.local, "structured_outputs", False)
        if native and (st.toolset is not None or st.samples > 1):
            cloud_reason = cloud_reason or "structured"  # the engine's grammar is for a lone answer
        elif native:
            st.engine_extra["response_format"] = fmt
        if logprobs is not None and getattr(self.local, "reports_logprobs", False):
            st.engine_extra["logprobs"] = logprobs
        if cloud_reason is None and fmt is not None and not native:
            # The SLM answers as a forced call whose arguments are the schema's instance (under the
            # tool-call grammar); a schema whose root is not an object, or tools offered as well: the cloud.
            answer_tools = answer_toolset(fmt) if st.toolset is None and st.samples == 1 else None
            if answer_tools is None:
                cloud_reason = "structured"
            else:
                st.toolset = answer_tools
        if cloud_reason is None and logprobs is not None and "logprobs" not in st.engine_extra:
            cloud_reason = "logprobs"  # the SLM does not report its tokens' log-probabilities
        return cloud_reason

    async def _within_budget(self, st: "_StepRun") -> None:
        """A cloud step asks the budget for its price (held until booked): past a cap it moves to the
        SLM or is refused, as the budget's action says."""
        if st.decision.route is not Route.CLOUD or self.budget is None:
            return
        exceeded = await self._ledger_io(self._reserve, st.session, st.messages, st.max_tokens, st.hold)
        moved = after_budget(st.plan, st.decision, exceeded, self.budget.action)
        if moved is None:
            raise BudgetExceededError(_budget_message(exceeded) + "; the step was refused "
                                      "(raise the cap, or set budget_action = 'local')")
        st.decision = moved

    async def _answer(self, st: "_StepRun", announce) -> tuple[Generation, list[Generation], list]:
        """The answer on the decided route, the decision updated on the way (an invalid tool call
        escalated, a failed cloud call served locally): (answer, all samples, the cloud's attempts)."""
        gen, gens, attempts = None, [], []
        if st.decision.route is Route.LOCAL:
            with self._client_on_slm():
                gen, gens = await self._answer_locally(st, announce)
        if st.decision.route is Route.CLOUD:
            gen, gens, attempts = await self._answer_in_cloud(st)
        return gen, gens, attempts

    async def _on_slm(self, st: "_StepRun", on_text) -> tuple[Generation, list[Generation]]:
        if st.samples > 1:
            return await _sampled(self.local, st.messages, st.samples, st.max_tokens, st.stop, st.sampling)
        if st.sampling is not None and st.toolset is None and not st.engine_extra:  # one sampled answer, whole
            gen, _ = await _sampled(self.local, st.messages, 1, st.max_tokens, st.stop, st.sampling)
            if on_text is not None and gen.text:
                on_text(gen.text)
            return gen, []
        return await self._local_generate(st.messages, st.max_tokens, st.stop, on_text, st.toolset,
                                          st.engine_extra), []

    async def _answer_locally(self, st: "_StepRun", announce) -> tuple[Generation | None, list[Generation]]:
        """The SLM's answer (a kept draft is the answer: no second decode). An invalid tool call in
        it is escalated (the answer is then None) or dropped, as `after_invalid_tool_call` decides."""
        if st.samples > 1:
            return await self._on_slm(st, None)
        gen = st.draft if st.draft is not None else (await self._on_slm(st, st.on_text))[0]
        if "response_format" in st.engine_extra and not gen.tool_errors:
            why = st.response_format.validate(gen.text)  # (cut by max_tokens; a keyword the grammar skips)
            if why is not None:  # escalated like an invalid tool call
                gen = dataclasses.replace(gen, tool_errors=[f"the structured answer is not valid: {why}"])
        if gen.tool_errors:  # the SLM's tool call is not valid: never returned as one
            over_budget = may_leave_device(st.plan) and self.budget is not None and \
                await self._ledger_io(self._reserve, st.session, st.messages, st.max_tokens, st.hold) is not None
            st.decision = after_invalid_tool_call(st.plan, st.decision, over_budget)
            if st.decision.route is Route.CLOUD:
                st.draft_s, gen = time.perf_counter() - st.t0, None
        if announce is not None:
            await announce(st.decision)
        if gen is not None and (st.draft is not None or st.toolset is not None or "response_format" in st.engine_extra) \
                and st.on_text is not None \
                and gen.text:
            st.on_text(gen.text)  # held back while it was decided
        return gen, []

    async def _answer_in_cloud(self, st: "_StepRun") -> tuple[Generation, list[Generation], list]:
        """The cloud's answer; if the call fails, the SLM's where `after_cloud_failure` allows it."""
        kwargs: dict[str, Any] = {"extra": dict(st.cloud_extra or {})}
        if st.response_format is not None:
            kwargs["extra"]["response_format"] = st.response_format.request_field()
        if not kwargs["extra"]:
            del kwargs["extra"]
        if st.toolset is not None and not is_answer_toolset(st.toolset):  # (the SLM's way to a structured answer)
            kwargs["toolset"] = st.toolset
        streamed: list[str] = []
        on_text = st.on_text
        # A structured answer is held back until it has validated: the client never sees one that did not.
        relay = None if on_text is None or st.response_format is not None else \
            (lambda d: (streamed.append(d), on_text(d)))
        shadow = self._start_shadow(st)
        try:
            if st.samples > 1:
                gen, gens = await _sampled(self.cloud, st.messages, st.samples, st.max_tokens, st.stop, st.sampling)
            else:
                gen, gens = await self.cloud.generate(st.messages, max_tokens=st.max_tokens, stop=st.stop,
                                                      on_text=relay, **kwargs), []
        except CloudError as exc:
            if shadow is not None:
                shadow.cancel()  # no cloud answer to compare it with
            fallback = after_cloud_failure(st.plan, st.decision, fallback=self.fallback, streamed=bool(streamed),
                                           request_error=isinstance(exc, CloudRequestError))
            self._record_failure(st.run, st.session, st.step, st.decision, exc, time.perf_counter() - st.t0)
            if fallback is None:
                raise
            st.decision = fallback
            with self._client_on_slm():
                gen, gens = await self._on_slm(st, on_text)
            if gen.tool_errors:
                st.decision = dataclasses.replace(st.decision, reason="tool-call-dropped")
            if st.toolset is not None and on_text is not None and gen.text:
                on_text(gen.text)
            return gen, gens, []
        except BaseException:
            if shadow is not None:
                shadow.cancel()
            raise
        if st.response_format is not None or st.logprobs is not None:
            gen = await self._checked_cloud_answer(st, gen, kwargs)
        if shadow is not None:
            st.learning.finish_shadow(shadow, messages=st.messages, session=st.session, step=st.step,
                                      features=st.features, version=self.predictor_version, cloud=gen)
        return gen, gens, gen.extra.get("attempts", [])

    @staticmethod
    def _answer_problem(st: "_StepRun", gen: Generation) -> str | None:
        """Why a cloud answer is not in the format the request asked for, or None. An answer that
        calls tools is not held to the format."""
        if st.response_format is not None and not gen.tool_calls:
            return st.response_format.validate(gen.text)
        return None

    async def _checked_cloud_answer(self, st: "_StepRun", gen: Generation, kwargs: dict[str, Any]) -> Generation:
        """The cloud's answer checked against what was asked for: logprobs missing is a CloudError; a
        structured answer that does not validate is asked for once more (its tokens booked with the
        first's), then a StructuredOutputError (booked as a failed call) that says why."""
        if st.logprobs is not None and not gen.extra.get("logprobs"):  # asking again would not bring them
            exc = CloudError("the cloud answered without the logprobs that were asked for (its API may not "
                             "offer them); send logprobs only to a cloud that does", gen.extra.get("attempts", []))
            self._record_failure(st.run, st.session, st.step, st.decision, exc, time.perf_counter() - st.t0)
            raise exc
        why = self._answer_problem(st, gen)
        if why is not None:
            try:
                again = await self.cloud.generate(st.messages, max_tokens=st.max_tokens, stop=st.stop, **kwargs)
            except CloudError as exc:
                self._record_failure(st.run, st.session, st.step, st.decision, exc, time.perf_counter() - st.t0)
                raise
            attempts = gen.extra.get("attempts", []) + again.extra.get("attempts", [])
            again.prompt_tokens += gen.prompt_tokens
            again.completion_tokens += gen.completion_tokens
            again.latency_s += gen.latency_s
            again.extra["attempts"] = attempts
            gen, first_why = again, why
            why = self._answer_problem(st, gen)
            if why is not None:
                exc = StructuredOutputError(f"the cloud's answer is not what the request asked for, twice: "
                                            f"{first_why}; then {why}", attempts)
                self._record_failure(st.run, st.session, st.step, st.decision, exc, time.perf_counter() - st.t0)
                raise exc
        if st.on_text is not None and st.response_format is not None and gen.text:
            st.on_text(gen.text)  # held back until it validated
        return gen

    # --- learning from served traffic (hera_core.routing.shadow) ------------------------------------
    def _client_on_slm(self):
        """Around a client step's use of the SLM: running shadow drafts give way to it."""
        return self.learning.client_on_slm() if self.learning is not None else contextlib.nullcontext()

    def _start_shadow(self, st: "_StepRun") -> "asyncio.Future | None":
        """The SLM's draft of a cloud-routed step, for the trace store: started now beside the cloud
        call when the device is idle; an escalated step's own draft is used as it is. None: not
        traced (learning off for it, not scored, n > 1, or a step that may not leave the device)."""
        if st.learning is None or st.features is None or st.samples > 1 or not may_leave_device(st.plan):
            return None
        if st.draft is not None:  # drafted, checked and escalated: the pair is already half made
            done = asyncio.get_running_loop().create_future()
            done.set_result(st.draft)
            return done
        return st.learning.start_shadow(st.messages, max_tokens=st.max_tokens, stop=st.stop, toolset=st.toolset)

    def _maybe_audit(self, st: "_StepRun", gen: Generation) -> None:
        """A step the predictor kept local is, with the audit share, also sent to the cloud (after the
        client has its answer) to measure live agreement; never a step that may not leave the
        device, nor one the SLM took for want of the cloud (a budget, a failure)."""
        if st.features is None or st.samples > 1 or not st.plan.facts.automatic or gen.tool_errors or \
                st.decision.reason.startswith(("budget", "fallback", "tool-call-dropped")):
            return
        if self.budget is not None and self.budget.exceeded(st.session) is not None:
            return
        st.learning.maybe_audit(messages=st.messages, session=st.session, step=st.step, features=st.features,
                                version=self.predictor_version, local=gen, max_tokens=st.max_tokens, stop=st.stop,
                                toolset=None if is_answer_toolset(st.toolset) else st.toolset)

    def book_learning(self, kind: str, session: str, step: int, gen: Generation, latency_s: float,
                      version: str | None = None) -> None:
        """The ledger row of a learning-loop call (status 'shadow': the SLM's device time on a shadow
        draft; 'audit': the cloud call of an audited local step): real spend, never a client's step."""
        route = Route.CLOUD if kind == "audit" else Route.LOCAL
        cost = self.prices.cloud_cost(gen.prompt_tokens, gen.completion_tokens) if kind == "audit" else \
            self.prices.local_cost(latency_s)
        self._book(None, session, step, None, model=gen.model, gen=gen, latency_s=latency_s, cost=cost,
                   cloud_cost=cost if kind == "audit" else 0.0, status=kind, reason=kind, route=route.value,
                   version=version)

    async def _ledger_io(self, fn, *args, **kwargs):
        """Run a booking or budget call: inline for a local ledger (SQLite, microseconds), on a worker
        thread for a remote one (PostgreSQL), so database round trips, and an outage's connect
        timeouts, never hold up the event loop's other steps."""
        if self._ledger_remote:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    def _book_and_settle(self, hold: list, run, session: str, step: int, decision: Decision, **row) -> int:
        row_id = self._book(run, session, step, decision, **row)
        for h in hold:  # after the row: a shared budget never sees the spend neither held nor booked
            self.budget.settle(session, h, row["cloud_cost"] if decision.route is Route.CLOUD else 0.0)
        return row_id

    def _reserve(self, session: str, messages: list[Message], max_tokens: int, hold: list) -> str | None:
        """Ask the budget for a cloud call of at most this step's price (its prompt, estimated at 4
        characters a token, and max_tokens): the cap that is spent, or None with the hold added."""
        chars = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
        exceeded, h = self.budget.reserve(session, self.prices.cloud_cost(chars // 4 + 1, max_tokens))
        if exceeded is None:
            hold.append(h)
        return exceeded

    def _book(self, run: str | None, session: str, step: int, decision: Decision | None, *, model: str,
              gen: Generation | None = None, latency_s: float, cost: float = 0.0, cloud_cost: float = 0.0,
              status: str = "ok", reason: str | None = None, route: str | None = None,
              attempts: list[tuple[str, float]] | tuple = (), version: str | None = None) -> int:
        """The one place a ledger row is built: a routed step, a failure, a cancellation, a pass-through."""
        return self.ledger.record(LedgerRow(
            run=run or self.run, session=session, step=step,
            route=route or (decision.route.value if decision else "cloud"), model=model,
            prompt_tokens=gen.prompt_tokens if gen else 0, completion_tokens=gen.completion_tokens if gen else 0,
            cached_tokens=gen.cached_tokens if gen else 0, latency_s=latency_s, cost_usd=cost,
            cloud_cost_usd=cloud_cost, p_local=decision.p_local if decision else None,
            threshold=decision.threshold if decision else None,
            reason=reason or (decision.reason if decision else ""), status=status,
            predictor_version=version or (self.predictor_version if decision else None)), attempts)

    def _record_cancelled(self, run, session, step, decision: Decision, elapsed: float) -> None:
        """A subtask cancelled while generating (its client disconnected) is a row with status
        'cancelled': a local one costs the energy of the time it ran; a cloud one is booked at 0
        (what the provider bills for a request closed mid-answer is not known here)."""
        local = decision.route is Route.LOCAL
        self._book(run, session, step, decision, model=self.model_name(decision.route), latency_s=elapsed,
                   cost=self.prices.local_cost(elapsed) if local else 0.0, status="cancelled")

    def _record_failure(self, run, session, step, decision, exc: CloudError, elapsed: float) -> None:
        """A failed cloud call is a ledger row too (status = the error class, cost 0)."""
        self._book(run, session, step, decision, model=self.cloud.name, latency_s=elapsed, route="cloud",
                   status=type(exc).__name__, attempts=exc.attempts)

    # --- requests that bypass routing ------------------------------------------------------------
    def _check_budget_for_passthrough(self, session: str) -> None:
        exceeded = self.budget.exceeded(session) if self.budget is not None else None
        if exceeded is not None:  # a named cloud model cannot move to the SLM: refused whatever the action
            raise BudgetExceededError(_budget_message(exceeded) + "; the pass-through request was refused "
                                      "(raise the cap)")

    def _book_passthrough(self, run, session: str, step: int, model: str, usage: dict[str, Any], elapsed: float,
                          attempts=(), status: str = "ok") -> float:
        pt, ct = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        cost = self.prices.cloud_cost(pt, ct)
        gen = Generation(text="", prompt_tokens=pt, completion_tokens=ct, latency_s=elapsed, ttft_s=elapsed,
                         finish_reason="stop", model=model)
        self._book(run, session, step, None, model=model, gen=gen, latency_s=elapsed, cost=cost, cloud_cost=cost,
                   reason="passthrough", status=status, attempts=attempts)
        if self.budget is not None:
            self.budget.add(session, cost)
        return cost

    async def passthrough(self, payload: dict[str, Any], *, session: str, step: int = 0,
                          run: str | None = None) -> tuple[dict[str, Any], float]:
        """A request for a model other than HERA's, forwarded to the cloud as it is; checked against
        the budget, booked and budgeted like any cloud step. Returns (response JSON, cost USD)."""
        self._check_budget_for_passthrough(session)
        t0 = time.perf_counter()
        model = str(payload.get("model", self.cloud.name))
        try:
            data, attempts = await self.cloud.forward(payload)
        except CloudError as exc:
            self._book_passthrough(run, session, step, model, {}, time.perf_counter() - t0, exc.attempts,
                                   status=type(exc).__name__)
            raise
        cost = self._book_passthrough(run, session, step, model, data.get("usage") or {}, time.perf_counter() - t0,
                                      attempts)
        return data, cost

    async def passthrough_stream(self, payload: dict[str, Any], *, session: str, step: int = 0,
                                 run: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """`passthrough`, streamed: yields the upstream's chunks; booked once the stream ends (as
        'cancelled' if the consumer stops early)."""
        self._check_budget_for_passthrough(session)
        t0 = time.perf_counter()
        usage: dict[str, Any] = {}
        model = str(payload.get("model", self.cloud.name))
        status = "cancelled"
        try:
            async for chunk in self.cloud.forward_stream(payload):
                usage = chunk.get("usage") or usage
                yield chunk
            status = "ok"
        except CloudError as exc:
            status = type(exc).__name__
            raise
        finally:
            self._book_passthrough(run, session, step, model, usage, time.perf_counter() - t0, status=status)

    # --- what the serving layer may ask ----------------------------------------------------------
    def model_name(self, route: Route) -> str:
        return (self.local if route is Route.LOCAL else self.cloud).name

    def cache_stats(self) -> dict[str, float] | None:
        """The local engine's KV-cache counters (None if it keeps none)."""
        return self.local.cache_stats()

    async def close(self) -> None:
        await self.local.close()
        await self.cloud.close()

    async def __aenter__(self) -> "Runtime":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
