import json

import numpy as np
import pytest

from hera_core.errors import ConfigError
from hera_core.routing.policy import Override, Route, decide
from hera_core.routing.predictor import FEATURE_NAMES, FEATURE_SCHEMA, Kappa, Predictor
from hera_core.offline.training import CostTarget, auc, calibrate, train
from tests.factories import random_predictor, trace


def test_paper_kappa_grows_with_position_and_saturates():
    k = Kappa()
    assert [round(k(i), 2) for i in range(8)] == [0.6, 0.62, 0.64, 0.66, 0.68, 0.7, 0.7, 0.7]


def test_predictor_round_trips_and_matches_xgboost(tmp_path):
    import xgboost as xgb

    p = random_predictor(kappa=Kappa(0.5, 0.03, 4))
    path = tmp_path / "p.json"
    p.save(path)
    q = Predictor.load(path)
    assert q.kappa == Kappa(0.5, 0.03, 4)
    X = np.random.default_rng(1).normal(size=(32, len(FEATURE_NAMES))).astype(np.float32)
    ref = xgb.Booster(model_file=bytearray(p.model_json)).inplace_predict(X)
    np.testing.assert_allclose(q.predict(X), ref, atol=1e-6)


def test_schema_mismatch_is_an_error_not_a_wrong_answer(tmp_path):
    path = tmp_path / "p.json"
    d = random_predictor().to_dict()
    for bad in ("hera-features-v0", ["hera-features-v3"], None):
        d["schema"] = bad
        path.write_text(json.dumps(d))
        with pytest.raises(ConfigError, match="retrain"):
            Predictor.load(path)
    d["schema"] = FEATURE_SCHEMA
    d["feature_names"] = d["feature_names"][:-1]
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="features"):
        Predictor.load(path)
    with pytest.raises(ConfigError, match="does not exist"):
        Predictor.load(tmp_path / "nope.json")
    path.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Predictor.load(path)


def test_wrong_feature_width_is_a_value_error():
    with pytest.raises(ValueError, match="features must be"):
        random_predictor().predict(np.zeros((2, 3), dtype=np.float32))


def test_shipped_predictor_loads_with_a_calibrated_threshold():
    p = Predictor.load()
    assert 0.0 <= p.kappa.base <= 1.01
    assert p.meta["train_rows"] > 0 and "auc_val" in p.meta
    out = p.predict(np.zeros((3, len(FEATURE_NAMES)), dtype=np.float32))
    assert out.shape == (3,) and np.all((out >= 0) & (out <= 1))


def test_policy_overrides_and_threshold():
    assert decide(0.9, 0.6).route is Route.LOCAL
    assert decide(0.5, 0.6).route is Route.CLOUD
    assert decide(0.1, 0.6, Override.LOCAL_ONLY).route is Route.LOCAL  # confidential stays local
    assert decide(0.99, 0.6, Override.CLOUD_ONLY).route is Route.CLOUD
    d = decide(0.99, 0.6, local_can_serve=False)
    assert d.route is Route.CLOUD and d.reason == "cannot-serve-locally"


def test_auc_matches_definition():
    y = np.array([0, 0, 1, 1], dtype=np.float32)
    assert auc(y, np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert np.isnan(auc(np.ones(3, dtype=np.float32), np.ones(3)))


def test_training_learns_the_signal_and_calibrates_within_the_drop():
    rng = np.random.default_rng(0)
    traces = []
    for i in range(120):
        split = "train" if i < 80 else "val"
        f0 = rng.normal(size=2)
        labels = [int(x > 0) for x in f0]  # feature 0 says whether the SLM is good enough
        traces.append(trace(f"t{i}", split, 1.0, labels, list(f0)))
    predictor, report = train(traces, max_drop=0.03, num_rounds=30)
    assert report["auc_val"] > 0.9
    cal = report["calibration"]
    assert cal["est_accuracy"] >= cal["llm_accuracy"] - 0.03
    assert cal["est_local_share"] > 0.2  # it keeps the steps it can keep


def test_the_draft_stage_learns_what_the_prefill_cannot_see(tmp_path):
    """Labels that only the draft's checks reveal (the prefill features are noise): the second
    stage learns them, calibration opens a drafting band because it keeps more steps local at
    the same estimated accuracy, and the stage survives a save and load."""
    from hera_core.checks.drafts import DRAFT_FEATURE_NAMES
    from hera_core.routing.predictor import Predictor

    rng = np.random.default_rng(1)
    traces = []
    for i in range(200):
        labels = [int(rng.random() < 0.6), int(rng.random() < 0.6)]
        t = trace(f"t{i}", "train" if i < 140 else "val", 1.0, labels, list(rng.normal(size=2)))
        for s, label in zip(t["steps"], labels):
            d = [0.0] * len(DRAFT_FEATURE_NAMES)
            d[DRAFT_FEATURE_NAMES.index("code_ran")] = float(label if rng.random() < 0.95 else 1 - label)
            s["draft_features"] = d
        traces.append(t)
    predictor, report = train(traces, max_drop=0.03, num_rounds=30)
    stage = report["draft_stage"]
    assert report["auc_val"] < 0.7 < 0.85 < stage["auc_val"]
    assert stage["band"] > 0 and stage["calibration"]["est_local_share"] > report["calibration"]["est_local_share"]
    assert stage["calibration"]["est_accuracy"] >= stage["calibration"]["llm_accuracy"] - 0.03
    predictor.save(tmp_path / "p.json")
    loaded = Predictor.load(tmp_path / "p.json")
    assert (loaded.draft.band, loaded.draft.keep_threshold) == (predictor.draft.band, predictor.draft.keep_threshold)
    X = np.asarray([s["features"] + s["draft_features"] for s in traces[-1]["steps"]], dtype=np.float32)
    np.testing.assert_allclose(loaded.draft.predict(X), predictor.draft.predict(X), rtol=1e-6)


def test_the_vote_stage_is_calibrated_with_kappa_when_the_votes_tell(tmp_path):
    """First-step labels only the samples' agreement reveals (the prefill is noise there): the
    vote stage is chosen because it keeps more steps local within the drop, its share threshold
    separates the two kinds of first steps, and it survives a save and load; votes that say
    nothing leave the predictor without one."""
    from hera_core.offline.training import FirstStepVote
    from hera_core.routing.predictor import Predictor

    rng = np.random.default_rng(2)
    traces, votes, noise = [], {}, {}
    for i in range(300):
        labels = [int(rng.random() < 0.6), 1]
        f0 = [float(rng.normal()), 3.0]  # the second step is plainly local, the first is noise
        traces.append(trace(f"t{i}", "train" if i < 200 else "val", 1.0, labels, f0))
        good = labels[0] == 1
        votes[f"t{i}"] = FirstStepVote(True, "out:1", ["out:1"] * 4 if good else ["out:1", "out:2", "out:2", "out:3"])
        noise[f"t{i}"] = FirstStepVote(True, "out:1", ["out:1", "out:1"] + ["out:2"] * 2)
    predictor, report = train(traces, max_drop=0.03, num_rounds=30, votes=votes)
    chosen = report["vote_stage"]["chosen"]
    assert predictor.vote is not None and predictor.vote.k == 4 and predictor.vote.min_share > 0.25
    assert chosen["est_local_share"] > report["vote_stage"]["first_stage_alone"]["est_local_share"]
    assert chosen["est_accuracy"] >= report["vote_stage"]["llm_accuracy"] - 0.03
    assert predictor.kappa.base == chosen["kappa_base"] == predictor.meta["kappa"]["base"]
    predictor.save(tmp_path / "p.json")
    assert Predictor.load(tmp_path / "p.json").vote == predictor.vote
    plain, report = train(traces, max_drop=0.03, num_rounds=30, votes=noise)
    assert plain.vote is None and report["vote_stage"]["chosen"] is None
    with pytest.raises(ValueError, match="min_share"):
        from hera_core.routing.predictor import VoteStage

        VoteStage(steps=1, k=4, min_share=0.25)  # a kept draft might not be the majority answer


def test_a_draft_stage_with_other_features_is_refused(tmp_path):
    import json

    from hera_core.errors import ConfigError
    from hera_core.routing.predictor import Predictor
    from tests.factories import constant_draft_stage

    p = random_predictor()
    p.draft = constant_draft_stage(keep=True)
    d = p.to_dict()
    d["draft_stage"]["feature_names"] = d["draft_stage"]["feature_names"][:-1]
    (tmp_path / "p.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="draft stage"):
        Predictor.load(tmp_path / "p.json")


def test_calibration_falls_back_to_all_cloud_when_nothing_is_safe():
    traces = [trace(f"t{i}", "val", 1.0, [0, 0], [0.0, 0.0]) for i in range(5)]
    kappa, est = calibrate(traces, random_predictor(), max_drop=0.0)
    assert est.local_share == 0.0 and est.accuracy == 1.0


def test_training_on_a_dask_cluster_gives_a_working_predictor():
    """`hera train --dask ADDRESS`: the same model through xgboost's Dask interface (LocalCluster)."""
    from distributed import Client, LocalCluster

    rng = np.random.default_rng(1)
    traces = []
    for i in range(60):
        f0 = rng.normal(size=2)
        traces.append(trace(f"t{i}", "train" if i < 40 else "val", 1.0, [int(x > 0) for x in f0], list(f0)))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        predictor, report = train(traces, num_rounds=20, dask_client=client)
    assert report["auc_val"] > 0.9
    assert predictor.predict(np.zeros((2, len(FEATURE_NAMES)), dtype=np.float32)).shape == (2,)


# --- the tool features (schema v2) and v1 predictor files ----------------------------------------
def test_tool_features_tell_where_a_step_stands_in_a_tool_loop():
    from hera_core.backends.tools import ToolSet
    from hera_core.routing.predictor import TOOL_FEATURE_NAMES, tool_features

    tools = ToolSet.parse([{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
                           for n in ("add", "mul", "div")], tool_choice="required")
    assert tools is not None
    ask = [{"role": "user", "content": "1234 + 4321?"}]
    called = ask + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "div", "arguments": "{}"}}]}]
    failed = called + [{"role": "tool", "tool_call_id": "c1", "content": "Error: division by zero"}]
    worked = called + [{"role": "tool", "tool_call_id": "c1", "content": "5555"}]
    f = {name: i for i, name in enumerate(TOOL_FEATURE_NAMES)}
    assert tool_features(ask, None) == [0.0] * len(TOOL_FEATURE_NAMES)
    first = tool_features(ask, tools)
    assert first[f["tools_offered"]] == 3 and first[f["tool_choice_forced"]] == 1 and first[f["after_tool_result"]] == 0
    bad, good = tool_features(failed, tools), tool_features(worked, tools)
    assert bad[f["tool_results"]] == good[f["tool_results"]] == 1
    assert bad[f["after_tool_result"]] == good[f["after_tool_result"]] == 1
    assert bad[f["last_tool_error"]] == 1 and good[f["last_tool_error"]] == 0
    none = ToolSet.parse(list(tools.tools), tool_choice="none")
    assert tool_features(ask, none)[f["tools_offered"]] == 0  # offered but not to be called


def test_a_v1_predictor_file_reads_its_seven_features_out_of_the_v2_row(tmp_path):
    """A predictor trained before the tool features (the shipped one is) predicts from the current
    row exactly what its model gives on the seven columns it knows; saved again, it stays v1."""
    import xgboost as xgb

    from hera_core.routing.predictor import V1_FEATURE_NAMES, V1_SCHEMA

    rng = np.random.default_rng(3)
    X7 = rng.normal(size=(200, len(V1_FEATURE_NAMES))).astype(np.float32)
    y = (X7[:, 1] > 0).astype(np.float32)
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 3, "nthread": 1}, xgb.DMatrix(X7, label=y), 8)
    v1 = Predictor(model_json=bytes(booster.save_raw("json")), feature_names=V1_FEATURE_NAMES)
    path = tmp_path / "v1.json"
    v1.save(path)
    assert json.loads(path.read_text())["schema"] == V1_SCHEMA
    q = Predictor.load(path)
    X = rng.normal(size=(16, len(FEATURE_NAMES))).astype(np.float32)  # what the runtime computes now
    np.testing.assert_allclose(q.predict(X), booster.inplace_predict(np.ascontiguousarray(X[:, :7])), atol=1e-6)
    assert Predictor.load().feature_names  # the shipped file loads, whichever schema it has


def test_v1_traces_are_upgraded_with_the_tool_features(tmp_path):
    from hera_core.offline.workloads import tool_tasks as tasks
    from hera_core.offline.profiling import load_traces
    from hera_core.routing.predictor import TOOL_FEATURE_NAMES, V1_FEATURE_NAMES

    task = tasks("bfcl_multiple")[0]
    v1 = [{"task_id": "t0", "family": "gsm_symbolic", "split": "train", "llm_correct": 1.0, "llm_steps": 2,
           "schema": "hera-features-v1", "feature_names": list(V1_FEATURE_NAMES),
           "steps": [{"step": k, "features": [0.5] * 7, "label": 1} for k in range(2)]},
          {"task_id": task.task_id, "family": "bfcl_multiple", "split": "train", "llm_correct": 1.0, "llm_steps": 1,
           "schema": "hera-features-v1", "feature_names": list(V1_FEATURE_NAMES),
           "steps": [{"step": 0, "features": [0.5] * 7, "label": 0}]}]
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in v1))
    gsm, bfcl = load_traces(path)
    assert all(s["features"] == [0.5] * 7 + [0.0] * len(TOOL_FEATURE_NAMES) + [0.0] for s in gsm["steps"])
    offered = bfcl["steps"][0]["features"][FEATURE_NAMES.index("tools_offered")]
    assert offered == len(task.entry["functions"]) > 1 and gsm["schema"] == bfcl["schema"] == FEATURE_SCHEMA


def test_v2_traces_and_predictors_are_read_with_the_answer_schema_size(tmp_path):
    """v2 (before the answer schema's size): its traces gain a 0 (no profiled task asks for a
    structured answer), its predictor files read their twelve columns out of today's row."""
    import xgboost as xgb

    from hera_core.offline.profiling import load_traces
    from hera_core.routing.predictor import V2_FEATURE_NAMES, V2_SCHEMA

    v2 = {"task_id": "t0", "family": "gsm_symbolic", "split": "train", "llm_correct": 1.0, "llm_steps": 1,
          "schema": V2_SCHEMA, "feature_names": list(V2_FEATURE_NAMES),
          "steps": [{"step": 0, "features": [0.5] * len(V2_FEATURE_NAMES), "label": 1}]}
    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps(v2) + "\n")
    (t,) = load_traces(path)
    assert t["schema"] == FEATURE_SCHEMA and t["steps"][0]["features"] == [0.5] * len(V2_FEATURE_NAMES) + [0.0]

    rng = np.random.default_rng(4)
    X12 = rng.normal(size=(200, len(V2_FEATURE_NAMES))).astype(np.float32)
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 3, "nthread": 1},
                        xgb.DMatrix(X12, label=(X12[:, 2] > 0).astype(np.float32)), 8)
    Predictor(model_json=bytes(booster.save_raw("json")), feature_names=V2_FEATURE_NAMES).save(tmp_path / "v2.json")
    assert json.loads((tmp_path / "v2.json").read_text())["schema"] == V2_SCHEMA
    q = Predictor.load(tmp_path / "v2.json")
    X = rng.normal(size=(16, len(FEATURE_NAMES))).astype(np.float32)
    np.testing.assert_allclose(q.predict(X), booster.inplace_predict(np.ascontiguousarray(X[:, :12])), atol=1e-6)


def test_the_answer_schema_size_is_a_feature():
    """A structured step's row carries its schema's size (properties at every depth); a step
    without one, 0; training on steps whose label depends only on it ranks them by it."""
    from hera_core.backends.structured import ResponseFormat
    from hera_core.routing.predictor import structure_features
    import xgboost as xgb

    nested = {"type": "object", "properties": {"a": {"type": "string"}, "b": {
        "type": "array", "items": {"type": "object", "properties": {"c": {"type": "integer"}, "d": {"enum": ["x"]}}}}},
        "$defs": {"e": {"type": "object", "properties": {"f": {"type": "number"}}}}}
    fmt = ResponseFormat.parse({"type": "json_schema", "json_schema": {"name": "n", "schema": nested}})
    assert fmt.size == 5 and ResponseFormat.parse({"type": "json_object"}).size == 0
    odd = {"type": "object", "properties": {"properties": {"type": "string"}, "enum": {"type": "string"}},
           "anyOf": [{"properties": {"x": {"const": {"properties": {"no": 1}}}}}]}
    assert ResponseFormat.parse({"type": "json_schema", "json_schema": {"name": "o", "schema": odd}}).size == 3
    msgs = [{"role": "user", "content": "hi"}]
    col = FEATURE_NAMES.index("answer_schema_size") - 3
    assert structure_features(0, 5, msgs, None, fmt.size)[col] == 5.0 and structure_features(0, 5, msgs)[col] == 0.0
    rng = np.random.default_rng(5)
    X = rng.normal(size=(400, len(FEATURE_NAMES))).astype(np.float32)
    X[:, FEATURE_NAMES.index("answer_schema_size")] = rng.integers(0, 20, size=400)
    y = (X[:, FEATURE_NAMES.index("answer_schema_size")] < 8).astype(np.float32)  # small schemas: the SLM's
    model = bytes(xgb.train({"objective": "binary:logistic", "max_depth": 3, "nthread": 1},
                            xgb.DMatrix(X, label=y), 8).save_raw("json"))
    small, big = X.copy()[:50], X.copy()[:50]
    small[:, FEATURE_NAMES.index("answer_schema_size")] = 2
    big[:, FEATURE_NAMES.index("answer_schema_size")] = 15
    q = Predictor(model_json=model)
    assert (q.predict(small) > q.predict(big)).all()


def test_training_on_tool_traces_uses_the_tool_features():
    """Steps whose label depends only on how many tools were offered: the trained predictor ranks
    them by it (the v1 features alone could not)."""
    from tests.factories import trace

    idx = FEATURE_NAMES.index("tools_offered")
    traces = []
    for i in range(240):
        n_tools = 1 + i % 4
        t = trace(f"t{i}", ["train", "val", "test"][i % 3] if i >= 120 else "train", 1.0, [int(n_tools <= 2)], [0.0])
        t["steps"][0]["features"][idx] = float(n_tools)
        traces.append(t)
    predictor, _ = train(traces, num_rounds=20)
    assert predictor.meta["auc_val"] > 0.95 and tuple(predictor.feature_names) == FEATURE_NAMES


def test_the_policy_estimate_counts_a_step_the_slm_does_better():
    """With one step kept local the estimate is the outcome profiled for exactly that (it counts
    a task the SLM gets right and the LLM does not); with several, the conservative label rule."""
    from hera_core.offline.training import estimate_routes

    better = {"task_id": "a", "llm_correct": 0.0, "steps": [{"step": 0, "label": 1, "sub_correct": 1.0}]}
    worse = {"task_id": "b", "llm_correct": 1.0, "steps": [{"step": 0, "label": 0, "sub_correct": 0.0}]}
    two = {"task_id": "c", "llm_correct": 1.0, "steps": [{"step": 0, "label": 1, "sub_correct": 1.0},
                                                         {"step": 1, "label": 0, "sub_correct": 0.0}]}
    assert estimate_routes([better], [[True]], 0.5).accuracy == 1.0
    assert estimate_routes([better], [[False]], 0.5).accuracy == 0.0
    assert estimate_routes([worse], [[True]], 0.5).accuracy == 0.0
    assert estimate_routes([two], [[True, False]], 0.5).accuracy == 1.0
    assert estimate_routes([two], [[True, True]], 0.5).accuracy == 0.0


# --- one cloud budget across a task's steps ---------------------------------------------------------
def test_the_cost_weight_scales_a_steps_allowed_miss_by_its_expected_cloud_cost(tmp_path):
    from hera_core.routing.predictor import CostWeight

    w = CostWeight(gamma=1.0, out_tokens=(100.0, 10.0), ref_prompt_tokens=200.0, ref_out_tokens=50.0,
                   max_ratio=2.0, out_per_in=4.0)
    kappa = Kappa(0.9, 0.02, 5, w)
    # step 0: (200 + 4 * 100) / (200 + 4 * 50) = 1.5 times the average step's cost: misses 1.5x as often
    assert kappa.at(0, 200) == pytest.approx(1 - 0.10 * 1.5)
    # step 3 takes the last index's expected output: (400 + 4 * 10) / 400 = 1.1
    assert kappa.at(3, 400) == pytest.approx(1 - (1 - kappa(3)) * 1.1)
    # a prompt far longer than any training step's is weighed as the costliest one, not extrapolated
    assert kappa.at(0, 50_000) == pytest.approx(1 - 0.10 * 2.0)
    assert Kappa(0.9, 0.02, 5, CostWeight(0.0, (100.0,), 200.0, 50.0)).at(2, 5000) == pytest.approx(kappa(2))
    free = CostWeight(1.0, (100.0, 10.0), 200.0, 50.0, out_per_in=None)  # a free cloud: no step costs more
    assert Kappa(0.9, 0.02, 5, free).at(0, 5000) == pytest.approx(kappa(0))
    assert Kappa(1.01, 0.0, 5, w).at(0, 10_000) > 1.0  # the all-cloud sentinel stays all cloud
    predictor = random_predictor(kappa=kappa)
    predictor.save(tmp_path / "p.json")
    assert Predictor.load(tmp_path / "p.json").kappa == kappa
    good = (tmp_path / "p.json").read_text()
    for field, bad in (("gamma", -1), ("ref_prompt_tokens", float("nan")), ("out_tokens", "12"), ("max_ratio", None)):
        d = json.loads(good)
        d["kappa"]["cost_weight"][field] = bad
        (tmp_path / "p.json").write_text(json.dumps(d))
        with pytest.raises(ConfigError, match="cost weight is unreadable"):
            Predictor.load(tmp_path / "p.json")
    d["kappa"]["cost_weight"] = "high"
    (tmp_path / "p.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="cost weight is unreadable"):
        Predictor.load(tmp_path / "p.json")


def cost_traces(n: int = 400, seed: int = 3) -> list[dict]:
    """Two-step tasks whose first step costs the cloud ~7x the second (a long program vs a short
    answer) and whose prefill signal is noisy on both: where keeping a doubtful step local saves
    the most cloud cost is the first step."""
    rng = np.random.default_rng(seed)
    traces = []
    for i in range(n):
        f = rng.normal(size=2)
        labels = [int(x + rng.normal(scale=0.8) > -0.3) for x in f]
        t = trace(f"t{i}", "train" if i < n // 2 else "val", 1.0, labels, list(f))
        for s, prompt, out in zip(t["steps"], (120, 400), (300, 8)):
            s["features"][FEATURE_NAMES.index("prompt_tokens")] = float(prompt)
            s.update(prompt_tokens=prompt, llm_text="x" * (4 * out), slm_text="y" * (4 * out),
                     slm_completion_tokens=out)
        traces.append(t)
    return traces


def test_cost_aware_calibration_spends_the_cloud_budget_where_it_buys_most():
    """One trade-off across a task's steps: calibrated for the least cloud cost within the drop,
    it weighs the costly first steps (gamma > 0) and reaches the same estimated accuracy bar for
    less cloud cost than kappa alone; with a budget it stays within it at the best accuracy it
    can find, never below kappa alone's within the same budget."""
    traces = cost_traces()
    predictor, report = train(traces, max_drop=0.1, num_rounds=30, cost=CostTarget())
    cal = report["cost_calibration"]
    assert predictor.kappa.cost is not None and predictor.kappa.cost.gamma == cal["chosen"]["gamma"] > 0
    assert predictor.kappa.cost.out_tokens[:2] == pytest.approx((300, 8), abs=1)
    assert cal["chosen"]["est_accuracy"] >= cal["llm_accuracy"] - 0.1
    assert cal["chosen"]["est_cost_ratio"] < cal["kappa_alone"]["est_cost_ratio"] - 0.03
    assert report["kappa"]["cost_weight"]["gamma"] == cal["chosen"]["gamma"]
    budgeted, report = train(traces, num_rounds=30, cost=CostTarget(0.4))
    cal = report["cost_calibration"]
    assert cal["chosen"]["est_cost_ratio"] <= 0.4 and cal["objective"] == "max accuracy within budget"
    assert cal["chosen"]["est_accuracy"] > cal["kappa_alone"]["est_accuracy"] + 0.02
    with pytest.raises(ValueError, match="cloud budget"):
        train(traces, num_rounds=5, cost=CostTarget(1.5))
    strict, report = train(traces, max_drop=-0.5, num_rounds=5, cost=CostTarget())  # nothing is that safe: all cloud
    assert strict.kappa.base > 1.0 and report["cost_calibration"]["chosen"]["est_cost_ratio"] == 1.0
    plain, report = train(traces, max_drop=0.03, num_rounds=30)
    assert plain.kappa.cost is None and "cost_calibration" not in report
