"""The familiarity check: steps unlike every training task are told apart, and the runtime
distrusts the predictor on them as configured."""

import json

import numpy as np
import pytest

from hera_core.errors import ConfigError
from hera_core.offline.harness import first_messages
from hera_core.offline.workloads import load_jsonl_tasks, make_tasks
from hera_core.routing.familiarity import fit_familiarity, opening_text
from hera_core.routing.policy import Route
from hera_core.routing.predictor import Kappa, Predictor
from tests.conftest import run
from tests.factories import random_predictor
from tests.test_runtime import runtime  # noqa: F401  (fixture)

FAMILIES = ["basic_arithmetic", "letter_counting", "word_sorting", "gsm_symbolic"]


def openings(split, per_family):
    return [(t.family, opening_text(first_messages(t))) for t in make_tasks(FAMILIES, per_family=per_family, split=split)]


@pytest.fixture(scope="module")
def fam():
    return fit_familiarity(openings("train", 20), openings("val", 10))


def test_held_out_tasks_of_the_training_families_are_familiar(fam):
    test = openings("test", 10)
    share = np.mean([fam.familiar([{"role": "user", "content": t}]) for _, t in test])
    assert share >= 0.8, share  # 94% with the shipped predictor's larger sets (docs/familiarity.md)


def test_other_families_are_unfamiliar(fam):
    # the committed unfamiliar-task set: eight reasoning-gym families no predictor here was trained on
    tasks = load_jsonl_tasks("bench/eval/unfamiliar/tasks.jsonl")
    flagged = [not fam.familiar(first_messages(t)) for t in tasks]
    assert np.mean(flagged) >= 0.9, np.mean(flagged)
    # and a step of a plain chat is not like any of them either
    assert not fam.familiar([{"role": "system", "content": "be brief"}, {"role": "user", "content": "Translate 'cat' to French."}])


def test_the_opening_user_message_decides_not_later_turns(fam):
    msgs = [{"role": "user", "content": opening_text(first_messages(make_tasks(["word_sorting"], 1, split="test")[0]))},
            {"role": "assistant", "content": "```python\nprint(1)\n```"}, {"role": "user", "content": "Output: 1"}]
    assert fam.margin(msgs) == fam.margin(msgs[:1])


def test_round_trip_through_the_predictor_file(fam, tmp_path):
    p = random_predictor()
    p.familiarity = fam
    p.save(tmp_path / "p.json")
    q = Predictor.load(tmp_path / "p.json")
    m = first_messages(make_tasks(["gsm_symbolic"], 1, split="test")[0])
    assert q.familiarity.families == fam.families and q.familiarity.margin(m) == pytest.approx(fam.margin(m), abs=1e-3)
    d = json.loads((tmp_path / "p.json").read_text())
    d["familiarity"]["thresholds"] = d["familiarity"]["thresholds"][:-1]
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="familiarity"):
        Predictor.load(tmp_path / "bad.json")


def test_the_shipped_predictor_knows_its_training_families():
    p = Predictor.load()
    assert p.familiarity is not None and set(p.familiarity.families) >= {"gsm_symbolic", "mmlu", "humaneval"}


def test_fit_needs_training_tasks():
    with pytest.raises(ValueError):
        fit_familiarity([], [])


# --- the runtime's policy.unfamiliar -----------------------------------------------------------
UNFAMILIAR = [{"role": "user", "content": "Write a short Python program that prints 6 * 7."}]


def trusting(runtime, fam, policy):
    runtime.predictor.familiarity = fam
    runtime.predictor.kappa = Kappa(-0.01, 0.0, 0)  # the predictor alone would keep every step local
    runtime.unfamiliar = policy


def test_unfamiliar_steps_go_to_the_cloud_by_default(runtime, fam):  # noqa: F811
    trusting(runtime, fam, "cloud")
    r = run(runtime.complete(UNFAMILIAR, session="u", step=0, max_tokens=16))
    assert r.route is Route.CLOUD and r.decision.reason == "unfamiliar"
    assert runtime.ledger.rows("t")[-1]["reason"] == "unfamiliar"
    familiar = first_messages(make_tasks(["basic_arithmetic"], 1, split="test")[0])
    assert run(runtime.complete(familiar, session="f", step=0, max_tokens=16)).decision.reason == "predictor"


def test_unfamiliar_steps_drafted_keep_only_drafts_that_pass(runtime, fam):  # noqa: F811
    trusting(runtime, fam, "draft")
    r = run(runtime.complete(UNFAMILIAR, session="d", step=0, max_tokens=24))
    assert r.draft is not None and (r.route is Route.LOCAL) == r.draft.passed
    assert r.decision.reason == ("draft-kept" if r.draft.passed else "escalated")


def test_trust_routes_unfamiliar_steps_by_the_predictor(runtime, fam):  # noqa: F811
    trusting(runtime, fam, "trust")
    r = run(runtime.complete(UNFAMILIAR, session="t", step=0, max_tokens=16))
    assert r.route is Route.LOCAL and r.decision.reason == "predictor"
