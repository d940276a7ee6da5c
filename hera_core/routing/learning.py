"""Learning the agent HERA serves, from its own traffic: labels from agreement, a retrained and
conservatively calibrated predictor, versions, and an audit that rolls a bad version back.

- `label_pending(store)`: every traced step without a label gets one: do the SLM's draft and the
  cloud's answer agree (hera_core.checks.agreement)? No ground truth is used.
- `learn(store, base)`: XGBoost on the labelled rows (features -> substitutable), the threshold
  calibrated on the most recent `holdout_share` of them: the lowest kappa base at which the
  steps it would keep local agree with the cloud at `target` *by a one-sided confidence bound*
  (Wilson, z), so with few labels it keeps nothing local and says so. The familiarity picture
  becomes the served agent's own (its sessions' openings, per cluster).
- `PredictorVersions`: v0 is the predictor HERA started with; each `learn` writes v1, v2, ...;
  `current` names the one in use; `rollback()` goes back one version.
- `AuditMonitor`: agreement of audited local steps (a budgeted share of steps kept local also go
  to the cloud), per version; when its upper confidence bound falls below `target`, the version
  is worse than promised and is rolled back.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from hera_core.checks.agreement import step_agreement
from hera_core.checks.sandbox import Sandbox
from hera_core.errors import HeraError
from hera_core.routing.familiarity import fit_familiarity
from hera_core.routing.predictor import FEATURE_NAMES, Kappa, Predictor
from hera_core.routing.traces import TraceRow, TraceStore

XGB_PARAMS = {"objective": "binary:logistic", "max_depth": 3, "eta": 0.1, "subsample": 0.9,
              "min_child_weight": 1.0, "eval_metric": "auc", "nthread": 1, "seed": 0}
NO_LOCAL = 1.01  # a kappa base no probability reaches: every step to the cloud


class NotEnoughLabels(HeraError):
    """Too few labelled steps to train or to trust a threshold; the message says how many there are."""

    http_status = 409
    error_type = "invalid_request_error"


def wilson_bounds(agree: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion (agree of n), at z standard errors each side."""
    if n == 0:
        return 0.0, 1.0
    p = agree / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def label_pending(store: TraceStore, *, sandbox: Sandbox | None = None, timeout_s: float = 5.0) -> int:
    """Label every unlabelled row by agreement; returns how many were labelled. Blocking (programs
    run in the sandbox): call it from a worker thread on an event loop."""
    n = 0
    for row in store.rows(labelled=False):
        a = step_agreement(row.prompt, row.cloud_text, row.draft_text, cloud_calls=row.cloud_calls,
                           draft_calls=row.draft_calls, sandbox=sandbox, timeout_s=timeout_s)
        store.set_label(row.id, int(a.substitutable), a.rule)
        n += 1
    return n


@dataclass(frozen=True)
class Calibration:
    base: float  # kappa base chosen (NO_LOCAL: nothing local)
    local: int  # held-out steps it keeps local
    agree: int  # of those, how many agreed with the cloud
    held_out: int
    lower_bound: float  # Wilson lower bound of their agreement (0 when none is local)


def calibrate_on_labels(p: np.ndarray, steps: np.ndarray, labels: np.ndarray, kappa: Kappa, target: float,
                        z: float) -> Calibration:
    """The lowest kappa base (most steps local) whose local steps' agreement has a lower confidence
    bound of at least `target`, scanning down from the highest and stopping at the first failure
    after a success; NO_LOCAL when no base holds."""
    slope = np.asarray([kappa(int(s)) - kappa.base for s in steps])
    needed = p - slope  # the highest base at which each step is still local
    best = Calibration(NO_LOCAL, 0, 0, len(p), 0.0)
    for base in sorted(set(np.round(needed, 6)), reverse=True):
        local = needed >= base
        k, n = int(labels[local].sum()), int(local.sum())
        lower = wilson_bounds(k, n, z)[0]
        if lower >= target:
            best = Calibration(float(base), n, k, len(p), lower)
        elif best.base != NO_LOCAL:
            break  # stop at the first base that fails after one held: no cherry-picked dip below it
    return best


def _fit(rows: list[TraceRow], num_rounds: int):
    import xgboost as xgb

    X = np.asarray([r.features for r in rows], dtype=np.float32)
    y = np.asarray([r.label for r in rows], dtype=np.float32)
    return Predictor(model_json=bytes(xgb.train(XGB_PARAMS, xgb.DMatrix(X, label=y),
                                                num_boost_round=num_rounds).save_raw("json")))


def out_of_fold(rows: list[TraceRow], folds: int, num_rounds: int) -> np.ndarray:
    """P(agree) of every row from a model that did not see it: the rows cut into `folds` contiguous
    blocks of traffic, each scored by a model fitted on the others (a block whose complement has one
    label only is scored by the complement's rate)."""
    p = np.zeros(len(rows), dtype=np.float64)
    edges = np.linspace(0, len(rows), folds + 1).astype(int)
    for lo, hi in zip(edges[:-1], edges[1:]):
        rest = rows[:lo] + rows[hi:]
        labels = {r.label for r in rest}
        if len(labels) < 2:
            p[lo:hi] = float(next(iter(labels))) if labels else 0.0
            continue
        p[lo:hi] = _fit(rest, num_rounds).predict(np.asarray([r.features for r in rows[lo:hi]], dtype=np.float32))
    return p


def learn(store: TraceStore, base: Predictor, *, target: float = 0.9, z: float = 1.645, holdout_share: float = 0.3,
          min_labels: int = 30, num_rounds: int = 100, folds: int = 5) -> tuple[Predictor, dict[str, Any]]:
    """A predictor for the served agent from the trace store's labelled rows (see the module doc);
    its report's "version" is the caller's to fill in.
    `folds` > 1: the threshold is calibrated on every labelled row, each scored out of fold (so the
    confidence bound has all the labels behind it, not only the held-out share); the model that
    ships is fitted on all of them. `folds` = 0: calibrated on the most recent `holdout_share`."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target agreement must be in (0, 1), got {target}")
    if not 0.0 < holdout_share < 1.0:
        raise ValueError(f"holdout_share must be in (0, 1), got {holdout_share}")

    rows = store.rows(labelled=True)
    if len(rows) < min_labels:
        raise NotEnoughLabels(f"{len(rows)} labelled steps in {store.path}, at least {min_labels} needed; "
                              "serve more traffic with shadow drafts on")
    cut = max(1, int(round(len(rows) * (1 - holdout_share))))
    train, held = rows[:cut], rows[cut:]
    fitted = rows if folds > 1 else train
    if len({r.label for r in fitted}) < 2:
        raise NotEnoughLabels(f"the {len(fitted)} training steps are all labelled {fitted[0].label}: both kinds "
                              "are needed")
    predictor = _fit(fitted, num_rounds)
    calib = rows if folds > 1 else held
    p = out_of_fold(rows, folds, num_rounds) if folds > 1 else \
        predictor.predict(np.asarray([r.features for r in held], dtype=np.float32))
    steps = np.asarray([r.step for r in calib])
    labels = np.asarray([r.label for r in calib], dtype=np.float32)
    cal = calibrate_on_labels(p, steps, labels, base.kappa, target, z)
    predictor.kappa = replace(base.kappa, base=cal.base, cost=None)
    predictor.familiarity = fit_familiarity([(r.cluster, r.opening) for r in train],
                                            [(r.cluster, r.opening) for r in held])
    report = {
        "version": None, "labelled_steps": len(rows), "train_steps": len(fitted), "held_out_steps": len(calib),
        "calibration": f"{folds}-fold out of fold" if folds > 1 else f"the most recent {holdout_share:.0%}",
        "train_agreement_rate": round(float(np.mean([r.label for r in fitted])), 4), "target_agreement": target, "z": z,
        "kappa": predictor.kappa.to_dict(), "held_out_local": cal.local, "held_out_local_agree": cal.agree,
        "held_out_local_share": round(cal.local / len(calib), 4) if calib else 0.0,
        "agreement_lower_bound": round(cal.lower_bound, 4), "ground_truth_labels_used": 0,
        "clusters": sorted({r.cluster for r in rows}),
        "note": ("no threshold keeps a step local with agreement above the target's lower bound yet: "
                 "every step stays in the cloud" if cal.base == NO_LOCAL else "ok"),
    }
    predictor.meta = {"learned_from_traffic": report}
    return predictor, report


class PredictorVersions:
    """Predictor files v0 (the one HERA started with), v1, ... in a folder; `current` names the one
    in use. Writes are atomic (temp file, then rename), so a reader never sees half a file."""

    def __init__(self, folder: str | Path, initial: Predictor) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "v0.json").exists():
            self._write("v0.json", json.dumps(initial.to_dict()))
        if not (self.folder / "current").exists():
            self._write("current", "v0")

    def _write(self, name: str, text: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, self.folder / name)

    def versions(self) -> list[str]:
        return sorted((p.stem for p in self.folder.glob("v*.json")), key=lambda v: int(v[1:]))

    @property
    def current(self) -> str:
        return (self.folder / "current").read_text().strip()

    def load(self, version: str | None = None) -> Predictor:
        version = version or self.current
        predictor = Predictor.load(self.folder / f"{version}.json")
        predictor.meta = {**predictor.meta, "version": version}
        return predictor

    def next_version(self) -> str:
        return f"v{int(self.versions()[-1][1:]) + 1}"

    def promote(self, predictor: Predictor) -> str:
        version = self.next_version()
        predictor.meta = {**predictor.meta, "version": version}
        self._write(f"{version}.json", json.dumps(predictor.to_dict()))
        self._write("current", version)
        return version

    def rollback(self) -> str:
        """Back one version from the current one (v0 stays v0); returns the version now in use."""
        known = self.versions()
        cur = self.current
        prev = known[max(0, known.index(cur) - 1)] if cur in known else "v0"
        self._write("current", prev)
        return prev


@dataclass
class AuditMonitor:
    """Agreement of audited local steps per predictor version; `record` says when to roll back."""

    target: float = 0.9
    z: float = 1.645
    min_audits: int = 5  # never judge a version on fewer audited steps
    counts: dict[str, list[int]] = field(default_factory=dict)  # version -> [agreed, audited]

    def record(self, version: str, agreed: bool) -> bool:
        """Count one audited step; True when `version` should be rolled back: its audited agreement's
        upper confidence bound is below the target."""
        c = self.counts.setdefault(version, [0, 0])
        c[0] += int(agreed)
        c[1] += 1
        return c[1] >= self.min_audits and wilson_bounds(c[0], c[1], self.z)[1] < self.target

    def summary(self) -> dict[str, dict[str, Any]]:
        return {v: {"audited": n, "agreed": k, "agreement": round(k / n, 4) if n else None,
                    "bounds": [round(b, 4) for b in wilson_bounds(k, n, self.z)]}
                for v, (k, n) in self.counts.items()}


def trace_row(kind: str, *, session: str, step: int, messages: list[dict[str, Any]], features: np.ndarray,
              version: str, cloud: tuple[str, list | None], draft: tuple[str, list | None]) -> TraceRow:
    """A trace row for a served step: `cloud` and `draft` are each answer's (text, tool calls or
    None). The cluster is the agent: its system prompt (agent frameworks send one per agent), else
    the opening message's first words."""
    from hera_core.routing.familiarity import opening_text

    system = next((m["content"] for m in messages if m.get("role") == "system" and isinstance(m.get("content"), str)),
                  None)
    opening = opening_text(messages)
    key = system if system else " ".join(opening.split()[:8])
    import zlib

    cluster = f"agent-{zlib.crc32(key.encode()):08x}"
    prompt = next((m["content"] for m in reversed(messages)
                   if m.get("role") == "user" and isinstance(m.get("content"), str)), "")
    if len(features) != len(FEATURE_NAMES):
        raise ValueError(f"a trace row needs the full feature row ({len(FEATURE_NAMES)}), got {len(features)}")
    return TraceRow(kind=kind, session=session, step=step, cluster=cluster, opening=opening, prompt=prompt,
                    features=[float(x) for x in features], predictor_version=version, cloud_text=cloud[0],
                    draft_text=draft[0], cloud_calls=cloud[1], draft_calls=draft[1])


@dataclass
class LearnEvent:
    """What a label changed: a predictor to swap in (learned, or rolled back to), and why."""

    predictor: Predictor
    version: str
    reason: str


class LiveLearner:
    """The learning loop of a running HERA: the trace store, the predictor versions and the audit,
    from `LearningSettings`. Blocking methods (labelling runs programs in the sandbox; learning
    fits XGBoost) are called from worker threads; `status()` is cheap."""

    def __init__(self, settings, folder: str | Path, initial: Predictor, *, z: float = 1.645,
                 rng: "random.Random | None" = None, sandbox: Sandbox | None = None, store=None) -> None:
        """`store`: the trace store (a fleet's `PgTraceStore`); default the SQLite one in `folder`."""
        import random
        import threading

        self.settings = settings
        self.folder = Path(folder)
        self.store = store if store is not None else TraceStore(self.folder / "traces.sqlite", settings.max_trace_rows)
        self.versions = PredictorVersions(self.folder / "predictors", initial)
        self.monitor = AuditMonitor(settings.target_agreement, z, settings.min_audits)
        self.z = z
        self.sandbox = sandbox
        self._rng = rng or random.Random()
        self._lock = threading.Lock()  # one label/learn/rollback at a time
        self.labels_since_learn = 0
        self.events: list[dict[str, Any]] = []  # learned and rolled-back versions, newest last

    def predictor(self) -> Predictor:
        return self.versions.load()

    def learned(self) -> bool:
        """A learned version is in use (v0 is the predictor HERA started with)."""
        return self.versions.current != "v0"

    def should_audit(self) -> bool:
        """Whether a step kept local by a learned predictor also goes to the cloud."""
        return self.learned() and self._rng.random() < self.settings.audit_share

    def add(self, row: TraceRow) -> LearnEvent | None:
        """Store a traced step, label it, and act on the label: an audited step counts for (or
        against) the version that kept it local; enough new labels retrain. Blocking."""
        with self._lock:
            row_id = self.store.add(row)
            a = step_agreement(row.prompt, row.cloud_text, row.draft_text, cloud_calls=row.cloud_calls,
                               draft_calls=row.draft_calls, sandbox=self.sandbox)
            self.store.set_label(row_id, int(a.substitutable), a.rule)
            self.labels_since_learn += 1
            if row.kind == "audit" and self.monitor.record(row.predictor_version, a.substitutable):
                return self._rollback(row.predictor_version)
            every = self.settings.retrain_every
            if every and self.labels_since_learn >= every:
                return self._learn()
        return None

    def learn_now(self) -> LearnEvent:
        """Label what is pending, learn, promote (`hera learn`). NotEnoughLabels when too few."""
        with self._lock:
            label_pending(self.store, sandbox=self.sandbox)
            event = self._learn(raise_if_short=True)
            assert event is not None
            return event

    def rollback_now(self) -> LearnEvent:
        with self._lock:
            return self._rollback(self.versions.current, reason="asked for")

    def _learn(self, raise_if_short: bool = False) -> LearnEvent | None:
        """Learn a version and promote it. Retraining on its own (not `hera learn`), a version that
        keeps nothing local does not replace one that keeps steps local unless the latter's audits
        argue against it (`_holds`): once steps are kept local only the audit share labels them, so
        new labels come mostly from the steps sent to the cloud, the harder ones, and a retrain
        can lose its nerve on that skewed sample alone (docs/learning.md measured it)."""
        self.labels_since_learn = 0
        version = self.versions.next_version()
        try:
            predictor, report = learn(self.store, self.versions.load("v0"), target=self.settings.target_agreement,
                                      z=self.z, min_labels=self.settings.min_labels)
            report["version"] = version
        except NotEnoughLabels:
            if raise_if_short:
                raise
            return None
        if not raise_if_short and predictor.kappa.base >= NO_LOCAL and self._holds():
            self.events.append({"event": "not promoted", "version": version, "labelled_steps": report["labelled_steps"],
                                "reason": f"it keeps nothing local; {self.versions.current} keeps steps local and "
                                          "its audits do not argue against it"})
            return None
        self.versions.promote(predictor)
        self.events.append({"event": "learned", "version": version, **{k: report[k] for k in (
            "labelled_steps", "held_out_local_share", "agreement_lower_bound", "note")}})
        return LearnEvent(self.versions.load(version), version, f"learned from {report['labelled_steps']} labels")

    def _holds(self) -> bool:
        """The version in use is a learned one that keeps steps local, and its audited agreement so
        far (if any) is at least the target."""
        if not self.learned() or self.versions.load().kappa.base >= NO_LOCAL:
            return False
        agreed, audited = self.monitor.counts.get(self.versions.current, [0, 0])
        return audited == 0 or agreed / audited >= self.settings.target_agreement

    def _rollback(self, bad: str, reason: str | None = None) -> LearnEvent:
        audit = self.monitor.summary().get(bad, {})
        reason = reason or (f"audited agreement {audit.get('agreed')}/{audit.get('audited')} is below the target "
                            f"{self.settings.target_agreement} (upper bound {audit.get('bounds', [None, None])[1]})")
        now = self.versions.rollback() if self.versions.current == bad else self.versions.current
        self.events.append({"event": "rolled back", "from": bad, "to": now, "reason": reason})
        return LearnEvent(self.versions.load(now), now, f"rolled back from {bad}: {reason}")

    def status(self) -> dict[str, Any]:
        return {"current": self.versions.current, "versions": self.versions.versions(),
                "traced_steps": self.store.count(), "labelled_steps": self.store.count(labelled=True),
                "audit": self.monitor.summary(), "events": self.events[-20:]}

    def close(self) -> None:
        self.store.close()
