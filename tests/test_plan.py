"""The step plan (`hera_core.routing.plan`): what each branch promises, and that the runtime and the
evaluator, each from its own inputs, reach the same plan and the same decision after a draft."""

import asyncio
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hera_core.backends.base import Generation, Prefill
from hera_core.backends.caching import CompletionCache
from hera_core.backends.tools import ToolSet
from hera_core.checks.drafts import Agreement
from hera_core.config import load_settings
from hera_core.errors import CloudError, InvalidRequestError
from hera_core.native.features import LOGIT_FEATURE_NAMES, logit_features
from hera_core.offline.evaluation import Evaluator, Hera, HeraNoVote, HeraPrefill
from hera_core.routing.plan import (Action, DraftOutcome, StepFacts, after_budget, after_cloud_failure,
                                    after_invalid_tool_call, decide_after_draft, needs_score, plan_step,
                                    samples_wanted, vote_key_wanted)
from hera_core.routing.ledger import Ledger
from hera_core.routing.policy import Override, Route
from hera_core.routing.predictor import CostWeight, Kappa, Predictor, VoteStage, Workload, feature_matrix
from hera_core.routing.runtime import Runtime
from hera_core.routing.step import StepRequest

VOTE = VoteStage(steps=1, k=4, min_share=0.5)


def facts(**kw) -> StepFacts:
    """A scored, familiar step 1 with P just above its threshold, unless told otherwise."""
    return StepFacts(**{"step": 1, "p_local": 0.8, "threshold": 0.7, **kw})


def agreeing(share: float) -> Agreement:
    return Agreement(share=share, majority=0, majority_share=share, samples=4)


# --- plan_step, branch by branch ---------------------------------------------------------------
def test_the_predictor_decides_a_familiar_step_outside_the_band():
    assert plan_step(facts(p_local=0.7)).decision.route is Route.LOCAL  # P == threshold stays local
    low = plan_step(facts(p_local=0.69))
    assert (low.action, low.decision.reason, low.decision.p_local, low.decision.threshold) == \
        (Action.CLOUD, "predictor", 0.69, 0.7)
    wide = plan_step(facts(p_local=0.9, draft_band=0.2))  # |P - threshold| = 0.2: not inside the band
    assert wide.action is Action.LOCAL


def test_overrides_and_a_step_the_slm_cannot_answer_need_no_score():
    for f, route, reason in ((StepFacts(step=0, override=Override.CLOUD_ONLY), Route.CLOUD, "cloud-only"),
                             (StepFacts(step=0, override=Override.LOCAL_ONLY), Route.LOCAL, "local-only"),
                             (StepFacts(step=0, why_not_local="too long"), Route.CLOUD, "cannot-serve-locally")):
        assert not needs_score(f)
        assert (plan_step(f).decision.route, plan_step(f).reason) == (route, reason)
    # confidential data never leaves the device, whatever the predictor, the band or the vote stage say
    assert plan_step(facts(p_local=0.0, override=Override.LOCAL_ONLY, draft_band=1.0, vote=VOTE, step=0,
                           unfamiliar=True)).decision.route is Route.LOCAL
    with pytest.raises(InvalidRequestError, match="local-only"):
        plan_step(StepFacts(step=0, override=Override.LOCAL_ONLY, why_not_local="too long"))


def test_an_unfamiliar_step_follows_the_unfamiliar_policy():
    cloud = facts(p_local=0.99, unfamiliar=True, on_unfamiliar="cloud", vote=VOTE, step=0)
    assert not needs_score(dataclasses.replace(cloud, p_local=None, threshold=None))
    assert (plan_step(cloud).action, plan_step(cloud).reason) == (Action.CLOUD, "unfamiliar")
    draft = plan_step(facts(unfamiliar=True, on_unfamiliar="draft", vote=VOTE, step=0))
    assert (draft.action, draft.checks_only, draft.votes_k) == (Action.DRAFT, True, 0)  # not the vote stage
    # the checks decide, whatever the draft stage would say
    assert decide_after_draft(draft, DraftOutcome(passed=True, stage_keep=False)).route is Route.LOCAL
    assert decide_after_draft(draft, DraftOutcome(passed=False, stage_keep=True)).route is Route.CLOUD
    trusted = plan_step(facts(p_local=0.5, unfamiliar=True, on_unfamiliar="trust"))
    assert (trusted.action, trusted.reason) == (Action.CLOUD, "predictor")
    # n > 1 is never drafted: the predictor decides it even where the policy would draft
    many = plan_step(facts(unfamiliar=True, on_unfamiliar="draft", samples=3))
    assert needs_score(many.facts) and (many.action, many.reason) == (Action.LOCAL, "predictor")


def test_the_vote_stage_decides_its_steps_unless_tools_or_a_caller_threshold():
    first = plan_step(facts(step=0, p_local=0.99, vote=VOTE))
    assert (first.action, first.votes_k, first.min_share) == (Action.VOTE, 4, 0.5)
    assert plan_step(facts(step=0, p_local=0.75, vote=VOTE, draft_band=0.2)).action is Action.VOTE  # over the band
    assert plan_step(facts(step=1, vote=VOTE)).action is Action.LOCAL  # past stage.steps: the predictor
    assert plan_step(facts(step=0, vote=VOTE, tools=True)).action is Action.LOCAL
    assert plan_step(facts(step=0, vote=VOTE, fixed_threshold=True)).action is Action.LOCAL
    assert plan_step(facts(step=0, vote=VOTE, samples=2)).action is Action.LOCAL


def test_a_step_within_the_band_is_drafted_and_its_stage_decides():
    plan = plan_step(facts(p_local=0.75, draft_band=0.1))
    assert (plan.action, plan.reason, plan.draft_stage_decides) == (Action.DRAFT, "uncertain", True)
    assert decide_after_draft(plan, DraftOutcome(passed=False, stage_keep=True)) == \
        dataclasses.replace(plan.drafting, reason="draft-kept")
    escalated = decide_after_draft(plan, DraftOutcome(passed=True, stage_keep=False))
    assert (escalated.route, escalated.reason, escalated.p_local) == (Route.CLOUD, "escalated", 0.75)
    with pytest.raises(ValueError, match="stage_keep"):
        decide_after_draft(plan, DraftOutcome(passed=True))


def test_a_plan_that_reads_the_score_refuses_to_be_made_without_one():
    with pytest.raises(ValueError, match="score"):
        plan_step(StepFacts(step=0))
    with pytest.raises(ValueError):
        StepFacts(step=0, p_local=0.5)  # a P without its threshold
    with pytest.raises(ValueError):
        StepFacts(step=0, on_unfamiliar="sometimes")


# --- after the draft ---------------------------------------------------------------------------
def test_a_vote_plan_escalates_a_failed_draft_without_samples():
    plan = plan_step(facts(step=0, vote=VOTE))
    failed = DraftOutcome(passed=False)
    assert not vote_key_wanted(plan, failed) and samples_wanted(plan, failed) == 0
    assert decide_after_draft(plan, failed).route is Route.CLOUD


def test_a_vote_plan_keeps_a_passed_draft_when_enough_samples_agree():
    plan = plan_step(facts(step=0, vote=VOTE))
    passed = DraftOutcome(passed=True)
    assert vote_key_wanted(plan, passed)
    with pytest.raises(ValueError, match="votable"):
        samples_wanted(plan, passed)
    votable = dataclasses.replace(passed, votable=True)
    assert samples_wanted(plan, votable) == 4
    assert decide_after_draft(plan, dataclasses.replace(votable, agreement=agreeing(0.5))).route is Route.LOCAL
    assert decide_after_draft(plan, dataclasses.replace(votable, agreement=agreeing(0.25))).route is Route.CLOUD


@pytest.mark.parametrize("p_local, route", [(0.8, Route.LOCAL), (0.6, Route.CLOUD)])
def test_a_vote_plan_leaves_free_text_and_missing_samples_to_the_prefill(p_local, route):
    plan = plan_step(facts(step=0, vote=VOTE, p_local=p_local))
    free_text = DraftOutcome(passed=True, votable=False)
    assert samples_wanted(plan, free_text) == 0
    assert decide_after_draft(plan, free_text).route is route
    no_samples = DraftOutcome(passed=True, votable=True, agreement=None)  # the engine could not sample
    assert decide_after_draft(plan, no_samples).route is route


def test_samples_vote_on_a_drafted_step_whatever_its_checks_said():
    plan = plan_step(facts(p_local=0.75, draft_band=0.1, agreement_k=3, agreement_min=0.6))
    assert samples_wanted(plan, DraftOutcome(passed=False, stage_keep=False)) == 3
    kept = DraftOutcome(passed=True, stage_keep=True, agreement=agreeing(2 / 3))
    assert decide_after_draft(plan, kept).route is Route.LOCAL
    assert decide_after_draft(plan, dataclasses.replace(kept, agreement=agreeing(1 / 3))).route is Route.CLOUD
    assert decide_after_draft(plan, dataclasses.replace(kept, agreement=None)).route is Route.LOCAL  # no samples
    assert decide_after_draft(plan, dataclasses.replace(kept, stage_keep=False)).route is Route.CLOUD


def test_with_tools_a_valid_call_is_kept_and_an_invalid_one_never():
    plan = plan_step(facts(p_local=0.75, draft_band=0.1, tools=True, agreement_k=3))
    assert samples_wanted(plan, DraftOutcome(passed=True, stage_keep=True)) == 0  # tool steps are not voted on
    assert decide_after_draft(plan, DraftOutcome(passed=False, stage_keep=False, tool_calls=True)).route is Route.LOCAL
    assert decide_after_draft(plan, DraftOutcome(passed=True, stage_keep=True, tool_errors=True)).route is Route.CLOUD
    assert decide_after_draft(plan, DraftOutcome(passed=True, stage_keep=True)).route is Route.LOCAL  # plain text


def test_a_plan_decided_up_front_has_no_draft_to_decide_on():
    with pytest.raises(ValueError):
        decide_after_draft(plan_step(facts()), DraftOutcome(passed=True))
    with pytest.raises(ValueError):
        plan_step(facts(p_local=0.75, draft_band=0.1)).decision  # noqa: B018 - decided after its draft


# --- after the route ---------------------------------------------------------------------------
def test_a_spent_budget_moves_a_cloud_step_to_the_slm_or_refuses_it():
    plan = plan_step(facts(p_local=0.1))
    assert after_budget(plan, plan.decision, None, "local") == plan.decision
    moved = after_budget(plan, plan.decision, "daily", "local")
    assert (moved.route, moved.reason, moved.p_local) == (Route.LOCAL, "budget-daily", 0.1)
    assert after_budget(plan, plan.decision, "session", "refuse") is None
    cannot = plan_step(StepFacts(step=0, why_not_local="images"))
    assert after_budget(cannot, cannot.decision, "daily", "local") is None  # the SLM cannot take it
    local = plan_step(facts())
    assert after_budget(local, local.decision, "daily", "refuse") == local.decision  # a local step spends nothing


def test_an_invalid_tool_call_is_escalated_only_where_the_step_may_leave():
    plan = plan_step(facts(tools=True))
    assert after_invalid_tool_call(plan, plan.decision, cloud_closed=False).reason == "invalid-tool-call"
    assert after_invalid_tool_call(plan, plan.decision, cloud_closed=True).reason == "tool-call-dropped"
    confidential = plan_step(facts(tools=True, override=Override.LOCAL_ONLY))
    dropped = after_invalid_tool_call(confidential, confidential.decision, cloud_closed=False)
    assert (dropped.route, dropped.reason) == (Route.LOCAL, "tool-call-dropped")


def test_a_failed_cloud_call_falls_back_to_the_slm_only_where_allowed():
    plan = plan_step(facts(p_local=0.1))
    ok = dict(fallback="local", streamed=False, request_error=False)
    assert after_cloud_failure(plan, plan.decision, **ok).reason == "fallback-local"
    for change in ({"fallback": "fail"}, {"streamed": True}, {"request_error": True}):
        assert after_cloud_failure(plan, plan.decision, **{**ok, **change}) is None
    forced = plan_step(StepFacts(step=0, override=Override.CLOUD_ONLY))
    assert after_cloud_failure(forced, forced.decision, **ok) is None
    cannot = plan_step(StepFacts(step=0, why_not_local="images"))
    assert after_cloud_failure(cannot, cannot.decision, **ok) is None


# --- the runtime and the evaluator agree -------------------------------------------------------
PROMPT_TOKENS = 120
PROMPTS = ("What is 6 times 7? Reply as: ANSWER: <number>",
           "Which option is right, A or B? Reply with only the letter, as: ANSWER: <letter>",
           "Say something about the number 42.")
TEXTS = ("ANSWER: 42", "ANSWER: 41", "ANSWER: B", "I think it is 42, probably.", "")
TOOLS = ToolSet.parse([{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}])
METHOD_SETTINGS = {  # each evaluated HERA, and the runtime settings it stands for
    Hera: {"vote": "auto"}, HeraNoVote: {"vote": "off"},
    HeraPrefill: {"vote": "off", "draft_band": 0.0, "unfamiliar": "trust"}}


class _Familiarity:
    families = ["f"]  # one training family (a workload's, where the predictor has one)

    def __init__(self, familiar: bool) -> None:
        self.is_familiar = familiar

    def familiar(self, messages, tools=False) -> bool:
        return self.is_familiar

    def nearest(self, messages, tools=False) -> int | None:
        return 0 if self.is_familiar else None


class _Stage:
    def __init__(self, band: float) -> None:
        self.band = band


@dataclasses.dataclass
class _Predictor(Predictor):
    """A predictor with a chosen P and draft-stage verdict (its workloads' lookups are the real ones)."""

    p: float = 0.0
    stage_keep: bool = False

    def predict(self, X):
        return np.full(len(X), self.p, dtype=np.float32)

    def score_logits(self, rows, structure):
        X = feature_matrix(np.concatenate([logit_features(r.reshape(1, -1)) for r in rows]), structure)
        return self.predict(X), X

    def keep_draft(self, prefill_row, check, messages=None, tools=False):
        assert prefill_row is not None and prefill_row.shape[0] == 1
        return self.stage_keep, None


class _SLM:
    """An SLM whose draft and samples are chosen: samples are handed out in order, so the runtime's
    staged draws (2, then the rest) and the evaluator's single draw see the same answers."""

    name = "slm"
    is_local = True

    def __init__(self, draft: Generation, samples: list[str]) -> None:
        self.draft, self.samples = draft, list(samples)

    async def prefill(self, messages, **kwargs):
        return Prefill(logits=np.linspace(-2, 2, 64, dtype=np.float32), prompt_tokens=PROMPT_TOKENS, cached_tokens=0,
                       latency_s=0.0)

    async def generate(self, messages, **kwargs):
        return self.draft

    async def generate_samples(self, messages, n, **kwargs):
        taken, self.samples = self.samples[:n], self.samples[n:]
        return [Generation(text=t, prompt_tokens=PROMPT_TOKENS, completion_tokens=4, latency_s=0.1, ttft_s=0.1,
                           finish_reason="stop") for t in taken]


steps = st.fixed_dictionaries({
    "method": st.sampled_from((Hera, Hera, HeraNoVote, HeraPrefill)),
    "unfamiliar_policy": st.sampled_from(("cloud", "draft", "trust")),
    "step": st.sampled_from((0, 0, 1, 2)),
    "p": st.one_of(st.floats(0.0, 1.0, width=32), st.sampled_from((0.6, 0.65, 0.7, 0.75, 0.9))),  # near kappa too
    "base": st.one_of(st.floats(0.3, 0.95), st.sampled_from((0.6, 0.7))),
    "gamma": st.sampled_from((0.0, 1.5)),
    "offset": st.sampled_from((0.0, -0.05, 0.1)),
    "familiar": st.sampled_from((True, False, None)),  # None: the predictor has no familiarity check
    "band": st.sampled_from((None, 0.0, 0.05, 0.3)),  # None: no draft stage
    # a predictor shared by workloads: the familiar step's workload has its own kappa base and draft
    # band (None: no stage of its own); None: no workloads
    "workload": st.one_of(st.none(), st.tuples(st.floats(0.3, 0.95), st.sampled_from((None, 0.0, 0.3)))),
    "vote": st.sampled_from((None, VoteStage(1, 2, 0.5), VoteStage(2, 4, 1.0), VoteStage(2, 4, 0.5))),
    "tools": st.booleans(),
    "stage_keep": st.booleans(),
    "prompt": st.sampled_from(PROMPTS),
    "draft": st.sampled_from(TEXTS),
    "samples": st.one_of(st.lists(st.sampled_from(TEXTS), min_size=8, max_size=8), st.none()),  # None: the draft
    "tool_calls": st.booleans(),
    "tool_errors": st.booleans(),
})


def _predictor(s) -> _Predictor:
    cost = CostWeight(s["gamma"], (40.0, 10.0), 100.0, 20.0) if s["gamma"] else None
    workloads = ()
    if s.get("workload") is not None and s["familiar"] is not None:  # (chosen by the familiarity check)
        base, band = s["workload"]
        workloads = (Workload("w", ("f",), Kappa(base, 0.01, 3, cost), None if band is None else _Stage(band)),)
    return _Predictor(b"{}", Kappa(s["base"], 0.02, 5, cost), familiarity=None if s["familiar"] is None else
                      _Familiarity(s["familiar"]), draft=None if s["band"] is None else _Stage(s["band"]),
                      vote=s["vote"], workloads=workloads, p=float(np.float32(s["p"])), stage_keep=s["stage_keep"])


def _draft(s) -> Generation:
    tools = s["tools"]
    return Generation(text=s["draft"], prompt_tokens=PROMPT_TOKENS, completion_tokens=4, latency_s=0.2, ttft_s=0.1,
                      finish_reason="stop", extra={"token_logprobs": [-0.1, -0.5, -0.2, -0.3]},
                      tool_calls=[{"id": "c", "type": "function", "function": {"name": "add", "arguments": "{}"}}]
                      if tools and s["tool_calls"] else [], tool_errors=["bad"] if tools and s["tool_errors"] else [])


def _slm(s) -> _SLM:
    return _SLM(_draft(s), [s["draft"]] * 8 if s["samples"] is None else s["samples"])


class _Cloud:
    name = "cloud"
    is_local = False

    async def generate(self, messages, **kwargs):
        return Generation(text="ANSWER: 42", prompt_tokens=PROMPT_TOKENS, completion_tokens=4, latency_s=0.3,
                          ttft_s=0.1, finish_reason="stop", model="cloud")


def _route(decision) -> str:
    """A runtime decision as the evaluator names its routes."""
    if decision.route is Route.LOCAL:
        return "local"
    return "escalated" if decision.reason in ("escalated", "invalid-tool-call") else "cloud"


async def _runtime_side(s, messages, toolset, tmp: Path):
    """The runtime's plan (`Runtime.plan`), and the decision `Runtime.complete` takes and books."""
    prices = load_settings(env={}).prices
    kwargs = {"threshold_offset": s["offset"], "unfamiliar": s["unfamiliar_policy"], **METHOD_SETTINGS[s["method"]]}
    plan, _ = await Runtime(_slm(s), _Cloud(), _predictor(s), None, prices, **kwargs).plan(
        StepRequest(messages, "s", step=s["step"], toolset=toolset))
    ledger = Ledger(tmp / "ledger.sqlite")
    try:
        rt = Runtime(_slm(s), _Cloud(), _predictor(s), ledger, prices, **kwargs)  # its own draft and samples
        result = await rt.complete(messages, session="s", step=s["step"], toolset=toolset, max_tokens=64)
    finally:
        ledger.close()
    return plan, result.decision, _route(result.decision)


async def _evaluator_side(s, messages, toolset, cache):
    """The evaluator's plan (`Hera.plan`), its decision (`Evaluator.after_draft` for a drafted
    step) and the route it books (`Hera.route_step`)."""
    method = s["method"](s["offset"]) if s["method"] is HeraPrefill else \
        s["method"](s["offset"], s["unfamiliar_policy"])
    slm = _slm(s)
    ev = Evaluator(slm, None, _predictor(s), cache, load_settings(env={}).prices, slm.name)
    plan, row = await method.plan(s["step"], messages, ev, toolset)
    drafted = plan.action in (Action.DRAFT, Action.VOTE)
    decision = await ev.after_draft(plan, messages, row, toolset) if drafted else plan.decision
    return plan, decision, await method.route_step(s["step"], messages, ev, toolset)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=steps)
def test_the_runtime_and_the_evaluator_plan_and_decide_a_step_alike(s):
    """Over generated steps (score, place, settings, the predictor's stages, tools, draft, samples):
    the runtime (`Runtime.plan` from its SLM prefill, then `Runtime.complete`) and the evaluator
    (`Hera.plan` from its feature cache, `Evaluator.after_draft`, `Hera.route_step`) make the same
    plan, take the same decision and route the step alike."""
    if s["method"] is HeraPrefill:
        s = {**s, "unfamiliar_policy": "trust"}
    messages = [{"role": "user", "content": s["prompt"]}] + \
        [m for k in range(s["step"]) for m in ({"role": "assistant", "content": f"step {k}"},
                                               {"role": "user", "content": "go on"})]
    toolset = TOOLS if s["tools"] else None
    with tempfile.TemporaryDirectory() as tmp:
        cache = CompletionCache(Path(tmp) / "cache.sqlite")
        try:
            # the evaluator's feature cache holds what the runtime's prefill yields
            logits = [0.5] * len(LOGIT_FEATURE_NAMES)  # unused by the stub predictor, whose P is s["p"]
            cache.put_features("slm", messages, {"logit": logits, "prompt_tokens": PROMPT_TOKENS})
            ours = asyncio.run(_runtime_side(s, messages, toolset, Path(tmp)))
            theirs = asyncio.run(_evaluator_side(s, messages, toolset, cache))
        finally:
            cache.close()
    event(f"{ours[0].action.value}: {ours[1].reason}")
    # The runtime scores every step it could answer locally; the evaluator only those whose plan
    # reads the score (its feature cache holds no other): the rest agree on everything else.
    assert _unscored(ours[0]) == _unscored(theirs[0])
    if ours[1].reason != "invalid-tool-call":  # decided after the answer: the route says it
        assert _unscored(ours[1], ours[0]) == _unscored(theirs[1], theirs[0])
    assert ours[2] == theirs[2]


def _unscored(x, plan=None):
    """A plan, or a plan's decision, without the score where the plan does not read it."""
    facts = (plan or x).facts
    if needs_score(facts):
        return x
    if plan is None:
        return dataclasses.replace(x, facts=dataclasses.replace(facts, p_local=None, threshold=None))
    return dataclasses.replace(x, p_local=None, threshold=None)


# --- the runtime's request and the fallback's local path ------------------------------------------
class _FailingCloud(_Cloud):
    """A cloud whose every call fails (fault injection), counting them."""

    def __init__(self) -> None:
        self.calls = 0

    async def generate(self, messages, **kwargs):
        self.calls += 1
        raise CloudError("the cloud is down", [("ConnectionRefusedError", 0.0)])


class _CountingSLM(_SLM):
    def __init__(self, draft: Generation) -> None:
        super().__init__(draft, [])
        self.decodes = 0

    async def generate(self, messages, **kwargs):
        self.decodes += 1
        return self.draft


def _fallback_case(tmp_path, *, tool_errors: bool, band: float | None):
    """A step routed to a failing cloud, with tools offered unless it is drafted (band): (the result,
    the SLM's decodes, the cloud's calls, ledger rows)."""
    s = {"tools": band is None, "tool_calls": True, "tool_errors": tool_errors, "draft": "ANSWER: 42", "p": 0.5,
         "base": 0.6, "gamma": 0.0, "familiar": None, "band": band, "vote": None, "stage_keep": False}
    slm, cloud = _CountingSLM(_draft(s)), _FailingCloud()
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        rt = Runtime(slm, cloud, _predictor(s), ledger, load_settings(env={}).prices, unfamiliar="trust", vote="off")
        result = asyncio.run(rt.complete([{"role": "user", "content": PROMPTS[0]}], session="f", step=1,
                                         toolset=TOOLS if s["tools"] else None))
        rows = ledger.rows("default")
    finally:
        ledger.close()
    return result, slm.decodes, cloud.calls, rows


def test_a_failed_cloud_call_is_answered_by_the_local_path(tmp_path):
    """The fallback shares the local path: an invalid tool call in the SLM's answer is dropped (the
    cloud it would escalate to has just failed: asked once, not again), and a drafted step whose
    draft was escalated answers with that draft, not a second decode. Both calls are booked."""
    result, decodes, calls, rows = _fallback_case(tmp_path, tool_errors=True, band=None)
    assert (result.route, result.decision.reason) == (Route.LOCAL, "tool-call-dropped")
    assert not result.generation.tool_calls or result.generation.tool_errors  # never returned as a valid call
    assert (decodes, calls) == (1, 1)
    assert [r["status"] for r in rows] == ["CloudError", "ok"] and rows[1]["route"] == "local"

    # |0.5 - 0.6| < 0.3: drafted; the stage rejects it (stage_keep False): escalated; the cloud fails
    result, decodes, calls, rows = _fallback_case(tmp_path / "drafted", tool_errors=False, band=0.3)
    assert (result.route, result.decision.reason) == (Route.LOCAL, "fallback-local")
    assert result.text == "ANSWER: 42" and (decodes, calls) == (1, 1)


def test_a_step_request_refuses_what_it_does_not_know():
    prices = load_settings(env={}).prices
    s = {"p": 0.5, "base": 0.6, "gamma": 0.0, "familiar": None, "band": None, "vote": None, "stage_keep": False}
    rt = Runtime(_SLM(_draft({**s, "tools": False, "draft": "x"}), []), _Cloud(), _predictor(s), None, prices)
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    with pytest.raises(TypeError, match="max_token"):  # a misspelt option is an error, never dropped
        asyncio.run(rt.complete(msgs, session="x", max_token=5))
    with pytest.raises(InvalidRequestError, match="n > 1"):
        StepRequest(msgs, "x", samples=2, on_text=print)
    with pytest.raises(TypeError, match="threshold_ofset"):
        Runtime(_SLM(None, []), _Cloud(), _predictor(s), None, prices, threshold_ofset=0.1)
    with pytest.raises(ValueError, match="agreement_k"):  # bounds checked by the policy's settings
        Runtime(_SLM(None, []), _Cloud(), _predictor(s), None, prices, agreement_k=99)
    rt = Runtime(_SLM(None, []), _Cloud(), _predictor(s), None, prices,
                 policy=load_settings(env={}).policy.model_copy(update={"unfamiliar": "trust"}), vote="off")
    assert (rt.unfamiliar, rt.vote, rt.max_tokens, rt.run) == ("trust", "off", 512, "default")
    assert StepRequest(msgs + [{"role": "assistant", "content": "a"}], "x").step == 1
