"""Learning from served traffic without ground truth: agreement labels, the trace store, the
retrained and conservatively calibrated predictor, versions, and the audit's rollback."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from hera_core.checks.agreement import normalize_value, step_agreement, token_f1, values_agree
from hera_core.routing.learning import (NO_LOCAL, AuditMonitor, NotEnoughLabels, PredictorVersions,
                                        calibrate_on_labels, label_pending, learn, trace_row, wilson_bounds)
from hera_core.routing.predictor import FEATURE_NAMES, Kappa, Predictor
from hera_core.routing.traces import TraceStore

# -- agreement labels ------------------------------------------------------------------------------


def test_tool_calls_agree_on_names_and_json_equal_arguments():
    a = [{"function": {"name": "get_price", "arguments": '{"item": "apple", "qty": 3}'}}]
    b = [{"function": {"name": "get_price", "arguments": '{"qty": 3, "item": "apple"}'}}]
    c = [{"function": {"name": "get_price", "arguments": '{"qty": 4, "item": "apple"}'}}]
    assert step_agreement("", "", "", cloud_calls=a, draft_calls=b).substitutable
    assert not step_agreement("", "", "", cloud_calls=a, draft_calls=c).substitutable
    no_call = step_agreement("", "", "The price is 3.", cloud_calls=a, draft_calls=None)
    assert not no_call.substitutable and no_call.rule == "tool_calls"


def test_programs_agree_on_what_they_print():
    cloud = "```python\nprint(sum([4, 8]) * 2)\n```"
    same = "```python\nx = 4 + 8\nprint(x * 2)\n```"
    other = "```python\nprint(4 + 8 * 2)\n```"
    assert step_agreement("q", cloud, same).substitutable
    a = step_agreement("q", cloud, other)
    assert not a.substitutable and a.rule == "program"
    broken = "```python\nprint(undefined_name)\n```"
    assert not step_agreement("q", broken, broken).substitutable  # both fail: no evidence of agreement


def test_functions_agree_on_the_prompts_examples():
    prompt = 'def add(a, b):\n    """\n    >>> add(1, 2)\n    3\n    >>> add(-1, 1)\n    0\n    """\n'
    cloud = "```python\ndef add(a, b):\n    return a + b\n```"
    same = "```python\ndef add(x, y):\n    return sum((x, y))\n```"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    assert step_agreement(prompt, cloud, same).substitutable
    assert not step_agreement(prompt, cloud, wrong).substitutable


def test_values_agree_after_normalising():
    assert step_agreement("", "ANSWER: 1,234", "1234").substitutable
    assert step_agreement("", "The correct option is C. Because ...", "ANSWER: C").substitutable
    assert step_agreement("", "```python\nprint(19)\n```", "ANSWER: 19").substitutable
    assert not step_agreement("", "ANSWER: 19", "ANSWER: 20").substitutable
    assert not step_agreement("", "ANSWER: 19", "Let me think about this problem step by step first.").substitutable
    assert normalize_value(" $1,000. ") == "1000"
    assert normalize_value("a, b,  c") == "a,b,c"


def test_a_result_stated_in_a_sentence_or_another_format_agrees():
    assert values_agree("13", "The number of 1 bits in the binary representation of 1120951905 is 13.")
    assert values_agree("decline, work, codes", "['decline', 'work', 'codes']")
    assert values_agree('["he","mr","silent"]', "he,mr,silent")
    assert not values_agree("3", "The count is 13")  # a token, not a substring
    assert not values_agree("-5", "The result is 5")  # the sign is part of the value
    assert not values_agree("not,of,date,so", "['so','of','date','not']")  # another order is another answer
    assert not values_agree("b, c", "a, b, c")  # a list missing an item is another answer
    assert not values_agree(None, "13")
    code = "```python\nprint(f'The number of 1 bits is {bin(1120951905).count(\"1\")}.')\n```"
    assert step_agreement("", "```python\nprint(bin(1120951905).count('1'))\n```", code).substitutable


def test_free_text_agrees_by_token_overlap():
    text = "the meeting is moved to thursday afternoon in room four because of the fire drill"
    assert step_agreement("", text, text.replace("because of", "due to")).rule == "text"
    assert step_agreement("", text, text + " today").substitutable
    assert not step_agreement("", text, "I cannot help with scheduling requests of this kind at all").substitutable
    assert token_f1("a b", "") == 0.0


# -- the trace store -------------------------------------------------------------------------------

def row(store_kind="shadow", step=0, features=None, cloud="ANSWER: 4", draft="ANSWER: 4", system="agent A"):
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "What is 2 + 2?"}]
    feats = np.zeros(len(FEATURE_NAMES), dtype=np.float32) if features is None else features
    return trace_row(store_kind, session="s1", step=step, messages=messages, features=feats, version="v0",
                     cloud=(cloud, None), draft=(draft, None))


def test_trace_store_is_bounded_private_and_labels_rows(tmp_path):
    path = tmp_path / "traces.sqlite"
    with TraceStore(path, max_rows=5) as store:
        ids = [store.add(row(draft="ANSWER: 4" if i % 2 else "ANSWER: 5")) for i in range(8)]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        kept = store.rows()
        assert [r.id for r in kept] == ids[-5:]  # the oldest went first
        assert store.count(labelled=False) == 5
        assert label_pending(store) == 5
        labels = {r.id: (r.label, r.rule) for r in store.rows(labelled=True)}
        assert labels == {i: (int(i % 2 == 0), "value") for i in ids[-5:]}  # ids start at 1: odd i -> even id
        assert store.count(labelled=False) == 0
    with pytest.raises(ValueError):
        TraceStore(tmp_path / "x.sqlite", max_rows=0)


def test_trace_rows_cluster_by_agent_and_need_full_features():
    a, b = row(system="agent A"), row(system="agent B")
    assert a.cluster != b.cluster and a.cluster == row(system="agent A").cluster
    with pytest.raises(ValueError, match="full feature row"):
        row(features=np.zeros(3))


# -- calibration by a confidence bound --------------------------------------------------------------

def test_wilson_bounds():
    lo, hi = wilson_bounds(8, 10, 1.96)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson_bounds(0, 0, 1.96) == (0.0, 1.0)


def test_few_labels_keep_nothing_local():
    kappa = Kappa(base=0.6, per_step=0.0)
    p = np.asarray([0.9, 0.95, 0.8])
    cal = calibrate_on_labels(p, np.zeros(3), np.ones(3), kappa, target=0.9, z=1.645)
    assert cal.base == NO_LOCAL and cal.local == 0  # 3 of 3 agree, but the bound is far below 0.9


def test_many_agreeing_labels_lower_the_threshold():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=400)
    labels = (rng.uniform(size=400) < np.where(p > 0.5, 0.99, 0.3)).astype(np.float32)
    cal = calibrate_on_labels(p, np.zeros(400), labels, Kappa(base=0.6, per_step=0.0), target=0.9, z=1.645)
    assert cal.base != NO_LOCAL and cal.lower_bound >= 0.9
    local = p >= cal.base
    assert labels[local].mean() >= 0.9 and local.sum() == cal.local


def synthetic_store(tmp_path, n, agree_if_high=True, seed=0):
    """Rows whose first feature (entropy) decides agreement: low entropy, the SLM agrees."""
    rng = np.random.default_rng(seed)
    store = TraceStore(tmp_path / f"t{n}-{seed}.sqlite")
    for _ in range(n):
        feats = rng.uniform(size=len(FEATURE_NAMES)).astype(np.float32)
        agrees = (feats[0] < 0.5) == agree_if_high
        store.add(row(features=feats, draft="ANSWER: 4" if agrees else "ANSWER: 5"))
    label_pending(store)
    return store


def test_learn_needs_labels_then_keeps_only_agreeing_steps_local(tmp_path):
    base = Predictor.load()
    with pytest.raises(NotEnoughLabels, match="at least 30"):
        learn(synthetic_store(tmp_path, 10), base)
    predictor, report = learn(synthetic_store(tmp_path, 400), base, target=0.9)
    assert report["ground_truth_labels_used"] == 0 and report["note"] == "ok"
    assert report["agreement_lower_bound"] >= 0.9 and report["held_out_local_share"] > 0.3
    rng = np.random.default_rng(1)
    X = rng.uniform(size=(200, len(FEATURE_NAMES))).astype(np.float32)
    kept = predictor.predict(X) >= predictor.kappa(0)
    assert kept.any() and (X[kept, 0] < 0.5).mean() >= 0.9  # what it keeps local is what agrees
    messages = [{"role": "system", "content": "agent A"}, {"role": "user", "content": "What is 2 + 2?"}]
    assert predictor.familiarity.familiar(messages)  # the served agent is now familiar
    assert not predictor.familiarity.familiar([{"role": "user", "content": "Translate this poem into French"}])


def test_out_of_fold_calibration_uses_every_label(tmp_path):
    """With few labels, calibrating on the held-out share alone cannot reach the bound; scoring every
    labelled row out of fold can, and what it keeps local still agrees."""
    base = Predictor.load()
    store = synthetic_store(tmp_path, 120)
    _, held = learn(store, base, target=0.9, folds=0)
    predictor, oof = learn(store, base, target=0.9, folds=5)
    assert held["held_out_steps"] == 36 and oof["held_out_steps"] == 120
    assert held["held_out_local_share"] < oof["held_out_local_share"]
    assert oof["agreement_lower_bound"] >= 0.9 and oof["note"] == "ok"
    X = np.random.default_rng(2).uniform(size=(300, len(FEATURE_NAMES))).astype(np.float32)
    kept = predictor.predict(X) >= predictor.kappa(0)
    assert kept.any() and (X[kept, 0] < 0.5).mean() >= 0.9


def test_versions_promote_and_roll_back(tmp_path):
    base = Predictor.load()
    versions = PredictorVersions(tmp_path / "predictors", base)
    assert versions.current == "v0" and versions.versions() == ["v0"]
    predictor, _ = learn(synthetic_store(tmp_path, 200), base)
    assert versions.promote(predictor) == "v1" and versions.current == "v1"
    assert versions.load().meta["version"] == "v1"
    assert versions.rollback() == "v0" and versions.load().kappa == base.kappa
    assert versions.rollback() == "v0"  # v0 is the floor
    assert not list((tmp_path / "predictors").glob(".*"))  # no temp file left behind
    json.loads((tmp_path / "predictors" / "v1.json").read_text())


def test_audit_rolls_back_an_injected_regression_within_bounded_audits():
    monitor = AuditMonitor(target=0.9, z=1.645, min_audits=5)
    assert not any(monitor.record("v1", True) for _ in range(100))  # a good version is never rolled back
    audits = 0
    while True:  # the cloud's answers change: kept-local steps now disagree
        audits += 1
        if monitor.record("v2", False):
            break
        assert audits < 20
    assert audits == 5  # min_audits: 0 of 5 agree, upper bound 0.35 < 0.9
    mixed = AuditMonitor(target=0.9, min_audits=5)
    steps = [mixed.record("v3", i % 2 == 0) for i in range(40)]  # 50% agreement
    assert any(steps) and steps.index(True) < 20
    assert monitor.summary()["v2"]["agreement"] == 0.0


# -- the live loop ---------------------------------------------------------------------------------

def live(tmp_path, **kw):
    from hera_core.config import LearningSettings
    from hera_core.routing.learning import LiveLearner

    settings = LearningSettings(**{"min_labels": 30, **kw})
    return LiveLearner(settings, tmp_path / "learn", Predictor.load())


def feature_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(n, len(FEATURE_NAMES))).astype(np.float32)


def test_live_loop_retrains_every_n_labels_and_swaps_in_the_new_version(tmp_path):
    learner = live(tmp_path, retrain_every=150)
    events = []
    for feats in feature_rows(150):
        agrees = feats[0] < 0.5
        events.append(learner.add(row(features=feats, draft="ANSWER: 4" if agrees else "ANSWER: 5")))
    assert events[:-1] == [None] * 149
    assert events[-1] is not None and events[-1].version == "v1" and learner.versions.current == "v1"
    assert events[-1].predictor.meta["version"] == "v1"
    assert learner.status()["labelled_steps"] == 150 and learner.learned()


def test_live_loop_rolls_back_when_audits_disagree(tmp_path):
    learner = live(tmp_path, min_audits=5, target_agreement=0.9)
    for feats in feature_rows(200):
        learner.store.add(row(features=feats, draft="ANSWER: 4" if feats[0] < 0.5 else "ANSWER: 5"))
    assert learner.learn_now().version == "v1"
    # The cloud changed its answers: kept-local steps audited under v1 now disagree.
    for i in range(20):
        audit = row(store_kind="audit", cloud="ANSWER: 7", draft="ANSWER: 4")
        audit.predictor_version = "v1"
        event = learner.add(audit)
        if event is not None:
            break
    assert i == 4 and event.version == "v0" and "below the target" in event.reason
    assert learner.versions.current == "v0" and learner.status()["events"][-1]["event"] == "rolled back"


def test_a_retrain_that_keeps_nothing_local_does_not_replace_a_version_that_holds(tmp_path):
    """New labels come mostly from cloud-routed (harder) steps once a version keeps steps local: a
    retrain on them alone that keeps nothing local is not promoted over a version whose audits do
    not argue against it; it is once they do, and `hera learn` (learn_now) always promotes."""
    learner = live(tmp_path, retrain_every=60, target_agreement=0.9)
    for feats in feature_rows(200):
        learner.store.add(row(features=feats, draft="ANSWER: 4" if feats[0] < 0.5 else "ANSWER: 5"))
    assert learner.learn_now().version == "v1" and learner.predictor().kappa.base < NO_LOCAL
    for feats in feature_rows(60, seed=1):  # the skewed sample: every new step disagrees
        event = learner.add(row(features=feats, draft="ANSWER: 5"))
    assert event is None and learner.versions.current == "v1"
    assert learner.status()["events"][-1]["event"] == "not promoted"
    audit = row(store_kind="audit", cloud="ANSWER: 7", draft="ANSWER: 4")  # v1's audits now argue against it
    audit.predictor_version = "v1"
    learner.add(audit)
    for feats in feature_rows(59, seed=2):
        event = learner.add(row(features=feats, draft="ANSWER: 5"))
    assert event is not None and event.version == "v2" and learner.predictor().kappa.base >= NO_LOCAL


def test_learn_now_says_when_labels_are_too_few(tmp_path):
    learner = live(tmp_path)
    learner.store.add(row())
    with pytest.raises(NotEnoughLabels, match="1 labelled steps"):
        learner.learn_now()
    assert learner.versions.current == "v0"


def test_hera_learn_command_trains_shows_and_rolls_back(tmp_path, capfd):
    from hera_core.cli import main

    folder = tmp_path / "learning"
    store = TraceStore(folder / "traces.sqlite")
    for feats in feature_rows(200, seed=3):
        store.add(row(features=feats, draft="ANSWER: 4" if feats[0] < 0.5 else "ANSWER: 5"))
    store.close()  # unlabelled: `hera learn` labels them first
    assert main(["learn", "--folder", str(folder)]) == 0
    assert "now using predictor v1" in capfd.readouterr().out
    assert main(["learn", "status", "--folder", str(folder)]) == 0
    status = json.loads(capfd.readouterr().out)
    assert status["current"] == "v1" and status["labelled_steps"] == 200
    assert status["learned"]["v1"]["ground_truth_labels_used"] == 0
    assert main(["learn", "rollback", "--folder", str(folder)]) == 0
    assert "now using predictor v0" in capfd.readouterr().out
    assert main(["learn", "--folder", str(tmp_path / "empty")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0 labelled steps" in err[0]
