"""The in-process API: route one subtask (one chat completion of an agent step) and book it.

    async with Runtime(local, cloud, predictor, ledger, prices) as rt:
        result = await rt.complete(messages, session="s1")          # or rt.run_step(StepRequest(...))

Flow per subtask: SLM prefill (KV reused across steps) -> logit + structure features (batched
across steps: `scoring`) -> predictor -> the step plan (`plan`, the decision `hera eval` replays
too) -> local decode continuing from that prefill, or the cloud -> ledger row (`booking`). Where the
plan says so (|P - kappa| < draft_band, an unfamiliar step under policy.unfamiliar = "draft", a step
the vote stage decides) the SLM drafts the step first (`drafting`): the draft is checked on the
device, voted on by samples where the plan asks, and kept or the step escalated to the cloud, booked
as one row with the draft's time and energy added (reason `escalated`). A cloud call that fails is
answered on the SLM by the same local path, where the plan allows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from hera_core.backends.base import Engine, Generation, Message
from hera_core.backends.structured import answer_toolset, is_answer_toolset
from hera_core.backends.tools import ToolSet
from hera_core.config import PolicySettings, PriceSettings
from hera_core.errors import (BudgetExceededError, CannotServeLocallyError, CloudError, CloudRequestError,
                               StructuredOutputError)
from hera_core.routing.booking import Booker, budget_message
from hera_core.routing.budget import Budget
from hera_core.routing.drafting import Drafter
from hera_core.routing.ledger import Ledger
from hera_core.routing.plan import (Action, StepFacts, StepPlan, after_budget, after_cloud_failure,
                                    after_invalid_tool_call, may_leave_device, plan_step)
from hera_core.routing.policy import Override, Route
from hera_core.routing.predictor import Kappa, Predictor, predictor_version, structure_features
from hera_core.routing.scoring import ScoreBatcher
from hera_core.routing.step import Score, StepRequest, StepRun, SubtaskResult, step_index

if TYPE_CHECKING:
    from hera_core.routing.shadow import TrafficLearning

__all__ = ["Runtime", "StepRequest", "SubtaskResult", "Score", "step_index", "predictor_version"]
_NOTHING = contextlib.nullcontext()  # (reusable: it holds no state)
RUN_OPTIONS = {"run": "default", "max_tokens": 512, "fallback": "local"}  # besides PolicySettings' fields


class Runtime:
    def __init__(self, local: Engine, cloud: Engine, predictor: Predictor, ledger: Ledger,
                 prices: PriceSettings, *, budget: Budget | None = None, policy: PolicySettings | None = None,
                 **options: Any) -> None:
        """`policy`: the routing policy's settings (`[policy]` in hera.toml); `options`: any of its
        fields to override (threshold_offset=0.1, unfamiliar="trust", ...) and `run` (the ledger
        label of this runtime's rows), `max_tokens` (a step's default completion limit),
        `fallback` ("local": a failed cloud call is answered on the SLM; "fail": it raises).
        `budget`: cloud spend caps (None: unlimited)."""
        unknown = set(options) - set(RUN_OPTIONS) - set(PolicySettings.model_fields)
        if unknown:
            raise TypeError(f"Runtime() got unknown options {sorted(unknown)}")
        policy = PolicySettings.model_validate({**(policy.model_dump() if policy is not None else {}),
                                                **{k: v for k, v in options.items() if k not in RUN_OPTIONS}})
        run = {**RUN_OPTIONS, **{k: v for k, v in options.items() if k in RUN_OPTIONS}}
        if run["fallback"] not in ("local", "fail") or int(run["max_tokens"]) < 1:
            raise ValueError(f"fallback must be 'local' or 'fail' and max_tokens at least 1, got {run}")
        self.local = local
        self.cloud = cloud
        self.predictor = predictor
        self.ledger = ledger
        self.prices = prices
        # every row and budget hold of this runtime (its budget and run label are the booker's)
        self.booker = Booker(ledger, prices, budget, str(run["run"]), lambda: self.predictor_version)
        self.max_tokens, self.fallback = int(run["max_tokens"]), run["fallback"]
        # (the predictor of the moment: it may be swapped between requests)
        self._scorer = ScoreBatcher(lambda rows, structure: self.predictor.score_logits(rows, structure))
        self.drafter = Drafter(local, policy.draft_check_timeout_s)
        # Learning from served traffic (shadow drafts, audits, swaps; hera_core.routing.shadow), or None.
        self.learning: "TrafficLearning | None" = None
        self.threshold_offset = policy.threshold_offset
        # A prompt whose prefix is already in the device's KV cache is cheap to finish locally:
        # kappa is lowered by this much times the share of the prompt that was cached.
        self.hot_prefix_discount = policy.hot_prefix_discount
        # |P - threshold| below this: the SLM drafts, the draft is checked, then kept or escalated.
        # None: the band calibrated with the predictor's draft stage (no stage: no drafting).
        self.draft_band = policy.draft_band
        # Samples of a drafted step that vote on its answer (0: none); the draft is kept only if at
        # least `agreement_min` of them agree with it, and the majority answer is the local answer.
        self.agreement_k, self.agreement_min = policy.agreement_k, policy.agreement_min
        # A step unlike the predictor's training tasks: "cloud", "draft" (the checks alone decide) or "trust".
        self.unfamiliar = policy.unfamiliar
        # "auto": the predictor's vote stage (if it has one) decides a task's first steps; "off": kappa does.
        self.vote = policy.vote

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
    def budget(self) -> Budget | None:
        """Cloud spend caps (None: unlimited)."""
        return self.booker.budget

    @budget.setter
    def budget(self, budget: Budget | None) -> None:
        self.booker.budget = budget

    @property
    def run(self) -> str:
        """The ledger label of this runtime's rows."""
        return self.booker.run

    @property
    def score_stats(self) -> dict[str, int]:
        """Score batching so far: {"batches": flushes that scored steps, "rows": steps scored}
        (rows / batches is the mean batch; a copy)."""
        return self._scorer.stats

    async def score(self, messages: list[Message], step: int, toolset: ToolSet | None = None, *,
                    features_toolset: ToolSet | None = None, schema_size: int = 0,
                    agent_tools: bool | None = None) -> Score:
        """SLM prefill + features + predictor for one subtask (the prompt as the local answer
        would continue it: with the offered tools rendered). `features_toolset`: what the tool
        features describe where it is not `toolset` (a structured answer under the engine's own
        grammar is, to the predictor, the forced answer call it is on an engine without one);
        `schema_size`: a structured step's schema size (`ResponseFormat.size`); `agent_tools`:
        the agent offers tools (None: `toolset` is given), which tells a predictor shared by
        workloads the step's kind."""
        tools = toolset is not None if agent_tools is None else agent_tools
        kappa = self._predictor.kappa_of(self._predictor.workload(messages, tools))
        return await self._score(messages, step, toolset, features_toolset, schema_size, kappa)

    async def _score(self, messages: list[Message], step: int, toolset: ToolSet | None,
                     features_toolset: ToolSet | None, schema_size: int, kappa_of: Kappa) -> Score:
        """`score` with the step's kappa (its workload's, or the predictor's) already chosen."""
        pre = await (self.local.prefill(messages) if toolset is None else self.local.prefill(messages, toolset=toolset))
        described = features_toolset if features_toolset is not None else toolset
        structure = structure_features(step, pre.prompt_tokens, messages, described, schema_size)
        scored = self._scorer.now(pre.logits, structure)  # (no await: a lone step is scored in place)
        p, X = scored if scored is not None else await self._scorer.join(pre.logits, structure)
        hot = pre.cached_tokens / pre.prompt_tokens if pre.prompt_tokens else 0.0
        kappa = kappa_of.at(step, pre.prompt_tokens)
        return Score(p, kappa + self.threshold_offset - self.hot_prefix_discount * hot, pre, X)

    def is_unfamiliar(self, messages: list[Message], tools: bool = False) -> bool:
        """The step is unlike every task the predictor was trained on (and the policy distrusts
        that); `tools`: the agent offers tools at this step."""
        return self.unfamiliar != "trust" and not self._predictor.locate(messages, tools)[0]

    # --- one step: plan, decide, answer, book ------------------------------------------------------
    async def complete(self, messages: list[Message], *, session: str, **options: Any) -> SubtaskResult:
        """Route and run one subtask, book it, return the answer with its route and cost.
        `options`: the fields of `StepRequest` (max_tokens, stop, toolset, on_text, ...), which says
        what each does."""
        return await self.run_step(StepRequest(messages, session, **options))

    async def plan(self, request: StepRequest) -> tuple[StepPlan, Score | None]:
        """The step plan (`hera_core.routing.plan`) of one subtask with this runtime's settings and
        its predictor's stages, and the score it was made from (None: not scored)."""
        return await self._plan(self._start(request))

    async def run_step(self, req: StepRequest) -> SubtaskResult:
        """`complete`, for a request already made."""
        st = self._start(req)
        with self._client_on_slm():  # scoring and drafting use the SLM: no shadow draft meanwhile
            st.plan, score = await self._plan(st)
            st.features = score.features[0] if score is not None else None
            if st.plan.action is Action.DRAFT or st.plan.action is Action.VOTE:
                await self._draft(st)
            else:
                st.decision = st.plan.decision
        if st.cloud_reason is not None and st.decision.reason == "cannot-serve-locally":
            st.decision = dataclasses.replace(st.decision, reason=st.cloud_reason)
        if st.decision.route is Route.CLOUD and self.booker.budget is not None:
            await self._within_budget(st)
        announce = None
        if req.on_decision is not None:
            # A local answer with tools offered (or structured) is announced once it is known to be valid.
            held = st.toolset is not None or st.structured_on_slm
            if held and st.decision.route is Route.LOCAL and st.draft is None:
                announce = req.on_decision
            else:
                await req.on_decision(st.decision)
        try:
            if st.decision.route is Route.LOCAL:
                if self.learning is None:  # (no shadow drafts to hold off: no context to enter)
                    gen, gens = await self._answer_locally(st, announce)
                else:
                    with self.learning.client_on_slm():
                        gen, gens = await self._answer_locally(st, announce)
                attempts = []
            if st.decision.route is Route.CLOUD:  # (an invalid local tool call may have escalated it)
                gen, gens, attempts = await self._answer_in_cloud(st)
            self._refuse_invalid_structured(st, gen)
            cloud_cost = self.prices.cloud_cost(gen.prompt_tokens, gen.completion_tokens)
            # (the scoring prefill is the local prefill; an escalated step also paid for its draft)
            cost = self.prices.local_cost(st.elapsed()) if st.decision.route is Route.LOCAL else \
                cloud_cost + self.prices.local_cost(st.draft_s)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):  # the client went away mid-answer: book what was spent
                self.booker.cancelled(st, st.decision, self.model_name(st.decision.route))
            self.booker.release(st)
            raise
        booker = self.booker
        row_id = await booker.io(booker.answered, st, gen, cost, cloud_cost, attempts) if booker.remote else \
            booker.answered(st, gen, cost, cloud_cost, attempts)
        if st.learning is not None and st.decision.route is Route.LOCAL:
            self._maybe_audit(st, gen)
        return SubtaskResult(text=gen.text, route=st.decision.route, decision=st.decision, generation=gen,
                             cost_usd=cost, cloud_cost_usd=cloud_cost, step=st.step, ledger_id=row_id, draft=st.check,
                             samples=gens)

    def _start(self, req: StepRequest) -> StepRun:
        """The step in flight, with what the SLM is asked besides the text for a structured or
        logprobs step (the response format's grammar, logprobs) or the reason only the cloud can
        serve it."""
        st = StepRun(req, max_tokens=req.max_tokens or self.max_tokens, toolset=req.toolset,
                     learning=self.learning if req.trace else None, cloud_reason=req.cloud_reason)
        fmt, logprobs = req.response_format, req.logprobs
        native = fmt is not None and getattr(self.local, "structured_outputs", False)
        if native and (st.toolset is not None or req.samples > 1):
            st.cloud_reason = st.cloud_reason or "structured"  # the engine's grammar is for a lone answer
        elif native:
            st.engine_extra["response_format"] = fmt
        if logprobs is not None and getattr(self.local, "reports_logprobs", False):
            st.engine_extra["logprobs"] = logprobs
        if st.cloud_reason is None and fmt is not None and not native:
            # The SLM answers as a forced call whose arguments are the schema's instance (under the
            # tool-call grammar); a schema whose root is not an object, or tools offered as well: the cloud.
            answer_tools = answer_toolset(fmt) if st.toolset is None and req.samples == 1 else None
            if answer_tools is None:
                st.cloud_reason = "structured"
            else:
                st.toolset = answer_tools
        if st.cloud_reason is None and logprobs is not None and "logprobs" not in st.engine_extra:
            st.cloud_reason = "logprobs"  # the SLM does not report its tokens' log-probabilities
        return st

    async def _plan(self, st: StepRun) -> tuple[StepPlan, Score | None]:
        """The SLM prefill scores the step unless it goes to the cloud whatever P is (cloud-only,
        non-text content, a field only the cloud serves). A prompt the SLM cannot take (longer than
        its window, tools it cannot decode) is planned for the cloud."""
        req = st.req
        why_not_local = None if req.local_can_serve else "the request needs the cloud (non-text content)"
        if st.cloud_reason is not None:
            why_not_local = f"the request asks for {st.cloud_reason}, which only the cloud serves"
        score = None
        predictor = self._predictor
        # The step's kind is whether the agent offers tools (not a structured answer's call); one
        # familiarity lookup tells whether the step is familiar and, for a predictor shared by
        # workloads, whose operating point (kappa, draft stage) it takes.
        familiar, point = predictor.locate(req.messages, req.toolset is not None)
        if req.override is not Override.CLOUD_ONLY and why_not_local is None:
            kappa = predictor.kappa_of(point)
            try:
                fmt = req.response_format
                if fmt is None:
                    score = await self._score(req.messages, req.step, st.toolset, None, 0, kappa)
                else:
                    shaped = answer_toolset(fmt) if st.structured_on_slm else None
                    score = await self._score(req.messages, req.step, st.toolset, shaped, fmt.size, kappa)
            except CannotServeLocallyError as exc:  # too long for its window, tools it cannot decode
                why_not_local = str(exc)
        band = self.draft_band if self.draft_band is not None else predictor.draft_band_of(point)
        facts = StepFacts(
            step=req.step, p_local=score.p_local if score else None,
            threshold=(req.threshold if req.threshold is not None else score.threshold) if score else None,
            override=req.override, why_not_local=why_not_local,
            unfamiliar=req.override is Override.AUTO and why_not_local is None and self.unfamiliar != "trust" and
            not familiar,
            on_unfamiliar=self.unfamiliar, draft_band=band, vote=predictor.vote if self.vote == "auto" else None,
            fixed_threshold=req.threshold is not None, tools=st.toolset is not None or bool(st.engine_extra),
            samples=req.samples, agreement_k=self.agreement_k, agreement_min=self.agreement_min)
        return plan_step(facts), score

    async def _draft(self, st: StepRun) -> None:
        """A DRAFT or VOTE plan's decision, once its draft is checked (and voted on)."""
        try:
            st.draft, st.check, st.decision = await self.drafter.draft(st, self.predictor)
        except asyncio.CancelledError:
            self.booker.cancelled(st, st.plan.drafting, self.local.name)
            raise
        if st.decision.route is Route.CLOUD:
            st.draft_s = st.elapsed()

    async def _within_budget(self, st: StepRun) -> None:
        """A cloud step asks the budget for its price (held until booked): past a cap it moves to the
        SLM or is refused, as the budget's action says."""
        exceeded = await self.booker.io(self.booker.reserve, st)
        moved = after_budget(st.plan, st.decision, exceeded, self.budget.action)
        if moved is None:
            raise BudgetExceededError(budget_message(exceeded) + "; the step was refused "
                                      "(raise the cap, or set budget_action = 'local')")
        st.decision = moved

    def _refuse_invalid_structured(self, st: StepRun, gen: Generation) -> None:
        """A local structured answer that does not validate is never returned (a local-only step
        whose constrained answer failed): booked as failed and raised."""
        fmt = st.req.response_format
        if fmt is None or st.decision.route is not Route.LOCAL or gen.tool_calls:
            return
        why = fmt.validate(gen.text)
        if why is not None:
            exc = StructuredOutputError(f"the SLM's structured answer is not valid: {why}; "
                                        f"{'; '.join(gen.tool_errors)}".rstrip("; "))
            self.booker.failed(st, exc, gen.model, gen)
            raise exc

    # --- the answer on the route decided -----------------------------------------------------------
    async def _on_slm(self, st: StepRun, on_text) -> tuple[Generation, list[Generation]]:
        req = st.req
        if req.samples > 1:
            return await self.drafter.sampled(self.local, st)
        if req.sampling is not None and st.toolset is None and not st.engine_extra:  # one sampled answer, whole
            gen, _ = await self.drafter.sampled(self.local, st)
            if on_text is not None and gen.text:
                on_text(gen.text)
            return gen, []
        return await self.drafter.answer(st, on_text), []

    async def _answer_locally(self, st: StepRun, announce, cloud_open: bool = True):
        """The SLM's answer (a kept draft is the answer: no second decode): (answer, all samples).
        An invalid tool call in it is escalated (the answer is then None) or dropped, as
        `after_invalid_tool_call` decides; never escalated when `cloud_open` is False (the cloud
        call this answer stands in for has failed)."""
        on_text = st.req.on_text
        if st.req.samples > 1:
            return await self._on_slm(st, None)
        if st.draft is not None:
            gen = st.draft
        elif st.req.sampling is None:  # (the common case, without _on_slm's layer)
            gen = await self.drafter.answer(st, on_text)
        else:
            gen = (await self._on_slm(st, on_text))[0]
        if st.structured_on_slm and not gen.tool_errors:
            why = st.req.response_format.validate(gen.text)  # (cut by max_tokens; a keyword the grammar skips)
            if why is not None:  # escalated like an invalid tool call
                gen = dataclasses.replace(gen, tool_errors=[f"the structured answer is not valid: {why}"])
        if gen.tool_errors:  # the SLM's tool call is not valid: never returned as one
            closed = not cloud_open or (may_leave_device(st.plan) and self.budget is not None and
                                        await self.booker.io(self.booker.reserve, st) is not None)
            st.decision = after_invalid_tool_call(st.plan, st.decision, cloud_closed=closed)
            if st.decision.route is Route.CLOUD:
                st.draft_s, gen = st.elapsed(), None
        if announce is not None:
            await announce(st.decision)
        held = st.draft is not None or st.toolset is not None or st.structured_on_slm
        if gen is not None and held and on_text is not None and gen.text:
            on_text(gen.text)  # held back while it was decided
        return gen, []

    async def _answer_in_cloud(self, st: StepRun) -> tuple[Generation, list[Generation], list]:
        """The cloud's answer; if the call fails, the SLM's where `after_cloud_failure` allows it."""
        req = st.req
        extra = dict(req.cloud_extra) if req.cloud_extra else {}
        if req.response_format is not None:
            extra["response_format"] = req.response_format.request_field()
        kwargs: dict[str, Any] = {"extra": extra} if extra else {}
        if st.toolset is not None and not is_answer_toolset(st.toolset):  # (the SLM's way to a structured answer)
            kwargs["toolset"] = st.toolset
        streamed: list[str] = []
        on_text = req.on_text
        # A structured answer is held back until it has validated: the client never sees one that did not.
        relay = None if on_text is None or req.response_format is not None else \
            (lambda d: (streamed.append(d), on_text(d)))
        shadow = self._start_shadow(st) if st.learning is not None else None
        try:
            if req.samples > 1:
                gen, gens = await self.drafter.sampled(self.cloud, st)
            else:
                gen, gens = await self.cloud.generate(st.messages, max_tokens=st.max_tokens, stop=req.stop,
                                                      on_text=relay, **kwargs), []
        except CloudError as exc:
            if shadow is not None:
                shadow.cancel()  # no cloud answer to compare it with
            fallback = after_cloud_failure(st.plan, st.decision, fallback=self.fallback, streamed=bool(streamed),
                                           request_error=isinstance(exc, CloudRequestError))
            self.booker.failed(st, exc, self.cloud.name)
            if fallback is None:
                raise
            st.decision = fallback
            with self._client_on_slm():
                gen, gens = await self._answer_locally(st, None, cloud_open=False)
            return gen, gens, []
        except BaseException:
            if shadow is not None:
                shadow.cancel()
            raise
        if req.response_format is not None or req.logprobs is not None:
            gen = await self._checked_cloud_answer(st, gen, kwargs)
        if shadow is not None:
            st.learning.finish_shadow(shadow, st, version=self.predictor_version, cloud=gen)
        return gen, gens, gen.extra.get("attempts", [])

    async def _checked_cloud_answer(self, st: StepRun, gen: Generation, kwargs: dict[str, Any]) -> Generation:
        """The cloud's answer checked against what was asked for: logprobs missing is a CloudError; a
        structured answer that does not validate is asked for once more (its tokens booked with the
        first's), then a StructuredOutputError (booked as a failed call) that says why."""
        req = st.req
        if req.logprobs is not None and not gen.extra.get("logprobs"):  # asking again would not bring them
            exc = CloudError("the cloud answered without the logprobs that were asked for (its API may not "
                             "offer them); send logprobs only to a cloud that does", gen.extra.get("attempts", []))
            self.booker.failed(st, exc, self.cloud.name)
            raise exc
        fmt = req.response_format
        why = fmt.validate(gen.text) if fmt is not None and not gen.tool_calls else None
        if why is not None:  # (an answer that calls tools is not held to the format)
            try:
                again = await self.cloud.generate(st.messages, max_tokens=st.max_tokens, stop=req.stop, **kwargs)
            except CloudError as exc:
                self.booker.failed(st, exc, self.cloud.name)
                raise
            again.extra["attempts"] = gen.extra.get("attempts", []) + again.extra.get("attempts", [])
            again.prompt_tokens += gen.prompt_tokens
            again.completion_tokens += gen.completion_tokens
            again.latency_s += gen.latency_s
            gen, first_why = again, why
            why = fmt.validate(gen.text) if not gen.tool_calls else None
            if why is not None:
                exc = StructuredOutputError(f"the cloud's answer is not what the request asked for, twice: "
                                            f"{first_why}; then {why}", gen.extra["attempts"])
                self.booker.failed(st, exc, self.cloud.name)
                raise exc
        if req.on_text is not None and fmt is not None and gen.text:
            req.on_text(gen.text)  # held back until it validated
        return gen

    # --- learning from served traffic (hera_core.routing.shadow) ------------------------------------
    def _client_on_slm(self):
        """Around a client step's use of the SLM: running shadow drafts give way to it."""
        return self.learning.client_on_slm() if self.learning is not None else _NOTHING

    def _start_shadow(self, st: StepRun) -> "asyncio.Future | None":
        """The SLM's draft of a cloud-routed step, for the trace store: started now beside the cloud
        call when the device is idle; an escalated step's own draft is used as it is. None: not
        traced (learning off for it, not scored, n > 1, or a step that may not leave the device)."""
        if st.learning is None or st.features is None or st.req.samples > 1 or not may_leave_device(st.plan):
            return None
        if st.draft is not None:  # drafted, checked and escalated: the pair is already half made
            done = asyncio.get_running_loop().create_future()
            done.set_result(st.draft)
            return done
        return st.learning.start_shadow(st.messages, max_tokens=st.max_tokens, stop=st.req.stop, toolset=st.toolset)

    def _maybe_audit(self, st: StepRun, gen: Generation) -> None:
        """A step the predictor kept local is, with the audit share, also sent to the cloud (after the
        client has its answer) to measure live agreement; never a step that may not leave the
        device, nor one the SLM took for want of the cloud (a budget, a failure)."""
        if st.features is None or st.req.samples > 1 or not st.plan.facts.automatic or gen.tool_errors or \
                st.decision.reason.startswith(("budget", "fallback", "tool-call-dropped")):
            return
        if self.budget is not None and self.budget.exceeded(st.session) is not None:
            return
        st.learning.maybe_audit(st, version=self.predictor_version, local=gen,
                                toolset=None if is_answer_toolset(st.toolset) else st.toolset)

    def book_learning(self, kind: str, session: str, step: int, gen: Generation, latency_s: float,
                      version: str | None = None) -> None:
        """The ledger row of a learning-loop call (`Booker.learning_call`)."""
        self.booker.learning_call(kind, session, step, gen, latency_s, version)

    # --- requests that bypass routing ------------------------------------------------------------
    async def passthrough(self, payload: dict[str, Any], *, session: str, step: int = 0,
                          run: str | None = None) -> tuple[dict[str, Any], float]:
        """A request for a model other than HERA's, forwarded to the cloud as it is; checked against
        the budget, booked and budgeted like any cloud step. Returns (response JSON, cost USD)."""
        self.booker.check_passthrough(session)
        t0 = time.perf_counter()
        model = str(payload.get("model", self.cloud.name))
        try:
            data, attempts = await self.cloud.forward(payload)
        except CloudError as exc:
            self.booker.passthrough((run, session, step), model, {}, time.perf_counter() - t0, exc.attempts,
                                    status=type(exc).__name__)
            raise
        cost = self.booker.passthrough((run, session, step), model, data.get("usage") or {},
                                       time.perf_counter() - t0, attempts)
        return data, cost

    async def passthrough_stream(self, payload: dict[str, Any], *, session: str, step: int = 0,
                                 run: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """`passthrough`, streamed: yields the upstream's chunks; booked once the stream ends (as
        'cancelled' if the consumer stops early)."""
        self.booker.check_passthrough(session)
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
            self.booker.passthrough((run, session, step), model, usage, time.perf_counter() - t0, status=status)

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
