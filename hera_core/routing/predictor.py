"""The subtask predictor: P(the SLM's output at this step is good enough), from the SLM's own
prefill (logit features) and the step's place in the task.

A predictor file (JSON) holds the feature schema version, the feature names, the XGBoost model,
the calibrated position-aware threshold kappa(step) and training metadata. The runtime computes
every feature of the current schema; a predictor reads the ones it was trained on, by name (a
v1 file, from before the tool features, reads its seven). A file of an unknown schema, or naming
a feature this HERA does not compute, is an error, never a silently wrong answer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from hera_core.checks.drafts import DRAFT_FEATURE_NAMES, DraftCheck
from hera_core.errors import ConfigError
from hera_core.routing.familiarity import Familiarity
from hera_core.native.features import LOGIT_FEATURE_NAMES, logit_features

FEATURE_SCHEMA = "hera-features-v3"
V1_SCHEMA = "hera-features-v1"  # the same features but the tool ones and the answer schema's size: still read
V2_SCHEMA = "hera-features-v2"  # the same features but the answer schema's size: still read
# Where the step stands in an agent's tool loop: tools offered (0: none, or tool_choice "none"), a
# call forced (tool_choice required / a named function), tool results so far, whether this step
# answers a tool result (then it usually answers rather than calls) and whether that result was
# an error (a failed call to recover from).
TOOL_FEATURE_NAMES = ("tools_offered", "tool_choice_forced", "tool_results", "after_tool_result", "last_tool_error")
V1_FEATURE_NAMES = LOGIT_FEATURE_NAMES + ("step_index", "prompt_tokens", "n_messages", "last_message_chars")
V2_FEATURE_NAMES = V1_FEATURE_NAMES + TOOL_FEATURE_NAMES
# A structured step (response_format): the size of the schema its answer must satisfy (0: none).
STRUCTURE_FEATURE_NAMES = V2_FEATURE_NAMES[len(LOGIT_FEATURE_NAMES):] + ("answer_schema_size",)
FEATURE_NAMES = LOGIT_FEATURE_NAMES + STRUCTURE_FEATURE_NAMES
# The feature names of each schema a predictor file may have: an older file's model reads its own
# columns out of today's rows (Predictor.input_names).
SCHEMA_FEATURES = {V1_SCHEMA: V1_FEATURE_NAMES, V2_SCHEMA: V2_FEATURE_NAMES, FEATURE_SCHEMA: FEATURE_NAMES}
PROMPT_TOKENS_COLUMN = FEATURE_NAMES.index("prompt_tokens")  # what a cost weight reads from a feature row
DEFAULT_PREDICTOR = "default_predictor.json"
_TOOL_ERROR = re.compile(r"\b(error|exception|traceback|failed|invalid|not found)\b", re.IGNORECASE)


def tool_features(messages: list[dict[str, Any]], toolset: Any = None) -> list[float]:
    """The TOOL_FEATURE_NAMES of a step: `toolset` is the offered tools (a ToolSet) or None."""
    offered = len(toolset.tools) if toolset is not None and toolset.choice != "none" else 0
    forced = toolset is not None and toolset.choice in ("required", "function")
    results = sum(1 for m in messages if m.get("role") == "tool")
    last = messages[-1] if messages else {}
    after = last.get("role") == "tool"
    content = last.get("content") if after else None
    error = isinstance(content, str) and _TOOL_ERROR.search(content) is not None
    return [float(offered), float(forced), float(results), float(after), float(error)]


def structure_features(step: int, prompt_tokens: int, messages: list[dict[str, Any]],
                       toolset: Any = None, schema_size: int = 0) -> list[float]:
    """The STRUCTURE_FEATURE_NAMES of a step (its place in the task, its tools, the size of the
    schema its answer must satisfy: `ResponseFormat.size`)."""
    last = messages[-1].get("content") if messages else ""
    row = tool_features(messages, toolset)
    row[:0] = (float(step), float(prompt_tokens), float(len(messages)),
               float(len(last) if isinstance(last, str) else 0))
    row.append(float(schema_size))
    return row


def feature_matrix(logit_feats: np.ndarray, structure: list[list[float]]) -> np.ndarray:
    """[batch, 3] logit features + [batch, 10] structure -> float32 [batch, len(FEATURE_NAMES)]."""
    n, k = len(structure), logit_feats.shape[1]
    # One preallocated matrix filled in place: hstack + astype + ascontiguousarray made three arrays (~10 us).
    out = np.empty((n, k + (len(structure[0]) if n else 0)), dtype=np.float32)
    out[:, :k] = logit_feats
    out[:, k:] = structure
    return out


@dataclass(frozen=True)
class CostWeight:
    """One trade-off between accuracy and cloud cost across a task's steps (cascade routing's
    Lagrangian form: escalate when the expected loss (1 - P) is worth the step's expected cloud
    cost). A step whose expected cloud cost is r times the average step's may miss r**gamma times
    as often as kappa(step) alone allows: threshold = 1 - (1 - kappa(step)) * r**gamma. gamma = 0
    is kappa(step) itself; gamma = 1 weighs a step's risk fully by what escalating it costs.
    The expected cost is known before the step runs: its prompt, and the cloud's mean output at
    that step index on the training tasks, at the prices it was calibrated at (`out_per_in`: kept
    with the weight, so the runtime applies exactly what `hera train` calibrated)."""

    gamma: float
    out_tokens: tuple[float, ...]  # expected cloud output tokens at step 0, 1, ...; the last for later steps
    ref_prompt_tokens: float  # the average training step's prompt ...
    ref_out_tokens: float  # ... and output: the cost that r is measured against
    max_ratio: float = 4.0  # r is capped here (the costliest training step's): no extrapolation past the data
    out_per_in: float | None = 4.0  # the cloud's output over input price it was fitted at; None: a free cloud

    def __post_init__(self) -> None:
        values = (self.gamma, self.ref_prompt_tokens, self.ref_out_tokens, self.max_ratio, *self.out_tokens,
                  *(() if self.out_per_in is None else (self.out_per_in,)))
        if not all(math.isfinite(v) for v in values) or not 0.0 <= self.gamma <= 4.0 or not self.out_tokens or \
                min(self.out_tokens) < 0 or self.ref_prompt_tokens <= 0 or self.ref_out_tokens < 0 or \
                self.max_ratio < 1.0 or (self.out_per_in is not None and self.out_per_in < 0):
            raise ValueError(f"cost weight needs finite values, 0 <= gamma <= 4, expected output tokens >= 0 per "
                             f"step, a positive reference prompt, max_ratio >= 1 and a price ratio >= 0, got "
                             f"gamma={self.gamma}, out_tokens={self.out_tokens}, ref=({self.ref_prompt_tokens}, "
                             f"{self.ref_out_tokens}), max_ratio={self.max_ratio}, out_per_in={self.out_per_in}")
        if self.out_per_in is not None:  # the average step's cost, in prompt tokens (read at every step)
            object.__setattr__(self, "_ref_cost", self.ref_prompt_tokens + self.out_per_in * self.ref_out_tokens)

    def ratio(self, step: int, prompt_tokens: float) -> float:
        """The step's expected cloud cost over the average training step's, at most max_ratio (1 for
        a free cloud: no step costs more than another)."""
        if self.out_per_in is None:
            return 1.0
        out = self.out_tokens[min(max(step, 0), len(self.out_tokens) - 1)]
        r = (prompt_tokens + self.out_per_in * out) / self._ref_cost
        return min(r, self.max_ratio)

    def to_dict(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "out_tokens": list(self.out_tokens), "ref_prompt_tokens": self.ref_prompt_tokens,
                "ref_out_tokens": self.ref_out_tokens, "max_ratio": self.max_ratio, "out_per_in": self.out_per_in}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CostWeight":
        if not isinstance(d.get("out_tokens"), list):
            raise TypeError(f"out_tokens must be a list, got {d.get('out_tokens')!r}")
        opi = d["out_per_in"]
        return cls(float(d["gamma"]), tuple(float(x) for x in d["out_tokens"]), float(d["ref_prompt_tokens"]),
                   float(d["ref_out_tokens"]), float(d["max_ratio"]), None if opi is None else float(opi))


@dataclass(frozen=True)
class Kappa:
    """Position-aware threshold: kappa(i) = base + min(i, max_steps) * per_step (paper: 0.6, 0.02, 5);
    with a cost weight, `at` also weighs a step by its expected cloud cost."""

    base: float = 0.6
    per_step: float = 0.02
    max_steps: int = 5
    cost: CostWeight | None = None

    def __call__(self, step: int) -> float:
        """The position-aware part alone."""
        return self.base + min(max(step, 0), self.max_steps) * self.per_step

    def at(self, step: int, prompt_tokens: float) -> float:
        """The step's threshold: kappa(step), weighed by its expected cloud cost (its prompt's tokens
        and the step index's expected output) when this has a cost weight."""
        k = self.base + min(max(step, 0), self.max_steps) * self.per_step  # self(step), without the call
        cost = self.cost
        if cost is None or cost.gamma == 0.0:
            return k
        return 1.0 - (1.0 - k) * cost.ratio(step, prompt_tokens) ** cost.gamma

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"base": self.base, "per_step": self.per_step, "max_steps": self.max_steps}
        if self.cost is not None:
            d["cost_weight"] = self.cost.to_dict()
        return d


DRAFT_STAGE_FEATURE_NAMES = FEATURE_NAMES + DRAFT_FEATURE_NAMES


@dataclass
class DraftStage:
    """The second stage: P(keeping the SLM's draft keeps the task correct), from the prefill's
    features and the draft's (checks, log-probabilities), trained on the same substitution labels."""

    model_json: bytes  # XGBoost JSON over `feature_names`
    keep_threshold: float = 0.5  # keep the draft when P >= this (calibrated by `hera train`)
    band: float = 0.2  # draft the steps whose first-stage P is within this of kappa (calibrated)
    meta: dict[str, Any] = field(default_factory=dict)
    feature_names: tuple[str, ...] = DRAFT_STAGE_FEATURE_NAMES  # what its model reads, of DRAFT_STAGE_FEATURE_NAMES

    def __post_init__(self) -> None:
        self._forest = Predictor(model_json=self.model_json, feature_names=self.feature_names,
                                 input_names=DRAFT_STAGE_FEATURE_NAMES)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """X: [batch, len(DRAFT_STAGE_FEATURE_NAMES)], the prefill row then the draft's features."""
        return self._forest.predict(X)

    def to_dict(self) -> dict[str, Any]:
        return {"feature_names": list(self.feature_names), "keep_threshold": self.keep_threshold,
                "band": self.band,
                "meta": self.meta, "model_b64": base64.b64encode(self.model_json).decode()}


@dataclass
class VoteStage:
    """The first `steps` steps of a task are decided by what the SLM writes, not by its prefill
    (which ranks them at chance, measured): the SLM drafts the step, `k` samples of it vote, and
    the draft is kept when its checks pass and at least `min_share` of the samples agree with its
    answer (the first FIRST_VOTES samples alone when they all agree). Calibrated by `hera train --votes`."""

    steps: int = 1
    k: int = 4
    min_share: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps < 1 or not 2 <= self.k <= 8 or not 0.5 <= self.min_share <= 1.0:
            # min_share >= 0.5 keeps the draft the majority answer whenever it is kept
            raise ValueError(f"vote stage needs steps >= 1, 2 <= k <= 8 and 0.5 <= min_share <= 1, "
                             f"got steps={self.steps}, k={self.k}, min_share={self.min_share}")

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "k": self.k, "min_share": self.min_share, "meta": self.meta}


@dataclass
class Workload:
    """One workload's operating point in a predictor trained on several (`hera train --workload`):
    one model ranks every workload's steps, but the threshold P must reach (kappa and its cost
    weight) is calibrated on each workload's own validation tasks, since their accuracies and costs
    differ, and the draft stage is the workload's own, since a draft's checks mean different things
    in each (a program that ran, a tool call that validates). A step takes the operating point of
    the training family its task is most like (the familiarity check); an unfamiliar step that the
    policy trusts takes the predictor's own."""

    name: str
    families: tuple[str, ...]  # training families (the familiarity check's names) it holds
    kappa: Kappa
    draft: DraftStage | None = None  # its draft stage (its band and keep threshold); None: not drafted
    meta: dict[str, Any] = field(default_factory=dict)  # its calibration

    def __post_init__(self) -> None:
        if not self.name or not self.families:
            raise ValueError(f"a workload needs a name and families, got {self.name!r}, {self.families}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "families": list(self.families), "kappa": self.kappa.to_dict(),
                **({"draft_stage": self.draft.to_dict()} if self.draft is not None else {}), "meta": self.meta}


def _kappa_from_dict(k: dict[str, Any]) -> Kappa:
    cost = k.get("cost_weight")
    return Kappa(float(k.get("base", 0.6)), float(k.get("per_step", 0.02)), int(k.get("max_steps", 5)),
                 None if cost is None else CostWeight.from_dict(cost))


def predictor_version(predictor: Predictor) -> str:
    """The name of a predictor on ledger rows: its version in a learning folder (v0, v1, ...), else
    a short hash of its model, so rows of different predictors never share a name."""
    version = getattr(predictor, "meta", {}).get("version")
    if version:
        return str(version)
    model = getattr(predictor, "model_json", None)
    return "sha-" + hashlib.sha256(model).hexdigest()[:10] if model else type(predictor).__name__


def _section(path, value, what: str, retrain: str, parse):
    """An optional section of a predictor file, parsed (None where absent); an unreadable one is a
    ConfigError that says how to remake it."""
    if value is None:
        return None
    try:
        return parse(value)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"predictor file {path}: {what} is unreadable ({exc}); retrain it with `{retrain}`") from None


@dataclass
class Predictor:
    model_json: bytes  # XGBoost JSON model (Booster.save_raw("json"))
    kappa: Kappa = Kappa()
    meta: dict[str, Any] = field(default_factory=dict)  # how it was trained, metrics
    feature_names: tuple[str, ...] = FEATURE_NAMES
    draft: DraftStage | None = None  # second stage for uncertain steps; None: keep a draft that passes its checks
    familiarity: Familiarity | None = None  # what its training tasks looked like; None: every step is trusted
    vote: VoteStage | None = None  # first steps decided by the SLM's draft and samples; None: by kappa
    input_names: tuple[str, ...] = FEATURE_NAMES  # the columns of the rows it is given (its model reads feature_names)
    workloads: tuple[Workload, ...] = ()  # per-workload operating points, chosen by the familiarity check

    def __post_init__(self) -> None:
        # workload() per familiarity family, for the familiarity and workloads it was built from
        self._by_family: tuple[Familiarity | None, tuple[Workload, ...] | None, list[Workload | None]] = \
            (None, None, [])
        self._impl = None  # X -> P, loaded at the first call (`_evaluator`)
        self._fused = None  # the native forest's score_logits, where the forest is native
        unknown = [n for n in self.feature_names if n not in self.input_names]
        if unknown:
            raise ValueError(f"the predictor reads features {unknown} that this HERA does not compute")
        # The columns its model was trained on, picked out of the full row (None: all, in order): a
        # slice when they lead it (an older schema's are today's first columns: a view, no copy of
        # one row), else an index array.
        self._cols: slice | np.ndarray | None = None
        if tuple(self.feature_names) != tuple(self.input_names):
            cols = [self.input_names.index(n) for n in self.feature_names]
            self._cols = slice(0, len(cols)) if cols == list(range(len(cols))) else np.asarray(cols, dtype=np.intp)
        self._col_index = None if self._cols is None else np.asarray(cols, dtype=np.int32)  # (for score_logits)
        self._structure_width = len(self.input_names) - len(LOGIT_FEATURE_NAMES)

    def _evaluator(self):
        """The native forest when built, else XGBoost where installed (one thread: small batches),
        else the forest's numpy twin (a lean install has no XGBoost); all give the same numbers."""
        if self._impl is None:
            from hera_core.native.forest import Forest

            try:
                forest = Forest.from_json_bytes(self.model_json)
                self._impl = forest.kernel
                self._fused = forest.score_logits if forest.backend == "native" else None
            except ImportError:  # the native extension is not built (or is stale)
                try:
                    import xgboost as xgb
                except ImportError:
                    self._impl = Forest.from_json_bytes(self.model_json, native=False).kernel
                else:
                    booster = xgb.Booster(model_file=bytearray(self.model_json))
                    booster.set_param({"nthread": 1})
                    self._impl = lambda X: booster.inplace_predict(X).astype(np.float32)
        return self._impl

    def predict(self, X: np.ndarray) -> np.ndarray:
        """X: [batch, len(input_names)] rows, as `feature_matrix` makes them."""
        if X.ndim != 2 or X.shape[1] != len(self.input_names):
            raise ValueError(f"features must be [batch, {len(self.input_names)}], got {list(X.shape)}")
        if self._cols is not None:
            X = X[:, self._cols]
        if X.dtype != np.float32 or not X.flags.c_contiguous:
            X = np.ascontiguousarray(X, dtype=np.float32)
        return (self._impl or self._evaluator())(X)

    def score_logits(self, rows: list[np.ndarray], structure: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
        """(P [n], the feature rows [n, len(input_names)]) of steps from their SLM logits rows
        (float32 [vocab] each) and their STRUCTURE_FEATURE_NAMES values: what `predict` gives for
        the rows `feature_matrix` makes of `logit_features` and `structure`, in one native call
        where the forest is native (the live path's scoring)."""
        if self._impl is None:
            self._evaluator()
        width = self._structure_width
        if self._fused is not None and structure and len(structure[0]) == width:
            return self._fused(rows, structure, self._col_index)  # (it checks every row against the first)
        if any(len(s) != width for s in structure) or len(rows) != len(structure) or not rows:
            raise ValueError(f"need one logits row and {width} structure features per step, got {len(rows)} rows "
                             f"and structure rows of {sorted({len(s) for s in structure})} features")
        feats = logit_features(rows[0].reshape(1, -1)) if len(rows) == 1 else \
            np.concatenate([logit_features(r.reshape(1, -1)) for r in rows])
        X = feature_matrix(feats, structure)
        return self.predict(X), X

    def keep_draft(self, prefill_row: np.ndarray, check: DraftCheck, messages: list[dict[str, Any]] | None = None,
                   tools: bool = False) -> tuple[bool, float | None]:
        """Second stage for an uncertain step: (keep the SLM's draft?, P from the draft stage or
        None when this predictor has none and the draft's own checks decide); `messages` (and
        `tools`): the step's, whose workload's keep threshold applies (`workload`)."""
        if self.draft is None and not self.workloads:
            return check.passed, None
        w = self.workload(messages, tools) if messages is not None and self.workloads else None
        stage = self.draft if w is None or w.draft is None else w.draft
        X = np.hstack([prefill_row.reshape(1, -1), check.features.reshape(1, -1)]).astype(np.float32)
        p = float(stage.predict(X)[0])
        return p >= stage.keep_threshold, p

    # --- one predictor, several workloads ---------------------------------------------------------
    def workload(self, messages: list[dict[str, Any]], tools: bool = False) -> Workload | None:
        """The operating point of the training family this step's task is most like (`tools`: the
        step offers tools; `Familiarity.nearest`); None when the predictor has none (one for every
        step: its own kappa and draft stage) or the step is unfamiliar."""
        return self.locate(messages, tools)[1] if self.workloads else None

    def locate(self, messages: list[dict[str, Any]], tools: bool = False) -> tuple[bool, Workload | None]:
        """(the step is familiar, its workload or None) in one familiarity lookup: what the live
        path reads once a step. Without a familiarity check every step is familiar."""
        fam = self.familiarity
        if fam is None:
            if self.workloads:
                raise ConfigError("a predictor with workloads needs its familiarity section; retrain it with "
                                  "`hera train`")
            return True, None
        i = fam.nearest(messages, tools)
        if i is None or not self.workloads:
            return i is not None, None
        seen_fam, seen_workloads, by_family = self._by_family
        if seen_fam is not fam or seen_workloads is not self.workloads:  # (both may be set after init)
            owner = {f: w for w in self.workloads for f in w.families}
            by_family = [owner.get(f) for f in fam.families]
            self._by_family = (fam, self.workloads, by_family)
        return True, by_family[i]

    def kappa_of(self, w: Workload | None) -> Kappa:
        """The kappa a step of workload `w` takes (None: no workload, the predictor's own)."""
        return self.kappa if w is None else w.kappa

    def draft_band_of(self, w: Workload | None) -> float:
        """The draft band a step of workload `w` takes (None: the predictor's stage's; 0: no stage)."""
        stage = self.draft if w is None else w.draft
        return stage.band if stage is not None else 0.0

    def threshold_at(self, messages: list[dict[str, Any]], step: int, prompt_tokens: float,
                     tools: bool = False) -> float:
        """The step's threshold: its workload's kappa at this step (`Kappa.at`), else the predictor's."""
        return self.kappa_of(self.workload(messages, tools)).at(step, prompt_tokens)

    def draft_band_for(self, messages: list[dict[str, Any]], tools: bool = False) -> float:
        """The draft stage's band at this step: its workload's, else the stage's (0: no draft stage)."""
        return self.draft_band_of(self.workload(messages, tools))

    # --- files ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        schema = next((k for k, names in SCHEMA_FEATURES.items() if names == tuple(self.feature_names)),
                      FEATURE_SCHEMA)
        d = {"schema": schema, "feature_names": list(self.feature_names),
             "kappa": self.kappa.to_dict(),
             "meta": self.meta, "model_b64": base64.b64encode(self.model_json).decode()}
        if self.draft is not None:
            d["draft_stage"] = self.draft.to_dict()
        if self.familiarity is not None:
            d["familiarity"] = self.familiarity.to_dict()
        if self.vote is not None:
            d["vote_stage"] = self.vote.to_dict()
        if self.workloads:
            d["workloads"] = [w.to_dict() for w in self.workloads]
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Predictor":
        """Load a predictor file; None loads the one shipped in the package."""
        try:
            if path is None:
                path = f"<package>/data/{DEFAULT_PREDICTOR}"
                text = resources.files("hera_core").joinpath("data", DEFAULT_PREDICTOR).read_text()
            else:
                text = Path(path).read_text()
            d = json.loads(text)
        except FileNotFoundError:
            raise ConfigError(f"predictor file {path} does not exist; train one with `hera train`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"predictor file {path} is not valid JSON ({exc}); retrain with `hera train`") from None
        if not isinstance(d, dict) or not isinstance(d.get("schema"), str) or d["schema"] not in SCHEMA_FEATURES:
            got = d.get("schema") if isinstance(d, dict) else None
            raise ConfigError(f"predictor file {path} has feature schema {got!r}, this HERA needs "
                              f"{FEATURE_SCHEMA!r}; retrain it with `hera train`")
        names = tuple(d.get("feature_names", ()))
        if names != SCHEMA_FEATURES[d["schema"]]:
            raise ConfigError(f"predictor file {path} lists features {d.get('feature_names')}, expected "
                              f"{list(SCHEMA_FEATURES[d['schema']])}; retrain it with `hera train`")
        k = d.get("kappa", {})
        draft = _draft_stage(path, d.get("draft_stage"), names, "its draft stage")
        familiarity = _section(path, d.get("familiarity"), "its familiarity section", "hera train",
                               Familiarity.from_dict)
        vote = _section(path, d.get("vote_stage"), "its vote stage", "hera train --votes",
                        lambda v: VoteStage(int(v["steps"]), int(v["k"]), float(v["min_share"]), v.get("meta", {})))
        cost = _section(path, k.get("cost_weight"), "its cost weight", "hera train --cost-aware", CostWeight.from_dict)
        workloads = _section(path, d.get("workloads"), "its workload section", "hera train --workload",
                             lambda ws: tuple(_workload(path, w, names) for w in ws)) or ()
        _check_workloads(path, workloads, familiarity)
        return cls(model_json=base64.b64decode(d["model_b64"]), feature_names=names,
                   kappa=Kappa(float(k.get("base", 0.6)), float(k.get("per_step", 0.02)), int(k.get("max_steps", 5)),
                               cost),
                   meta=d.get("meta", {}), draft=draft, familiarity=familiarity, vote=vote, workloads=workloads)


def _draft_stage(path, ds: dict[str, Any] | None, names: tuple[str, ...], what: str) -> DraftStage | None:
    """A draft stage section (None where absent), over the prefill's features `names` then the draft's."""
    if ds is None:
        return None
    ds_names = tuple(ds.get("feature_names", ()))
    if ds_names != names + DRAFT_FEATURE_NAMES:
        raise ConfigError(f"predictor file {path}: {what} lists features {ds.get('feature_names')}, "
                          f"expected {list(names + DRAFT_FEATURE_NAMES)}; retrain it with `hera train`")
    return DraftStage(model_json=base64.b64decode(ds["model_b64"]), keep_threshold=float(ds.get("keep_threshold", 0.5)),
                      band=float(ds.get("band", 0.2)), meta=ds.get("meta", {}), feature_names=ds_names)


def _workload(path, d: dict[str, Any], names: tuple[str, ...]) -> Workload:
    return Workload(str(d["name"]), tuple(str(f) for f in d["families"]), _kappa_from_dict(d["kappa"]),
                    _draft_stage(path, d.get("draft_stage"), names, f"workload {d['name']}'s draft stage"),
                    d.get("meta", {}))


def _check_workloads(path, workloads: tuple[Workload, ...], familiarity: Familiarity | None) -> None:
    """A predictor file's workloads must name families its familiarity check knows, each once: else
    a ConfigError (never a step routed by the wrong point)."""
    if not workloads:
        return
    fix = "; retrain it with `hera train --workload`"
    if familiarity is None:
        raise ConfigError(f"predictor file {path} has workloads but no familiarity section to choose them by{fix}")
    named = [f for w in workloads for f in w.families]
    unknown = sorted(set(named) - set(familiarity.families))
    twice = sorted({f for f in named if named.count(f) > 1})
    if unknown or twice:
        raise ConfigError(f"predictor file {path}: its workloads name families "
                          f"{unknown or twice} {'its familiarity check does not know' if unknown else 'twice'}{fix}")
