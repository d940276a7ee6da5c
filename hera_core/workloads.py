"""Task families with scorers: the agent workloads HERA is measured on.

Each family is a reasoning-gym generator at settings where the 1.5B cloud stand-in gets a fair
share right (reasoning-gym's defaults are too hard for it: 1 of 24 solved, measured). Tasks are
deterministic in (family, seed, index), and split into train/val/test by task.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

# name -> reasoning-gym dataset and the settings used here (easier than the defaults).
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "gsm_symbolic": ("gsm_symbolic", {}),
    "basic_arithmetic": ("basic_arithmetic", {"min_terms": 3, "max_terms": 5, "min_digits": 2, "max_digits": 3,
                                             "operators": ("+", "-", "*")}),  # its "/" floors oddly
    "letter_counting": ("letter_counting", {"min_words": 5, "max_words": 10}),
    "word_sorting": ("word_sorting", {"min_words": 4, "max_words": 7}),
}


SCORERS = ("reasoning_gym", "exact", "number", "contains")


@dataclass
class Task:
    task_id: str
    family: str
    question: str
    answer: str  # reference answer
    entry: dict[str, Any] = field(repr=False)  # the generator's entry, for its scorer
    scorer: str = "reasoning_gym"  # one of SCORERS

    def score(self, answer: str | None) -> float:
        """1.0 when the family's scorer accepts `answer`, else 0.0 (reasoning-gym gives partial credit
        for some families; a task counts as solved only at full credit)."""
        if answer is None:
            return 0.0
        if self.scorer == "exact":
            return float(normalize_answer(answer).lower() == normalize_answer(self.answer).lower())
        if self.scorer == "number":
            try:
                return float(abs(float(normalize_answer(answer)) - float(normalize_answer(self.answer))) <= 1e-6)
            except ValueError:
                return 0.0
        if self.scorer == "contains":
            return float(normalize_answer(self.answer).lower() in answer.lower())
        dataset = _dataset(self.family, 1, 0)
        return max(1.0 if dataset.score_answer(answer=a, entry=self.entry) >= 1.0 else 0.0
                   for a in {answer, normalize_answer(answer)})


def normalize_answer(answer: str) -> str:
    """Undo formatting a program adds: '94.0' -> '94', 'a,b' -> 'a, b', surrounding quotes."""
    a = answer.strip().strip("'\"").rstrip(".")
    try:
        x = float(a.replace(",", "")) if a.replace(",", "").replace(".", "", 1).lstrip("-").isdigit() else None
    except ValueError:
        x = None
    if x is not None and x.is_integer():
        return str(int(x))
    if "," in a:
        return ", ".join(w.strip().strip("'\"") for w in a.strip("[]").split(","))
    return a


_CACHE: dict[tuple[str, int, int], Any] = {}


def _dataset(family: str, size: int, seed: int):
    import reasoning_gym

    try:
        name, cfg = FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown task family {family!r}; known: {', '.join(FAMILIES)}") from None
    key = (family, size, seed)
    if key not in _CACHE:
        _CACHE[key] = reasoning_gym.create_dataset(name, size=size, seed=seed, **cfg)
    return _CACHE[key]


def split_of(task_id: str, seed: int = 0) -> str:
    """Deterministic train/val/test split by task id: 60/20/20."""
    h = int(hashlib.sha256(f"{seed}:{task_id}".encode()).hexdigest()[:8], 16) % 100
    return "train" if h < 60 else "val" if h < 80 else "test"


def make_tasks(families: list[str] | None = None, per_family: int = 4, seed: int = 0,
               split: str | None = None) -> list[Task]:
    """`per_family` tasks of each family (of `split` only, when given), interleaved by family."""
    families = families or list(FAMILIES)
    by_family: list[list[Task]] = []
    for family in families:
        pool = 8 * per_family + 16 if split else per_family
        ds = _dataset(family, pool, seed)
        tasks = []
        for i in range(pool):
            task_id = f"{family}-{seed}-{i}"
            if split and split_of(task_id, seed) != split:
                continue
            e = ds[i]
            tasks.append(Task(task_id, family, e["question"], str(e["answer"]), e))
            if len(tasks) == per_family:
                break
        by_family.append(tasks)
    return [t for group in zip(*by_family) for t in group]


def load_jsonl_tasks(path: str, split: str | None = None, seed: int = 0) -> list[Task]:
    """A user's own tasks, one JSON object per line:

        {"id": "t1", "question": "...", "answer": "42", "family": "billing", "scorer": "number"}

    `scorer` is exact (case-insensitive after normalization, the default), number (numeric
    equality) or contains (the reference appears in the answer). Splits are by task id, as for
    the built-in families.
    """
    import json
    from pathlib import Path

    tasks = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            task = Task(str(d["id"]), str(d.get("family", "custom")), str(d["question"]), str(d["answer"]), d,
                        scorer=str(d.get("scorer", "exact")))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} line {n}: each line must be a JSON object with id, question and answer ({exc})") from None
        if task.scorer not in SCORERS[1:]:
            raise ValueError(f"{path} line {n}: scorer must be one of {', '.join(SCORERS[1:])}, got {task.scorer!r}")
        if split is None or split_of(task.task_id, seed) == split:
            tasks.append(task)
    return tasks
