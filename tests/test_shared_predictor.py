"""One predictor for several workloads (`hera train --workload`): one model ranks every step, each
workload keeps the operating point calibrated on its own validation tasks, and the runtime and the
evaluator pick it by the familiarity check's nearest training family."""

import json

import numpy as np
import pytest

from hera_core.checks.drafts import DRAFT_FEATURE_NAMES
from hera_core.errors import ConfigError, UsageError
from hera_core.offline.harness import first_messages
from hera_core.offline.training import (CostTarget, WorkloadSpec, calibrate, calibrate_cost, fit_cost_weight, train,
                                       workload_families)
from hera_core.offline.workloads import make_tasks
from hera_core.routing.familiarity import fit_familiarity, opening_text
from hera_core.routing.plan import Action
from hera_core.routing.policy import Route
from hera_core.routing.predictor import FEATURE_NAMES, Kappa, Predictor, Workload
from hera_core.routing.step import StepRequest
from tests.conftest import run
from tests.factories import constant_draft_stage, random_predictor, trace
from tests.test_runtime import runtime  # noqa: F401  (fixture)

FAMILIES = ["basic_arithmetic", "letter_counting", "word_sorting", "gsm_symbolic"]
ALWAYS_LOCAL, ALWAYS_CLOUD = Kappa(-0.01, 0.0, 0), Kappa(1.01, 0.0, 0)
UNFAMILIAR = [{"role": "user", "content": "Write a short Python program that prints 6 * 7."}]


def openings(split, per_family):
    tasks = make_tasks(FAMILIES, per_family=per_family, split=split)
    return [(t.family, opening_text(first_messages(t))) for t in tasks]


@pytest.fixture(scope="module")
def fam():
    return fit_familiarity(openings("train", 20), openings("val", 10))


def first_step(family):
    return first_messages(make_tasks([family], 1, split="test")[0])


def two_workloads(fam, predictor=None, draft=None) -> Predictor:
    """Arithmetic and letter counting always local (drafted by `draft`), the rest always cloud;
    the predictor's own kappa (for a trusted unfamiliar step) in between."""
    p = predictor or random_predictor(kappa=Kappa(0.5, 0.0, 0))
    p.familiarity = fam
    p.workloads = (Workload("easy", ("basic_arithmetic", "letter_counting"), ALWAYS_LOCAL, draft),
                   Workload("hard", ("word_sorting", "gsm_symbolic"), ALWAYS_CLOUD))
    return p


def test_the_nearest_family_names_the_task_kind(fam):
    tests = openings("test", 10)
    hits = [fam.nearest([{"role": "user", "content": text}]) == fam.families.index(f) for f, text in tests]
    assert np.mean(hits) >= 0.8, np.mean(hits)
    assert fam.nearest(UNFAMILIAR) is None  # unfamiliar: no family
    m = first_step("gsm_symbolic")
    assert (fam.nearest(m) is not None) == fam.familiar(m)


def test_a_step_is_compared_only_with_the_families_of_its_kind(fam):
    """Families whose tasks offer tools are compared with steps that offer tools, the others with
    steps that do not (a tool task's open question is like any question): the kind is recorded
    per family, survives the file, and a step of a kind no family has is unfamiliar."""
    from hera_core.routing.familiarity import Familiarity

    kinds = {f: f == "basic_arithmetic" for f in FAMILIES}
    typed = fit_familiarity(openings("train", 20), openings("val", 10), tools=kinds)
    arithmetic, sorting = first_step("basic_arithmetic"), first_step("word_sorting")
    i = typed.families.index("basic_arithmetic")
    assert fam.nearest(arithmetic) == i and typed.nearest(arithmetic, tools=True) == i
    assert typed.nearest(arithmetic, tools=False) != i  # not compared with the tool family
    assert typed.nearest(sorting, tools=True) is None and typed.nearest(sorting) == typed.families.index("word_sorting")
    none_with_tools = fit_familiarity(openings("train", 5), [], tools={f: False for f in FAMILIES})
    assert none_with_tools.margin(sorting, tools=True) == -np.inf and not none_with_tools.familiar(sorting, True)
    back = Familiarity.from_dict(json.loads(json.dumps(typed.to_dict())))
    assert list(back.tools) == list(typed.tools) and back.nearest(arithmetic, tools=True) == i
    assert Familiarity.from_dict(json.loads(json.dumps(fam.to_dict()))).tools is None  # an older file: one kind
    with pytest.raises(ValueError, match="no entry"):
        fit_familiarity(openings("train", 5), [], tools={"mmlu": False})


def test_training_records_which_families_offer_tools():
    from hera_core.offline.training import family_tools

    traces, _ = workload_traces()
    for t in traces[:100]:  # most "safe" tasks offer tools at their first step
        t["steps"][0]["features"][FEATURE_NAMES.index("tools_offered")] = 2.0
    assert family_tools(traces) == {"safe": True, "risky": False}


def test_each_workload_takes_its_own_threshold_and_draft_stage(fam):
    own = constant_draft_stage(keep=True, threshold=0.99)
    own.band = 0.3
    p = two_workloads(fam, draft=own)
    p.draft = stage = constant_draft_stage(keep=True, threshold=0.2)
    stage.band = 0.1
    easy, hard = first_step("basic_arithmetic"), first_step("word_sorting")
    assert p.workload(easy).name == "easy" and p.workload(hard).name == "hard" and p.workload(UNFAMILIAR) is None
    assert p.threshold_at(easy, 0, 100) == ALWAYS_LOCAL.at(0, 100)
    assert p.threshold_at(hard, 3, 100) == ALWAYS_CLOUD.at(3, 100)
    assert p.threshold_at(UNFAMILIAR, 2, 100) == Kappa(0.5, 0.0, 0).at(2, 100)  # the predictor's own
    assert (p.draft_band_for(easy), p.draft_band_for(hard), p.draft_band_for(UNFAMILIAR)) == (0.3, 0.0, 0.1)

    class Passed:
        passed = True
        features = np.zeros(len(DRAFT_FEATURE_NAMES), dtype=np.float32)

    row = np.zeros((1, len(p.input_names)), dtype=np.float32)
    keep_p = p.keep_draft(row, Passed())[1]
    assert 0.2 <= keep_p < 0.99  # the predictor's stage keeps at its threshold, the easy workload's would not
    assert p.keep_draft(row, Passed(), UNFAMILIAR)[0] and not p.keep_draft(row, Passed(), easy)[0]
    assert p.keep_draft(row, Passed(), hard)[0]  # a workload without a stage of its own: the predictor's


def test_workloads_survive_the_file_and_a_bad_section_is_refused(fam, tmp_path):
    p = two_workloads(fam, draft=constant_draft_stage(keep=True, threshold=0.7))
    p.save(tmp_path / "p.json")
    q = Predictor.load(tmp_path / "p.json")
    assert [(w.name, w.families, w.kappa) for w in q.workloads] == [(w.name, w.families, w.kappa) for w in p.workloads]
    assert q.workload(first_step("gsm_symbolic")).name == "hard" and q.workloads[1].draft is None
    assert (q.workloads[0].draft.keep_threshold, q.workloads[0].draft.model_json) == (0.7, p.workloads[0].draft.model_json)
    d = json.loads((tmp_path / "p.json").read_text())

    def refused(change, match):
        bad = json.loads(json.dumps(d))
        change(bad)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=match):
            Predictor.load(tmp_path / "bad.json")

    refused(lambda b: b["workloads"][0]["families"].append("mmlu"), "does not know")
    refused(lambda b: b["workloads"][1]["families"].append("basic_arithmetic"), "twice")
    refused(lambda b: b.pop("familiarity"), "no familiarity")
    refused(lambda b: b["workloads"][0].pop("kappa"), "its workload section is unreadable")
    refused(lambda b: b["workloads"][0].update(families=[]), "its workload section is unreadable")
    refused(lambda b: b["workloads"][0]["draft_stage"]["feature_names"].pop(), "easy's draft stage lists features")


def test_the_runtime_routes_each_workload_by_its_own_point(runtime, fam):  # noqa: F811
    """A real runtime (SmolLM2 on the device, a real model over HTTP as the cloud): the same
    predictor keeps an arithmetic step local and sends a word-sorting step to the cloud, each at
    its workload's threshold; an unfamiliar step the policy trusts takes the predictor's own."""
    two_workloads(fam, runtime.predictor)
    runtime.predictor.kappa = Kappa(0.5, 0.0, 0)
    runtime.unfamiliar = "trust"
    easy = run(runtime.complete(first_step("letter_counting"), session="e", step=0, max_tokens=8))
    hard = run(runtime.complete(first_step("gsm_symbolic"), session="h", step=0, max_tokens=8))
    assert easy.route is Route.LOCAL and easy.decision.threshold == pytest.approx(-0.01)
    assert hard.route is Route.CLOUD and hard.decision.threshold == pytest.approx(1.01)
    plan, score = run(runtime.plan(StepRequest(UNFAMILIAR, "u", step=0)))
    assert score.threshold == pytest.approx(0.5) and plan.action is (Action.LOCAL if score.p_local >= 0.5 else
                                                                      Action.CLOUD)
    # the workload's draft band: only the easy workload's steps are drafted
    stage = constant_draft_stage(keep=True, threshold=0.0)
    stage.band = 5.0
    runtime.predictor.workloads = (Workload("easy", ("basic_arithmetic", "letter_counting"), ALWAYS_LOCAL, stage),
                                   Workload("hard", ("word_sorting", "gsm_symbolic"), ALWAYS_CLOUD))
    assert run(runtime.plan(StepRequest(first_step("letter_counting"), "e2", step=0)))[0].action is Action.DRAFT
    assert run(runtime.plan(StepRequest(first_step("word_sorting"), "h2", step=0)))[0].action is Action.CLOUD


def test_the_runtime_tells_a_tool_task_by_the_tools_the_agent_offers(runtime, fam):  # noqa: F811
    """The arithmetic family recorded as a tool-calling one: its opening with the agent's tools
    takes its workload's point; without tools it is compared with the other families only, and is
    unfamiliar (policy.unfamiliar "cloud" sends it there)."""
    from hera_core.backends.tools import ToolSet

    p = two_workloads(fam, runtime.predictor)
    p.familiarity = fit_familiarity(openings("train", 20), openings("val", 10),
                                    tools={f: f == "basic_arithmetic" for f in FAMILIES})
    tools = ToolSet.parse([{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}])
    msgs = first_step("basic_arithmetic")
    plan, score = run(runtime.plan(StepRequest(msgs, "t", step=0, toolset=tools)))
    assert score.threshold == pytest.approx(-0.01) and not plan.facts.unfamiliar
    plan, _ = run(runtime.plan(StepRequest(msgs, "n", step=0)))
    assert plan.facts.unfamiliar and plan.action is Action.CLOUD and plan.reason == "unfamiliar"


# --- training ------------------------------------------------------------------------------------
def workload_traces(seed=0):
    """Two families the same model ranks (feature 0 carries the signal) but whose SLM is right at
    different rates: the safe one can keep nearly every step local, the risky one few."""
    rng = np.random.default_rng(seed)
    traces = []
    for family, cut in (("safe", -1.5), ("risky", 1.0)):
        for i in range(120):
            f0 = rng.normal(size=2)
            t = trace(f"{family}{i}", "train" if i < 80 else "val", 1.0, [int(x > cut) for x in f0], list(f0))
            t["family"] = family
            prompt, out = (100, 20) if family == "safe" else (400, 200)  # the risky family costs more
            for s in t["steps"]:
                s["features"][FEATURE_NAMES.index("prompt_tokens")] = float(prompt)
                s.update(prompt_tokens=prompt, llm_text="x" * (4 * out), slm_text="y" * (4 * out),
                         slm_completion_tokens=out)
            traces.append(t)
    openings = {t["task_id"]: ("Add these numbers: " if t["family"] == "safe" else "Sort these words alphabetically: ")
                + " ".join(str(x) for x in rng.integers(0, 99, size=4)) for t in traces}
    return traces, openings


def test_training_calibrates_each_workload_on_its_own_validation_tasks():
    traces, openings = workload_traces()
    groups = {"a": WorkloadSpec(("safe",)), "b": WorkloadSpec(("ris*",))}
    p, report = train(traces, num_rounds=30, openings=openings, workloads=groups)
    a, b = p.workloads
    assert (a.name, a.families, b.families) == ("a", ("safe",), ("risky",))
    for w in (a, b):  # exactly what calibrating on that workload's validation tasks alone gives
        val = [t for t in traces if t["family"] == w.families[0] and t["split"] == "val"]
        assert w.kappa == calibrate(val, p, 0.03)[0]
        assert report["workloads"][w.name]["est_accuracy"] >= report["workloads"][w.name]["llm_accuracy"] - 0.03
    assert report["workloads"]["a"]["est_local_share"] > report["workloads"]["b"]["est_local_share"] + 0.3
    # cost-aware: each workload's cost weight is fitted on its own train tasks
    p, _ = train(traces, num_rounds=30, openings=openings, workloads=groups, cost=CostTarget())
    own = [t for t in traces if t["family"] == "risky"]
    weight = fit_cost_weight([t for t in own if t["split"] == "train"], gamma=0.0)
    assert p.workloads[1].kappa == calibrate_cost([t for t in own if t["split"] == "val"], p, weight)[0]
    assert p.workloads[1].kappa.cost.out_tokens[0] == pytest.approx(200, abs=1)
    assert p.workloads[0].kappa.cost.out_tokens[0] == pytest.approx(20, abs=1)


def test_each_workload_gets_its_own_draft_stage_and_options():
    """The risky family's drafts reveal its labels (the prefill cannot): its workload gets a draft
    stage of its own that keeps more of its steps local; the safe workload, marked no-draft and
    kappa-alone, is never drafted and has no cost weight although the training is cost-aware."""
    traces, openings = workload_traces()
    rng = np.random.default_rng(5)
    for t in traces:
        for s in t["steps"]:
            if t["family"] == "risky":  # the prefill tells nothing here
                s["features"][0] = float(rng.normal())
            d = [0.0] * len(DRAFT_FEATURE_NAMES)
            tells = t["family"] == "risky" and rng.random() < 0.95
            d[DRAFT_FEATURE_NAMES.index("code_ran")] = float(s["label"] if tells else rng.random() < 0.5)
            s["draft_features"] = d
    specs = {"safe": WorkloadSpec(("safe",), draft=False, kappa_alone=True), "risky": WorkloadSpec(("risky",))}
    p, report = train(traces, num_rounds=30, openings=openings, workloads=specs, cost=CostTarget())
    safe, risky = p.workloads
    assert safe.draft is None and report["workloads"]["safe"]["draft_stage"] == "off: the workload is not drafted"
    assert safe.kappa.cost is None and risky.kappa.cost is not None
    assert risky.draft is not None and risky.draft.band > 0 and risky.draft is not p.draft
    kappa_only = report["workloads"]["risky"]["cost_calibration"]["chosen"]
    assert report["workloads"]["risky"]["est_local_share"] > kappa_only["est_local_share"] + 0.1
    assert report["workloads"]["risky"]["est_accuracy"] >= report["workloads"]["risky"]["llm_accuracy"] - 0.03


def test_workloads_must_cover_every_traced_family_once():
    traces, openings = workload_traces()
    assert workload_families(traces, {"all": WorkloadSpec(("*",))})["all"].families == ("risky", "safe")
    with pytest.raises(UsageError, match="'risky' is in no workload"):
        workload_families(traces, {"a": WorkloadSpec(("safe",))})
    with pytest.raises(UsageError, match="more than one"):
        workload_families(traces, {"a": WorkloadSpec(("*",)), "b": WorkloadSpec(("risky",))})
    with pytest.raises(UsageError, match="matches none"):
        workload_families(traces, {"a": WorkloadSpec(("*",)), "c": WorkloadSpec(("mmlu",))})
    with pytest.raises(UsageError, match="familiarity check, which has no tasks of"):
        train(traces, num_rounds=5, openings={k: v for k, v in openings.items() if not k.startswith("risky")},
              workloads={"a": WorkloadSpec(("safe",)), "b": WorkloadSpec(("risky",))})


def test_the_cli_refuses_a_malformed_workload_in_one_line(tmp_path):
    from tests.test_cli import hera

    traces, _ = workload_traces()
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in traces))
    for spec in (["nofamilies"], ["=safe"], ["a=safe", "--workload", "a=risky"], ["a=*:no-such-option"]):
        proc = hera("train", str(path), "--workload", *spec, "--out", str(tmp_path / "p.json"))
        err = proc.stderr.strip()
        assert proc.returncode == 2 and "--workload" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("workload", ["bfcl", "workflows"])
def test_the_shipped_predictors_replay_gives_the_committed_results(workload, tmp_path, monkeypatch):
    """bench/eval/shared/replay.py, offline from the committed caches: the shipped predictor on the
    workload's test tasks beside the workload's own predictor gives replay.json's figures exactly
    (accuracies, costs, shares and paired intervals), so the docs' table is what this tree does."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("shared_replay", root / "bench" / "eval" / "shared" / "replay.py")
    replay = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "shared_replay", replay)  # (its dataclass looks its module up)
    spec.loader.exec_module(replay)
    monkeypatch.setattr(replay, "WORK", tmp_path)  # its own copy of the committed cache
    w = replay.WORKLOADS[workload]
    if w.config:  # the workflow settings name their models' folder relative to the repository root
        monkeypatch.chdir(root)
    measured = run(replay.replay(workload, w, True, replay.SHIPPED))
    assert json.loads(json.dumps(measured)) == json.loads((root / "bench/eval/shared/replay.json").read_text())[workload]


def test_the_estimated_curve_sweeps_the_workloads_own_kappa():
    """`hera eval`'s estimated curve over one workload's traces sweeps that workload's kappa (its
    cost weight), not the pooled one's."""
    from dataclasses import replace

    from hera_core.offline.report import estimated_curve
    from hera_core.offline.training import estimate, step_probs

    traces, openings = workload_traces()
    p, _ = train(traces, num_rounds=20, openings=openings, cost=CostTarget(),
                 workloads={"a": WorkloadSpec(("safe",)), "b": WorkloadSpec(("risky",))})
    risky = [t for t in traces if t["family"] == "risky" and t["split"] == "val"]
    own = p.workloads[1].kappa
    curve = estimated_curve(risky, p)
    probs = step_probs(p, risky)
    pooled = []
    for point in curve:
        est = estimate(risky, probs, replace(own, base=point["threshold_base"]))
        assert (point["accuracy"], point["local_share"]) == (est.accuracy, est.local_share)
        pooled.append(estimate(risky, probs, replace(p.kappa, base=point["threshold_base"])).local_share)
    assert pooled != [point["local_share"] for point in curve]  # (the pooled kappa's curve is another)
