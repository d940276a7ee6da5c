"""`hera eval`: routing methods on the test split, live through the agent harness.

Methods (a tiny base class and a registry, so lists of names come from here):
  all_slm, all_llm    every step on one model
  hera                the runtime's own step plan (`hera_core.routing.plan`), replayed on each
                      step: P(SLM good enough) from the SLM prefill >= kappa(step) (weighed
                      by the step's expected cloud cost if the predictor is); with a draft
                      stage in the predictor, steps within its band of kappa are drafted
                      by the SLM, checked, and kept or escalated (the draft's time is booked);
                      a step unlike the predictor's training tasks follows `unfamiliar`; with a
                      vote stage, a task's first step is drafted, checked and voted on by k SLM
                      samples, and kept or escalated (the samples' time is booked too)
  hera_no_vote        HERA with its vote stage off (only for a predictor that has one)
  hera_prefill        the first stage alone, trusted everywhere (no drafting, no familiarity
                      check): what the predictor does by itself
  random              per step local with probability = HERA's measured local share (seeded)
  query_router        one decision per task from the predictor's score of its first step
                      (HybridLLM-style), thresholded so its local share of steps matches HERA's
  query_router_cost   the same router, thresholded so its cloud cost is at most HERA's
  query_cascade       the whole task on the SLM; its final answer gets the draft checks; a task
                      that fails them reruns entirely on the LLM (FrugalGPT/AutoMix-style)
  oracle              run, with lookahead: at each step, local exactly when finishing the task on
                      the LLM after this step on the SLM ends at least as correct as with the LLM
                      here too (the profile's substitution label, computed on the oracle's own
                      trajectory, so its choices compose)

Every model call goes through the completion cache (greedy outputs are deterministic) and every
SLM prefill's features through its feature cache, so `--offline` replays a committed run with no
model at all; a miss is then an error.
"""

from __future__ import annotations

import abc
import asyncio
import math
import random as random_mod
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from hera_core.backends.caching import CompletionCache
from hera_core.backends.tools import ToolSet
from hera_core.checks.drafts import Agreement, DraftCheck, check_draft, staged_agreement, votable, vote_key
from hera_core.config import PriceSettings
from hera_core.errors import CacheMissError
from hera_core.backends.base import Engine, Generation, Message
from hera_core.native.features import logit_features
from hera_core.offline.harness import (first_messages, generate_step, message_text, program_prelude, run_task,
                                      step_text, task_toolset)
from hera_core.routing.plan import (Action, DraftOutcome, StepFacts, StepPlan, after_invalid_tool_call,
                                    decide_after_draft, needs_score, plan_step, samples_wanted, vote_key_wanted)
from hera_core.routing.policy import Decision, Route
from hera_core.offline.stats import bootstrap_ci, paired_bootstrap
from hera_core.routing.predictor import PROMPT_TOKENS_COLUMN, Predictor, feature_matrix, structure_features
from hera_core.offline.workloads import Task

MAX_TOKENS = 384  # the profile's completion limit: the same requests hit the same cache entries


@dataclass
class StepRecord:
    route: str
    latency_s: float
    cloud_cost_usd: float  # spent on the cloud by this step (0 when local)
    all_cloud_cost_usd: float  # what the step would cost on the cloud
    escalated: bool = False  # drafted on the SLM, then sent to the cloud
    unfamiliar: bool = False  # unlike every task the predictor was trained on (its familiarity check)


@dataclass
class TaskResult:
    task_id: str
    family: str
    correct: float
    steps: list[StepRecord] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)  # the whole conversation, as the harness ran it
    invalid_tool_calls: int = 0  # calls returned by a step that break their tool's schema (must stay 0)


class Method(abc.ABC):
    """Decides the route of each step; `start_task` lets per-task methods decide once."""

    name: str

    def start_task(self, task: Task) -> None:
        return None

    @abc.abstractmethod
    async def route(self, task: Task, step: int, messages: list[Message], ev: "Evaluator") -> str: ...


class AllSLM(Method):
    name = "all_slm"

    async def route(self, task, step, messages, ev):
        return "local"


class AllLLM(Method):
    name = "all_llm"

    async def route(self, task, step, messages, ev):
        return "cloud"


class Hera(Method):
    """HERA as the runtime routes: the step plan (`hera_core.routing.plan`, the function the
    runtime executes) made from the step's traced score and replayed: P(SLM good enough) >=
    kappa(step), weighed by the step's expected cloud cost when the predictor has a cost weight;
    with a draft stage in the predictor, the steps within its band of kappa are drafted, checked,
    and kept or escalated; with a vote stage, a task's first steps are drafted and voted on; an
    unfamiliar step follows `unfamiliar`."""

    name = "hera"
    drafts = True
    votes = True

    def __init__(self, offset: float = 0.0, unfamiliar: str = "cloud") -> None:
        self.offset = offset
        self.unfamiliar = unfamiliar  # the runtime's policy.unfamiliar: cloud | draft | trust

    async def plan(self, step: int, messages: list[Message], ev: "Evaluator",
                   toolset: ToolSet | None) -> tuple[StepPlan, np.ndarray | None]:
        """The step plan as the runtime makes it with this method's settings (policy.vote "off"
        for `votes = False`, no draft band for `drafts = False`), and the step's feature row (None
        when the plan does not read the score: the row is then not looked up)."""
        tools = toolset is not None
        facts = StepFacts(step=step, unfamiliar=self.unfamiliar != "trust" and ev.unfamiliar(messages, tools),
                          on_unfamiliar=self.unfamiliar,
                          draft_band=ev.predictor.draft_band_for(messages, tools) if self.drafts else 0.0,
                          vote=ev.predictor.vote if self.votes else None, tools=toolset is not None)
        row = None
        if needs_score(facts):
            row = await ev.feature_row(messages, step, toolset=toolset)
            facts = replace(facts, p_local=float(ev.predictor.predict(row)[0]),
                            threshold=ev.threshold(row, step, messages, tools) + self.offset)
        return plan_step(facts), row

    async def route(self, task, step, messages, ev):
        return await self.route_step(step, messages, ev, task_toolset(task, messages), program_prelude(task, messages))

    async def route_step(self, step: int, messages: list[Message], ev: "Evaluator", toolset: ToolSet | None,
                         prelude: str = "") -> str:
        """The route of one step (local, cloud, or escalated: drafted on the SLM, answered in the
        cloud), as the runtime would take it (`prelude`: what a draft's program is checked with)."""
        plan, row = await self.plan(step, messages, ev, toolset)
        if plan.action is Action.CLOUD:
            return "cloud"
        if plan.action is Action.LOCAL:
            if toolset is None:
                return "local"
            # as the runtime answers: a local answer with an invalid tool call is escalated (no budget here)
            answer = await ev.slm.generate(messages, max_tokens=MAX_TOKENS, toolset=toolset)
            decision = after_invalid_tool_call(plan, plan.decision, cloud_closed=False) if answer.tool_errors \
                else plan.decision
        else:
            decision = await ev.after_draft(plan, messages, row, toolset, prelude)
        return "local" if decision.route is Route.LOCAL else "escalated"


class HeraPrefill(Hera):
    """The first stage alone, trusted on every step (no drafting, no familiarity check): the
    predictor by itself, to show what the draft stage and the familiarity check add."""

    name = "hera_prefill"
    drafts = False
    votes = False

    def __init__(self, offset: float = 0.0) -> None:
        super().__init__(offset, unfamiliar="trust")


class HeraNoVote(Hera):
    """HERA with its vote stage off (policy.vote = "off"): what voting on the first steps adds."""

    name = "hera_no_vote"
    votes = False


class RandomRouter(Method):
    name = "random"

    def __init__(self, share: float, seed: int = 0) -> None:
        self.share = share
        self.rng = random_mod.Random(seed)

    async def route(self, task, step, messages, ev):
        return "local" if self.rng.random() < self.share else "cloud"


class QueryRouter(Method):
    name = "query_router"

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._decision: dict[str, str] = {}

    async def route(self, task, step, messages, ev):
        if task.task_id not in self._decision:  # decided on the task's first step, kept for all
            p = await ev.p_local(messages, 0, task)
            self._decision[task.task_id] = "local" if p >= self.threshold else "cloud"
        return self._decision[task.task_id]


class Oracle(Method):
    """Per step: the cheaper model whenever it costs the task nothing, known by playing the task out."""

    name = "oracle"

    async def route(self, task, step, messages, ev):
        local = await ev.rollout(task, messages, step, "local")
        cloud = await ev.rollout(task, messages, step, "cloud")
        return "local" if local >= cloud else "cloud"


METHODS: dict[str, type[Method]] = {m.name: m for m in (AllSLM, AllLLM, HeraPrefill, HeraNoVote, Hera, RandomRouter,
                                                         QueryRouter, Oracle)}
METHOD_NAMES = ("all_slm", "all_llm", "random", "query_router", "query_router_cost", "query_cascade", "hera_prefill",
                "hera_no_vote", "hera", "oracle")  # hera_no_vote: only for a predictor with a vote stage


class Evaluator:
    def __init__(self, slm: Engine, llm: Engine, predictor: Predictor, cache: CompletionCache,
                 prices: PriceSettings, slm_name: str) -> None:
        self.slm, self.llm, self.predictor, self.cache, self.prices = slm, llm, predictor, cache, prices
        self.slm_name = slm_name
        self.step_overhead_s = 0.0  # device time a method spent deciding the current step (its samples)

    async def feature_row(self, messages: list[Message], step: int, task: Task | None = None, *,
                          toolset: ToolSet | None = None) -> np.ndarray:
        """The predictor's input row [1, F] for this step, from the feature cache or a live prefill
        (with the task's tools, or `toolset`, rendered, as the runtime prefills a tool step)."""
        feats = self.cache.get_features(self.slm_name, messages)
        if task is not None:
            toolset = task_toolset(task, messages)
        if feats is None:
            if self.cache.read_only:
                raise CacheMissError(f"feature cache miss for {self.slm_name} in offline mode; rerun without --offline")
            pre = await self.slm.prefill(messages, **({"toolset": toolset} if toolset is not None else {}))
            feats = {"logit": [float(x) for x in logit_features(pre.logits[None, :])[0]],
                     "prompt_tokens": pre.prompt_tokens}
            self.cache.put_features(self.slm_name, messages, feats)
        return feature_matrix(np.asarray([feats["logit"]], dtype=np.float32),
                              [structure_features(step, feats["prompt_tokens"], messages, toolset)])

    def threshold(self, row: np.ndarray, step: int, messages: list[Message] | None = None,
                  tools: bool = False) -> float:
        """kappa at this step, as the runtime weighs it (by the step's expected cloud cost too, when
        the predictor has a cost weight; its workload's, given the step's `messages` and whether
        it offers `tools`); `row` is the step's feature row."""
        tokens = float(row[0, PROMPT_TOKENS_COLUMN])
        if messages is None:
            return self.predictor.kappa.at(step, tokens)
        return self.predictor.threshold_at(messages, step, tokens, tools)

    def unfamiliar(self, messages: list[Message], tools: bool = False) -> bool:
        return not self.predictor.locate(messages, tools)[0]

    async def p_local(self, messages: list[Message], step: int, task: Task | None = None) -> float:
        return float(self.predictor.predict(await self.feature_row(messages, step, task))[0])

    async def draft_and_check(self, messages: list[Message], toolset: ToolSet | None = None,
                              with_logprobs: bool = True, prelude: str = "") -> tuple[Generation, DraftCheck]:
        """The SLM's (cached, greedy) draft of this step and its checks; its token log-probabilities
        (`with_logprobs`: the draft stage reads them) come from the feature cache, else from the
        SLM teacher-forced (cached for replays)."""
        draft = await self.slm.generate(messages, max_tokens=MAX_TOKENS,
                                        **({"toolset": toolset} if toolset is not None else {}))
        logprobs = draft.extra.get("token_logprobs")
        if logprobs is None and with_logprobs:
            key = [*messages, {"role": "assistant", "content": draft.text}]
            hit = self.cache.get_features(self.slm_name + ":draft", key)
            if hit is None:
                if self.cache.read_only:
                    raise CacheMissError(f"draft log-prob cache miss for {self.slm_name} in offline mode")
                hit = {"logprobs": [round(x, 4) for x in await self.slm.score_continuation(messages, draft.text)]}
                self.cache.put_features(self.slm_name + ":draft", key, hit)
            logprobs = hit["logprobs"]
        return draft, await asyncio.to_thread(check_draft, messages, draft.text, prelude=prelude,
                                              completion_tokens=draft.completion_tokens, token_logprobs=logprobs)

    async def after_draft(self, plan: StepPlan, messages: list[Message], row: np.ndarray | None,
                          toolset: ToolSet | None = None, prelude: str = "") -> Decision:
        """A DRAFT or VOTE plan replayed: the SLM's cached draft, its checks, the draft stage's
        verdict or the recorded samples' vote as the plan asks (`samples_wanted`), and the decision
        the runtime would take (`decide_after_draft`). A vote plan's checks read no log-probs."""
        draft, check = await self.draft_and_check(messages, toolset, with_logprobs=plan.action is Action.DRAFT,
                                                  prelude=prelude)
        outcome = DraftOutcome(check.passed, tool_calls=bool(draft.tool_calls), tool_errors=bool(draft.tool_errors),
                               stage_keep=self.predictor.keep_draft(row, check, messages, toolset is not None)[0]
                               if plan.draft_stage_decides
                               else None)
        draft_key = None
        if vote_key_wanted(plan, outcome):
            draft_key = await asyncio.to_thread(vote_key, draft.text, prelude=prelude)
            outcome = replace(outcome, votable=votable(draft_key))
        k = samples_wanted(plan, outcome)
        if k:
            if draft_key is None:
                draft_key = await asyncio.to_thread(vote_key, draft.text, prelude=prelude)
            outcome = replace(outcome, agreement=await self.vote(messages, k, draft_key, prelude))
        return decide_after_draft(plan, outcome)

    async def vote(self, messages: list[Message], k: int, draft_key: str, prelude: str = "") -> Agreement:
        """How k samples of the SLM (temperature 0.7, one call sharing the prompt) vote on its greedy
        draft of this step (whose answer is `draft_key`), staged as the runtime draws them. The samples' answers and the call's
        time come from the feature cache, else from the SLM (cached for replays); the time is added
        to the step's (all k drawn: an upper bound where the first ones agreed)."""
        hit = self.cache.get_features(f"{self.slm_name}:votes{k}", messages)
        if hit is None:
            if self.cache.read_only:
                raise CacheMissError(f"vote cache miss for {self.slm_name} in offline mode; rerun without --offline")
            t0 = time.perf_counter()
            gens = await self.slm.generate_samples(messages, k, max_tokens=MAX_TOKENS, temperature=0.7, seed=0)  # as bench/eval/agreement_probe.py
            hit = {"keys": [await asyncio.to_thread(vote_key, g.text, prelude=prelude) for g in gens],
                   "samples_s": time.perf_counter() - t0}
            self.cache.put_features(f"{self.slm_name}:votes{k}", messages, hit)
        self.step_overhead_s += hit["samples_s"]
        return staged_agreement(draft_key, hit["keys"])

    async def rollout(self, task: Task, messages: list[Message], step: int, route: str) -> float:
        """Correctness of `task` when the steps before `step` replay the assistant turns in
        `messages`, step `step` runs on `route` and every later step on the LLM."""
        replies = [message_text(m) for m in messages if m["role"] == "assistant"]

        async def step_fn(msgs, k):
            if k < step:
                return replies[k], "replay"
            engine = self.slm if k == step and route == "local" else self.llm
            return await generate_step(engine, task, msgs, MAX_TOKENS), route

        return (await run_task(task, step_fn)).correct

    async def run(self, method: Method, tasks: list[Task], progress=None) -> list[TaskResult]:
        out = []
        for task in tasks:
            method.start_task(task)
            result = TaskResult(task.task_id, task.family, 0.0)

            async def step_fn(messages, k, task=task, result=result):
                self.step_overhead_s = 0.0
                route = await method.route(task, k, messages, self)
                draft_s = self.step_overhead_s
                toolset = task_toolset(task, messages)
                kwargs = {"toolset": toolset} if toolset is not None else {}
                escalated = route == "escalated"
                if escalated:  # the SLM drafted this step first: its time is part of the step
                    draft_s += (await self.slm.generate(messages, max_tokens=MAX_TOKENS, **kwargs)).latency_s
                    route = "cloud"
                gen = await (self.slm if route == "local" else self.llm).generate(messages, max_tokens=MAX_TOKENS,
                                                                                   **kwargs)
                result.invalid_tool_calls += invalid_calls(gen, toolset)
                all_cloud = self.prices.cloud_cost(gen.prompt_tokens, gen.completion_tokens)
                result.steps.append(StepRecord(route, gen.latency_s + draft_s, all_cloud if route == "cloud" else 0.0,
                                               all_cloud, escalated=escalated,
                                               unfamiliar=self.unfamiliar(messages, toolset is not None)))
                return step_text(gen), route

            traj = await run_task(task, step_fn)
            result.correct, result.messages = traj.correct, traj.messages
            out.append(result)
            if progress is not None:
                progress()
        return out


def invalid_calls(gen, toolset) -> int:
    """How many of a step's returned tool calls fail their schema, checked again here with
    jsonschema, independently of the engine's own check (every one counts if no tool was offered)."""
    import json

    import jsonschema

    bad = 0
    for call in gen.tool_calls:
        fn = call.get("function") or {}
        schema = toolset.schemas.get(fn.get("name")) if toolset is not None else None
        try:
            if schema is None:
                raise ValueError(fn.get("name"))
            jsonschema.validate(json.loads(fn.get("arguments") or ""), schema)
        except (ValueError, jsonschema.ValidationError):
            bad += 1
    return bad


def query_cascade(slm: list[TaskResult], llm: list[TaskResult]) -> list[TaskResult]:
    """Query-level cascade from the two pure runs: a task keeps the SLM's whole run when its final
    answer passes the draft checks (checked against the prompt that asked for it), else it reruns
    on the LLM, paying for both (its steps: the SLM's, then the LLM's)."""
    out = []
    for s, l in zip(slm, llm):
        last = max(i for i, m in enumerate(s.messages) if m["role"] == "assistant")
        passed = check_draft(s.messages[:last], message_text(s.messages[last])).passed
        if passed:
            out.append(TaskResult(s.task_id, s.family, s.correct, list(s.steps), s.messages))
        else:
            steps = [StepRecord("local", st.latency_s, 0.0, st.all_cloud_cost_usd, escalated=True) for st in s.steps]
            # the rerun's steps count as cloud steps; the SLM's are the wasted drafts
            out.append(TaskResult(l.task_id, l.family, l.correct, steps + list(l.steps), l.messages))
    return out


def summarize(results: list[TaskResult], all_llm_cloud_cost: float) -> dict[str, Any]:
    steps = [s for r in results for s in r.steps]
    acc = [r.correct for r in results]
    lo, hi = bootstrap_ci(acc)
    cloud = sum(s.cloud_cost_usd for s in steps)
    return {"tasks": len(results), "accuracy": float(np.mean(acc)) if acc else math.nan, "accuracy_ci95": [lo, hi],
            "local_share": sum(s.route == "local" for s in steps) / max(1, len(steps)), "subtasks": len(steps),
            "cloud_cost_usd": cloud, "cost_ratio": cloud / all_llm_cloud_cost if all_llm_cloud_cost else math.nan,
            "mean_latency_s": float(np.mean([sum(s.latency_s for s in r.steps) for r in results])) if results else math.nan,
            "escalated_share": sum(s.escalated for s in steps) / max(1, len(steps)),
            "unfamiliar_share": sum(s.unfamiliar for s in steps) / max(1, len(steps)),
            "invalid_tool_calls_returned": sum(r.invalid_tool_calls for r in results),
            "escalated_latency_s": float(np.mean([s.latency_s for s in steps if s.escalated]))
            if any(s.escalated for s in steps) else math.nan}


def stage_shares(per_method: dict[str, list[TaskResult]], workflow_ids: set[str]) -> dict[str, dict[str, float]]:
    """Per method, the share of each workflow stage answered locally (a workflow's step k is its
    stage k: `hera_core.offline.workflows.STAGES`; a draft escalated to the cloud is not local)."""
    from hera_core.offline.workflows import STAGES

    out = {}
    for name, results in per_method.items():
        runs = [r for r in results if r.task_id in workflow_ids]
        out[name] = {stage: sum(len(r.steps) > k and r.steps[k].route == "local" and not r.steps[k].escalated
                                for r in runs) / max(1, len(runs)) for k, stage in enumerate(STAGES)}
    return out


def query_threshold_cost(scores: dict[str, float], task_costs: dict[str, float], budget: float) -> float:
    """Threshold on first-step scores whose cloud tasks (the rest) cost at most `budget` on the cloud."""
    cloud = sum(task_costs.values())
    for task_id, p in sorted(scores.items(), key=lambda kv: -kv[1]):
        if cloud <= budget:
            return p + 1e-9  # the cloud tasks left already fit: this one and the rest stay in the cloud
        cloud -= task_costs[task_id]
    return -1.0  # everything local


def query_threshold(scores: dict[str, float], step_counts: dict[str, int], share: float) -> float:
    """Threshold on first-step scores whose local tasks hold `share` of all steps."""
    total = sum(step_counts.values())
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])
    acc = 0
    for task_id, p in ranked:
        if total and (acc + step_counts[task_id]) / total > share:
            return p + 1e-9  # this task would overshoot: the threshold sits just above it
        acc += step_counts[task_id]
    return -1.0  # everything local


async def first_step_scores(ev: Evaluator, tasks: list[Task]) -> dict[str, float]:
    """Each task's first-step P: what the query router ranks tasks by."""
    return {task.task_id: await ev.p_local(first_messages(task), 0, task) for task in tasks}


async def router_at_cost(ev: Evaluator, tasks: list[Task], first: dict[str, float], all_llm: list[TaskResult],
                         method: list[TaskResult], progress=None) -> list[TaskResult]:
    """The query router (by the first-step scores `first`) calibrated to at most `method`'s cloud
    spend, each task costing what it cost All-LLM (`all_llm`)."""
    task_costs = {r.task_id: sum(s.cloud_cost_usd for s in r.steps) for r in all_llm}
    budget = sum(s.cloud_cost_usd for r in method for s in r.steps)
    return await ev.run(QueryRouter(query_threshold_cost(first, task_costs, budget)), tasks, progress)


async def evaluate(tasks: list[Task], ev: Evaluator, *, seed: int = 0, progress=None,
                   sweep: tuple[float, ...] = (), unfamiliar: str = "cloud") -> dict[str, Any]:
    """Every method on `tasks`; `sweep` adds live HERA runs with these threshold offsets;
    `unfamiliar` is HERA's policy for steps unlike its predictor's training tasks."""
    per_method: dict[str, list[TaskResult]] = {}
    for name, method in (("all_llm", AllLLM()), ("all_slm", AllSLM()), ("hera_prefill", HeraPrefill()),
                         ("hera", Hera(unfamiliar=unfamiliar))):
        per_method[name] = await ev.run(method, tasks, progress)
    if ev.predictor.vote is not None:
        per_method["hera_no_vote"] = await ev.run(HeraNoVote(unfamiliar=unfamiliar), tasks, progress)
    all_llm_cost = sum(s.cloud_cost_usd for r in per_method["all_llm"] for s in r.steps)
    hera_share = summarize(per_method["hera"], all_llm_cost)["local_share"]
    per_method["random"] = await ev.run(RandomRouter(hera_share, seed), tasks, progress)
    first = await first_step_scores(ev, tasks)
    counts = {r.task_id: len(r.steps) for r in per_method["all_llm"]}
    per_method["query_router"] = await ev.run(QueryRouter(query_threshold(first, counts, hera_share)), tasks, progress)
    per_method["query_router_cost"] = await router_at_cost(ev, tasks, first, per_method["all_llm"],
                                                           per_method["hera"], progress)
    per_method["query_cascade"] = query_cascade(per_method["all_slm"], per_method["all_llm"])
    per_method["oracle"] = await ev.run(Oracle(), tasks, progress)

    report: dict[str, Any] = {"methods": {}, "families": {}}
    for name, results in per_method.items():
        report["methods"][name] = summarize(results, all_llm_cost)
    correct = {name: [r.correct for r in results] for name, results in per_method.items()}
    report["hera_minus"] = {name: paired_bootstrap(correct["hera"], c) for name, c in correct.items() if name != "hera"}
    for family in sorted({t.family for t in tasks}):
        fam_llm = sum(s.cloud_cost_usd for r in per_method["all_llm"] if r.family == family for s in r.steps)
        report["families"][family] = {name: summarize([r for r in results if r.family == family], fam_llm)
                                      for name, results in per_method.items()}
    # The sweep: HERA at other thresholds, and the query router at each point's local share, so the
    # two are compared at equal share along the whole curve, not only at HERA's operating point.
    def point(offset: float, hera: dict[str, Any], router: dict[str, Any]) -> dict[str, Any]:
        keys = ("accuracy", "local_share", "cost_ratio")
        return {"threshold_offset": offset, **{k: hera[k] for k in keys}, "query_router": {k: router[k] for k in keys}}

    report["sweep"] = [point(0.0, report["methods"]["hera"], report["methods"]["query_router"])]
    for offset in sweep:
        m = summarize(await ev.run(Hera(offset, unfamiliar), tasks, progress), all_llm_cost)
        router = QueryRouter(query_threshold(first, counts, m["local_share"]))
        report["sweep"].append(point(offset, m, summarize(await ev.run(router, tasks, progress), all_llm_cost)))
    if any(t.kind == "workflow" for t in tasks):
        report["stages"] = stage_shares(per_method, {t.task_id for t in tasks if t.kind == "workflow"})
    report["per_task"] = {name: [{"task_id": r.task_id, "correct": r.correct, "routes": [s.route for s in r.steps]}
                                 for r in results] for name, results in per_method.items()}
    return report
