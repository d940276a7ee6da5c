"""Is this step like the tasks the predictor was trained on?

A predictor trained on some task families ranks steps of other families badly (measured: on eight
unseen families it kept 84% of the steps local at lower accuracy than All-SLM). So the predictor
file carries a picture of its training tasks: the TF-IDF vector (word unigrams and bigrams, hashed
into `DIM` buckets) of each training task's opening user message, averaged per family, and a
threshold per family. A step whose opening user message is, for every family, less similar (cosine)
to the family's centroid than its threshold is *unfamiliar*; the runtime then follows
`policy.unfamiliar` (cloud, or draft-and-check) instead of trusting the predictor. Each threshold
is a low quantile of the similarity of held-out tasks of that family, so nearly all of them pass.
(Per family, because families differ: arithmetic prompts are near-identical, MMLU questions are
not.) A family also records whether its tasks offer tools; a step is then compared only with the
families of its own kind (a tool-calling task's open-ended question is like any question, so without
this a family of them would find every step without tools familiar too).

Pure numpy, a few tens of microseconds per step; the opening message of a session is the same at
every step, so its vector is memoized.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

DIM = 1024
_WORD = re.compile(r"[a-z]+|\d+")
# Numbers are mostly task instances, not task kinds: every run of digits is one token.
_NUMBER = "<num>"
_MEMO = 4096  # opening texts whose verdict a Familiarity keeps


def opening_text(messages: list[dict[str, Any]]) -> str:
    """The session's first user message: the task as the agent was given it."""
    for m in messages:
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            return m["content"]
    return ""


@lru_cache(maxsize=4096)
def term_counts(text: str) -> np.ndarray:
    """Hashed counts of the text's word unigrams and bigrams, float32 [DIM]."""
    words = [_NUMBER if w.isdigit() else w for w in _WORD.findall(text.lower())]
    v = np.zeros(DIM, dtype=np.float32)
    for term in (*words, *(a + " " + b for a, b in zip(words, words[1:]))):
        v[zlib.crc32(term.encode()) % DIM] += 1.0
    v.setflags(write=False)
    return v


def _tfidf(counts: np.ndarray, idf: np.ndarray) -> np.ndarray:
    v = np.log1p(counts) * idf
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


@dataclass
class Familiarity:
    idf: np.ndarray  # float32 [DIM], from the training tasks
    centroids: np.ndarray  # float32 [families, DIM], unit-normalized mean TF-IDF per training family
    families: list[str]
    thresholds: np.ndarray  # float32 [families]: familiar when the cosine to some centroid reaches its threshold
    meta: dict[str, Any] = field(default_factory=dict)
    tools: np.ndarray | None = None  # bool [families]: its tasks offer tools (None: not recorded, one kind)
    # (margin, nearest family) per opening text: a session's opening is the same at every step, so
    # its verdict is computed once (the TF-IDF and the centroid product: ~15-20 us a step otherwise).
    # Bounded: cleared when it reaches _MEMO entries. Not part of the picture (no compare, no repr).
    _verdicts: dict[Any, tuple[float, int]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def similarities(self, messages: list[dict[str, Any]]) -> np.ndarray:
        """Cosine of the step's opening message to each training family's centroid, float32 [families]."""
        return self.centroids @ _tfidf(term_counts(opening_text(messages)), self.idf)

    def _verdict(self, messages: list[dict[str, Any]], tools: bool) -> tuple[float, int]:
        text = opening_text(messages)
        key = text if self.tools is None else (text, tools)
        v = self._verdicts.get(key)
        if v is None:
            if len(self._verdicts) >= _MEMO:
                self._verdicts.clear()
            over = self.centroids @ _tfidf(term_counts(text), self.idf) - self.thresholds
            if self.tools is not None:  # only the families of the step's kind
                over = np.where(self.tools == tools, over, -np.inf)
            i = int(over.argmax())
            v = self._verdicts[key] = (float(over[i]), i)
        return v

    def margin(self, messages: list[dict[str, Any]], tools: bool = False) -> float:
        """Highest (similarity - threshold) over the families (of the step's kind: `tools`, the step
        offers tools): >= 0 is familiar; -inf when no family is of its kind."""
        return self._verdict(messages, tools)[0]

    def nearest(self, messages: list[dict[str, Any]], tools: bool = False) -> int | None:
        """The index (in `families`) of the family the step's task is most like, by the margin over
        its threshold; None when the step is unfamiliar."""
        margin, i = self._verdict(messages, tools)
        return i if margin >= 0.0 else None

    def familiar(self, messages: list[dict[str, Any]], tools: bool = False) -> bool:
        return self._verdict(messages, tools)[0] >= 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"dim": DIM, "families": self.families, "meta": self.meta,
                "thresholds": [round(float(x), 5) for x in self.thresholds],
                "idf": [round(float(x), 4) for x in self.idf],
                "centroids": [[round(float(x), 5) for x in row] for row in self.centroids],
                **({"tools": [bool(x) for x in self.tools]} if self.tools is not None else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Familiarity":
        if int(d.get("dim", 0)) != DIM:
            raise ValueError(f"familiarity vectors have {d.get('dim')} buckets, this HERA uses {DIM}")
        idf = np.asarray(d["idf"], dtype=np.float32)
        centroids = np.asarray(d["centroids"], dtype=np.float32).reshape(-1, DIM)
        thresholds = np.asarray(d["thresholds"], dtype=np.float32)
        tools = None if d.get("tools") is None else np.asarray([bool(x) for x in d["tools"]])
        if idf.shape != (DIM,) or not len(centroids) == len(thresholds) == len(d["families"]) or \
                (tools is not None and len(tools) != len(thresholds)):
            raise ValueError("familiarity: idf, centroids, thresholds or tools have the wrong shape")
        return cls(idf, centroids, list(d["families"]), thresholds, d.get("meta", {}), tools)


def fit_familiarity(train: Iterable[tuple[str, str]], held_out: Iterable[tuple[str, str]],
                    quantile: float = 0.02, tools: dict[str, bool] | None = None) -> Familiarity:
    """`train`: (family, opening text) of the training tasks; `held_out`: the same for other tasks
    of those families, whose `quantile` of similarity to their own family's centroid becomes that
    family's threshold (a family with no held-out task: 0.8 x its training tasks' lowest);
    `tools`: family -> its tasks offer tools (then a step is compared with its own kind only)."""
    train, held_out = list(train), list(held_out)
    if not train:
        raise ValueError("familiarity needs at least one training task")
    counts = np.stack([term_counts(text) for _, text in train])
    df = (counts > 0).sum(axis=0)
    idf = np.log((1 + len(train)) / (1 + df)).astype(np.float32) + 1.0
    idf[df == 0] = 0.0  # a term never seen in training says nothing about the training tasks
    families = sorted({f for f, _ in train})
    vecs = np.stack([_tfidf(c, idf) for c in counts])
    centroids = []
    for fam in families:
        c = vecs[[i for i, (f, _) in enumerate(train) if f == fam]].mean(axis=0)
        centroids.append(c / max(float(np.linalg.norm(c)), 1e-12))
    if tools is not None and set(families) - set(tools):
        raise ValueError(f"tools: no entry for families {sorted(set(families) - set(tools))}")
    fam = Familiarity(idf, np.stack(centroids).astype(np.float32), families, np.zeros(len(families), np.float32),
                      tools=None if tools is None else np.asarray([bool(tools[f]) for f in families]))

    def own_sims(pairs: list[tuple[str, str]], family: str) -> list[float]:
        return [float(fam.similarities([{"role": "user", "content": t}])[families.index(family)])
                for f, t in pairs if f == family]

    for i, family in enumerate(families):
        sims = own_sims(held_out, family)
        fam.thresholds[i] = np.quantile(sims, quantile) if sims else 0.8 * min(own_sims(train, family))
    fam.meta = {"train_tasks": len(train), "held_out_tasks": sum(f in families for f, _ in held_out),
                "quantile": quantile}
    return fam
