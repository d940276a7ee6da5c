"""The step plan: one pure decision for one agent step, made the same way by the runtime, which
executes it (`Runtime.complete`), and by the evaluator, which replays it over traced steps
(`hera_core.offline.evaluation.Hera`), so that what `hera eval` measures is what ships.

    facts = StepFacts(step=1, p_local=0.82, threshold=0.78, draft_band=0.1)
    plan = plan_step(facts)            # Action.DRAFT: |P - threshold| < the band
    ...  the SLM drafts; the draft is checked (and voted on, for a vote plan) ...
    decision = decide_after_draft(plan, DraftOutcome(passed=True, stage_keep=False))  # CLOUD, "escalated"

What is known before anything is generated is a `StepFacts` (the predictor's score, the step's
place, the settings, the predictor's stages); `plan_step` turns it into a `StepPlan`: answer
locally, answer in the cloud, draft and check, or draft, check and vote, each with its reason.
A drafted step continues with `decide_after_draft` once the draft's checks (and its samples'
vote) are known; `samples_wanted` and `vote_key_wanted` say which of those the executor must
produce. What happens after a route is taken (a spent budget, an invalid tool call, a failed cloud
call) is decided here too: `after_budget`, `after_invalid_tool_call`, `after_cloud_failure`.

Nothing here runs a model, reads a clock or touches the ledger: every function is a function of
its arguments (the tests drive them over generated inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from hera_core.checks.drafts import Agreement
from hera_core.errors import InvalidRequestError
from hera_core.routing.policy import Decision, Override, Route, decide
from hera_core.routing.predictor import VoteStage

UNFAMILIAR_POLICIES = ("cloud", "draft", "trust")  # policy.unfamiliar


class Action(str, Enum):
    LOCAL = "local"  # the SLM answers (decoding on from the prefill that scored the step)
    CLOUD = "cloud"  # the cloud answers
    DRAFT = "draft"  # the SLM drafts; its checks (or the predictor's draft stage) keep it or escalate
    VOTE = "vote"  # the SLM drafts; its checks and its samples' vote keep it or escalate


# StepFacts and StepPlan are values: nothing changes one after it is made (dataclasses.replace makes a
# changed copy). They are not frozen because a frozen dataclass's __init__ costs about 1 us more a
# step on the live path (one object.__setattr__ a field).
@dataclass(slots=True)
class StepFacts:
    """What is known about a step before anything is generated for it."""

    step: int  # the step's place in its session (assistant turns so far)
    p_local: float | None = None  # the predictor's P(the SLM's output is good enough); None: not scored
    threshold: float | None = None  # what P is compared with: kappa(step) (cost-weighted), offsets applied
    override: Override = Override.AUTO  # the request's policy (local-only: confidential, never leaves)
    why_not_local: str | None = None  # why the SLM cannot answer it (too long, images, tools); None: it can
    unfamiliar: bool = False  # the familiarity check finds the step unlike the predictor's training tasks
    on_unfamiliar: str = "cloud"  # policy.unfamiliar: "cloud", "draft" (the checks alone decide), "trust"
    draft_band: float = 0.0  # |P - threshold| below this: drafted, checked, kept or escalated (0: never)
    vote: VoteStage | None = None  # the predictor's vote stage, when the policy uses it (it decides step < steps)
    fixed_threshold: bool = False  # the caller set the threshold for this step (then no vote stage)
    tools: bool = False  # tools are offered at this step
    samples: int = 1  # completions asked for (OpenAI's n); n > 1 is never drafted
    agreement_k: int = 0  # samples that vote on a drafted step outside the vote stage (0: none)
    agreement_min: float = 0.5  # ... and the share of them that must agree with the draft to keep it

    def __post_init__(self) -> None:
        if self.on_unfamiliar not in UNFAMILIAR_POLICIES:
            raise ValueError(f"on_unfamiliar must be one of {UNFAMILIAR_POLICIES}, got {self.on_unfamiliar!r}")
        if (self.p_local is None) != (self.threshold is None):
            raise ValueError("a score is a P and a threshold together (or neither)")
        if self.samples < 1 or self.agreement_k < 0 or self.draft_band < 0:
            raise ValueError(f"need samples >= 1, agreement_k >= 0 and draft_band >= 0, got {self.samples}, "
                             f"{self.agreement_k}, {self.draft_band}")

    @property
    def automatic(self) -> bool:
        """The router decides (no override) and the SLM could answer."""
        return self.override is Override.AUTO and self.why_not_local is None

    @property
    def distrusted(self) -> bool:
        """Unfamiliar, and the policy does not trust the predictor there."""
        return self.automatic and self.unfamiliar and self.on_unfamiliar != "trust"


@dataclass(slots=True)
class StepPlan:
    """What to do with a step. For LOCAL and CLOUD, `decision` is final (until a budget, an invalid
    tool call or a cloud failure moves it); DRAFT and VOTE continue in `decide_after_draft`."""

    facts: StepFacts
    action: Action
    reason: str  # LOCAL/CLOUD: the decision's reason; DRAFT/VOTE: why the step is drafted
    checks_only: bool = False  # DRAFT: the draft's checks decide, not the predictor's draft stage
    votes_k: int = 0  # samples that vote on the draft (0: none)
    min_share: float = 0.5  # of them, the share that must agree with the draft to keep it

    @property
    def decision(self) -> Decision:
        """The route of a LOCAL or CLOUD plan."""
        route = _ROUTE_OF_ACTION.get(self.action)
        if route is None:
            raise ValueError(f"a {self.action.value} plan is decided after its draft (decide_after_draft)")
        return Decision(route, self.reason, self.facts.p_local, self.facts.threshold)

    @property
    def drafting(self) -> Decision:
        """The decision booked for a step cancelled while it was being drafted."""
        return self._decision(Route.LOCAL, "drafting")

    @property
    def prefill_keep(self) -> bool:
        """The prefill's own verdict: P >= threshold."""
        f = self.facts
        return f.p_local is not None and f.threshold is not None and f.p_local >= f.threshold

    @property
    def draft_stage_decides(self) -> bool:
        """The predictor's draft stage judges the draft (`DraftOutcome.stage_keep` is needed)."""
        return self.action is Action.DRAFT and not self.checks_only

    def _decision(self, route: Route, reason: str) -> Decision:
        return Decision(route, reason, self.facts.p_local, self.facts.threshold)


def needs_score(facts: StepFacts) -> bool:
    """Whether the plan of this step reads the predictor's score: not for a forced step, one the
    SLM cannot answer, or an unfamiliar one the policy sends to the cloud or to the checks (the
    evaluator scores only the steps that need it: its feature cache holds no other)."""
    if not facts.automatic:
        return False
    return not (facts.distrusted and (facts.on_unfamiliar == "cloud" or facts.samples == 1))


def plan_step(facts: StepFacts) -> StepPlan:
    """The plan of one step, in this order: the request's override; a step the SLM cannot answer
    goes to the cloud; an unfamiliar step follows policy.unfamiliar (cloud, or a draft its checks
    decide); a step the vote stage decides (no tools, no caller-set threshold) is drafted and voted
    on; a step whose P is within the draft band of its threshold is drafted and checked (the draft
    stage decides); else local exactly when P >= threshold. A step asking for n > 1 samples is
    never drafted. Raises InvalidRequestError for a local-only step the SLM cannot answer."""
    # (Each rule's condition is read once: this runs on every step of the live path.)
    override, why_not_local = facts.override, facts.why_not_local
    if override is not Override.AUTO or why_not_local is not None:  # forced: the override, or the cloud
        if override is Override.LOCAL_ONLY and why_not_local is not None:
            raise InvalidRequestError(f"local-only step cannot run on the SLM: {why_not_local}")
        base = decide(facts.p_local, facts.threshold, override, local_can_serve=why_not_local is None)
        return StepPlan(facts, _ACTION_OF_ROUTE[base.route], base.reason)
    single = facts.samples == 1
    if facts.unfamiliar and facts.on_unfamiliar != "trust":  # distrusted
        if facts.on_unfamiliar == "cloud":
            return StepPlan(facts, Action.CLOUD, "unfamiliar")
        if single:  # policy.unfamiliar = "draft": the checks alone decide
            return StepPlan(facts, Action.DRAFT, "unfamiliar", checks_only=True, votes_k=facts.agreement_k,
                            min_share=facts.agreement_min)
    p, threshold = facts.p_local, facts.threshold
    if p is None:  # (needs_score holds from here on)
        raise ValueError(f"step {facts.step} is decided by the predictor's score, and it has none")
    if single:
        vote = facts.vote  # the vote stage decides the task's first vote.steps steps
        if vote is not None and facts.step < vote.steps and not facts.tools and not facts.fixed_threshold:
            return StepPlan(facts, Action.VOTE, "vote", votes_k=vote.k, min_share=vote.min_share)
        if facts.draft_band > 0 and abs(p - threshold) < facts.draft_band:
            return StepPlan(facts, Action.DRAFT, "uncertain", votes_k=facts.agreement_k,
                            min_share=facts.agreement_min)
    # policy.decide's rule for an automatic step: local exactly when P >= threshold
    return StepPlan(facts, Action.LOCAL if p >= threshold else Action.CLOUD, "predictor")


_ACTION_OF_ROUTE = {Route.LOCAL: Action.LOCAL, Route.CLOUD: Action.CLOUD}
_ROUTE_OF_ACTION = {Action.LOCAL: Route.LOCAL, Action.CLOUD: Route.CLOUD}


@dataclass(frozen=True)
class DraftOutcome:
    """What the executor learned about a drafted step's draft."""

    passed: bool  # the draft's device checks (`hera_core.checks.drafts.check_draft`)
    stage_keep: bool | None = None  # the predictor's draft stage's verdict (plan.draft_stage_decides)
    votable: bool | None = None  # its answer can be voted on (asked by vote_key_wanted); None: not asked
    agreement: Agreement | None = None  # the samples' vote (asked by samples_wanted); None: none to be had
    tool_calls: bool = False  # the draft made tool calls, all valid
    tool_errors: bool = False  # the draft wrote a tool call that is not valid

    def first_keep(self, plan: StepPlan) -> bool:
        """The verdict before any vote: the checks (a vote plan, an unfamiliar step) or the draft stage."""
        if plan.draft_stage_decides:
            if self.stage_keep is None:
                raise ValueError("the draft stage decides this draft: its verdict (stage_keep) is needed")
            return self.stage_keep
        return self.passed


def vote_key_wanted(plan: StepPlan, outcome: DraftOutcome) -> bool:
    """The draft's answer must be read (is it votable?) before deciding: a vote plan whose draft
    passed its checks (a failed draft is escalated without samples)."""
    return plan.action is Action.VOTE and not plan.facts.tools and outcome.first_keep(plan)


def samples_wanted(plan: StepPlan, outcome: DraftOutcome) -> int:
    """How many samples vote on this draft (0: none are drawn): a vote plan's, for a passed draft
    whose answer is votable; a drafted step's agreement_k samples whatever its checks said."""
    if plan.action not in (Action.DRAFT, Action.VOTE) or plan.votes_k == 0 or plan.facts.tools:
        return 0
    if plan.action is Action.VOTE:
        if not vote_key_wanted(plan, outcome):
            return 0
        if outcome.votable is None:
            raise ValueError("a vote plan's passed draft needs `votable` before its samples are drawn")
        return plan.votes_k if outcome.votable else 0
    return plan.votes_k


def decide_after_draft(plan: StepPlan, outcome: DraftOutcome) -> Decision:
    """The route of a drafted step: LOCAL "draft-kept" (the draft, or the samples' majority answer,
    is the answer) or CLOUD "escalated". A vote plan keeps a draft that passed its checks when
    enough samples agree with it; a free-text draft (not votable), or samples the engine cannot
    draw, leave it to the prefill (P >= threshold). A drafted step keeps its draft on its checks or
    draft stage, and, with samples, only when enough of them agree. With tools offered, a draft
    whose tool call is invalid is never kept, and one whose calls are all valid always is."""
    if plan.action not in (Action.DRAFT, Action.VOTE):
        raise ValueError(f"a {plan.action.value} plan has no draft")
    keep = outcome.first_keep(plan)
    if vote_key_wanted(plan, outcome) and outcome.votable is False:
        keep = plan.prefill_keep
    elif samples_wanted(plan, outcome):
        if outcome.agreement is not None:
            keep = keep and outcome.agreement.share >= plan.min_share
        elif plan.action is Action.VOTE:  # no samples to be had: the stage cannot vote, the prefill decides
            keep = plan.prefill_keep
    if plan.facts.tools:
        keep = not outcome.tool_errors and (outcome.tool_calls or keep)
    return plan._decision(Route.LOCAL, "draft-kept") if keep else plan._decision(Route.CLOUD, "escalated")


def after_budget(plan: StepPlan, decision: Decision, exceeded: str | None, action: str) -> Decision | None:
    """A cloud step under a spent cloud budget (`exceeded`: the cap that is spent, None: none is):
    with budget action "local", the SLM answers (reason budget-<cap>) if it can; else None: the
    step is refused."""
    if exceeded is None or decision.route is not Route.CLOUD:
        return decision
    if action == "local" and plan.facts.why_not_local is None:
        return replace(decision, route=Route.LOCAL, reason=f"budget-{exceeded}")
    return None


def may_leave_device(plan: StepPlan) -> bool:
    """The step may be escalated to the cloud after a local answer: not local-only, and not one the
    SLM was made to answer for want of any other (it could not run there: never escalated)."""
    return plan.facts.override is not Override.LOCAL_ONLY and plan.facts.why_not_local is None


def after_invalid_tool_call(plan: StepPlan, decision: Decision, cloud_closed: bool) -> Decision:
    """The SLM's answer holds a tool call that is not valid: it is never returned as one. Escalated
    to the cloud (reason invalid-tool-call) where the step may leave the device and the cloud can
    take it (`cloud_closed`: it cannot, its budget is spent or its call for this step just failed),
    else answered without the call (tool-call-dropped)."""
    if not may_leave_device(plan) or cloud_closed:
        return replace(decision, route=Route.LOCAL, reason="tool-call-dropped")
    return replace(decision, route=Route.CLOUD, reason="invalid-tool-call")


def after_cloud_failure(plan: StepPlan, decision: Decision, *, fallback: str, streamed: bool,
                        request_error: bool) -> Decision | None:
    """The cloud call failed: the SLM answers instead (reason fallback-local) when the fallback
    policy is "local", the SLM can answer, nothing of the cloud's answer was streamed yet, the step
    was not cloud-only and the request itself was not at fault (`request_error`: a 4xx the SLM
    would not fix); else None: the failure is the step's."""
    if fallback != "local" or plan.facts.why_not_local is not None or streamed or request_error or \
            plan.facts.override is Override.CLOUD_ONLY:
        return None
    return replace(decision, route=Route.LOCAL, reason="fallback-local")
