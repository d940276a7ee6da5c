"""Checks of one SLM draft, run on the device, and the output-side features they give.

Why: the SLM's prefill (what the first-stage predictor reads) ranks whether the SLM will do well at
chance on the step that decides most tasks; what the SLM actually wrote separates good drafts from
bad ones much better (FrugalGPT, AutoMix, CodeT). The checks are generic: they read the draft and
the prompt that asked for it, not a task's hidden answer.

- a ```python block in the draft: does it run (sandbox, timeout) and print, and is what it prints
  a number?
- the prompt asks for `ANSWER: <...>`: is the answer there, and is it a number, a letter, or a
  value the prompt itself already states (a tool's output the step only has to pass on)?
- the prompt holds a function's docstring examples (`>>> f(1)` / `f(1) == 2`): does the draft's
  code pass them?
- the draft's token log-probabilities (min, 10% quantile, mean) where the engine recorded them.

Every feature is a float; -1 means "does not apply", NaN "not measured" (XGBoost treats NaN as
missing, so a model trained without log-probabilities ignores them).
"""

from __future__ import annotations

import doctest
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from hera_core.checks.sandbox import SandboxUnavailableError, default_sandbox, run_python

CODE_RE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)
ANSWER_RE = re.compile(r"ANSWER:\s*(.+)", re.I)
FENCE_RE = re.compile(r"^[ \t]*```\w*[ \t]*$", re.M)
ASKS_ANSWER_RE = re.compile(r"ANSWER:\s*<", re.I)
ASKS_LETTER_RE = re.compile(r"\bletter\b", re.I)
LETTER_RE = re.compile(r"^\(?([A-J])\)?[.)]?$")
NUMBER_RE = re.compile(r"^[-+]?\$?\d[\d,]*(\.\d+)?%?$|^[-+]?\d+/\d+$")
# Lines such as `f(1, 2) == 3` or `f(1) ➞ 3` in docstrings that do not use the doctest format.
EXAMPLE_LINE_RE = re.compile(r"^\s*(?:>>>\s*)?([A-Za-z_]\w*\(.*\))\s*(?:==>|==|➞|=>|->|returns|should return)\s*(.+?)\s*$")

DRAFT_FEATURE_NAMES = (
    "draft_tokens",          # completion tokens of the draft
    "has_code",              # 1: a ```python block
    "code_ran",              # -1 no code; 0 failed or timed out; 1 exited 0
    "code_printed_number",   # -1 no code or it failed; 1 it printed a number; 0 something else or nothing
    "asked_answer",          # 1: the prompt asks for `ANSWER: <...>`
    "answer_tagged",         # 1: the draft has an `ANSWER:` line
    "answer_numeric",        # -1 no short answer; 1 the answer is a number
    "answer_letter",         # -1 the prompt asks for no letter; 1 the answer is one letter
    "answer_in_prompt",      # -1 no short answer; 1 the answer appears verbatim in the last user turn
    "examples_pass",         # -1 no docstring examples or no code; share of examples that pass
    "logprob_min",           # min token log-probability of the draft (NaN: not recorded)
    "logprob_q10",           # 10% quantile
    "logprob_mean",          # mean
)


@dataclass
class DraftCheck:
    features: np.ndarray  # float32 [len(DRAFT_FEATURE_NAMES)]
    passed: bool  # no check that applies failed (code ran, examples pass, a letter when asked)
    detail: str  # the first failure, or "ok"
    agreement: "Agreement | None" = None  # how samples of the step voted (policy.agreement_k > 0)


def vote_key(text: str, timeout_s: float = 5.0, prelude: str = "") -> str:
    """What an answer amounts to, for voting among samples of one step: the last line its
    program prints (run in the sandbox, after `prelude` as for `check_draft`), else its `ANSWER:`
    value, else its text, normalized."""
    code = extract_code(text)
    if code:
        try:
            ok, out = run_python(prelude + code, timeout_s=timeout_s, sandbox=default_sandbox())
        except SandboxUnavailableError:
            return f"unverified:{uuid.uuid4().hex}"  # no sandbox: an answer nothing can confirm agrees with none
        lines = [ln.strip() for ln in out.strip().splitlines() if ln.strip()]
        return f"out:{lines[-1] if ok and lines else '(failed)'}"
    answer = extract_answer(text)
    if answer:
        return f"ans:{answer.strip().lower()}"
    return "text:" + re.sub(r"\s+", " ", text.strip().lower())[:200]


def votable(key: str) -> bool:
    """Samples can be compared on this answer: a program's output or an `ANSWER:` value, not free
    text (sampled prose almost never repeats word for word, so its agreement says nothing)."""
    return not key.startswith("text:")


@dataclass
class Agreement:
    share: float  # of the samples, the share whose answer matches the draft's
    majority: int  # index (0 = the draft, i = sample i) of an answer of the largest group
    majority_share: float  # that group's share of the draft and the samples together
    samples: int  # samples drawn (fewer than asked when the first ones all agreed)


FIRST_VOTES = 2  # samples drawn first; the rest only when these do not all agree with the draft


def staged_agreement(draft_key: str, sample_keys: list[str]) -> Agreement:
    """The vote the runtime takes with early stopping, replayed from recorded samples: the first
    FIRST_VOTES decide alone when they all agree with the draft, else all of them vote."""
    first = sample_keys[:FIRST_VOTES]
    if first and all(k == draft_key for k in first):
        return agreement(draft_key, first)
    return agreement(draft_key, sample_keys)


def agreement(draft_key: str, sample_keys: list[str]) -> Agreement:
    """How the samples vote against the draft. Ties between groups go to the draft's group."""
    keys = [draft_key, *sample_keys]
    counts = {k: keys.count(k) for k in keys}
    best = max(counts.values())
    winner = draft_key if counts[draft_key] == best else next(k for k in keys if counts[k] == best)
    return Agreement(share=sum(k == draft_key for k in sample_keys) / len(sample_keys) if sample_keys else 1.0,
                     majority=keys.index(winner), majority_share=best / len(keys), samples=len(sample_keys))


def extract_code(text: str) -> str | None:
    m = CODE_RE.search(text)
    return m.group(1) if m else None


def extract_answer(text: str) -> str | None:
    m = ANSWER_RE.search(text)
    return m.group(1).strip().strip("`").strip() if m else None


def docstring_examples(text: str, entry: str | None = None) -> list[tuple[str, str]]:
    """(call, expected) pairs from a docstring: doctest examples, else `call == value` lines
    (of the function `entry` when given)."""
    text = FENCE_RE.sub("", text)  # a fence right after an example would read as part of its output
    try:
        examples = [(e.source.strip(), e.want.strip()) for e in doctest.DocTestParser().get_examples(text)
                    if e.want.strip()]
    except ValueError:  # malformed doctest indentation in a prompt: fall back to the line pattern
        examples = []
    if not examples:
        for line in text.splitlines():
            m = EXAMPLE_LINE_RE.match(line)
            if m and (entry is None or m.group(1).startswith(entry + "(")):
                examples.append((m.group(1), m.group(2).rstrip(".")))
    return examples


EXAMPLE_RUNNER = """
_fails, _ran = [], 0
for _call, _want in _EXAMPLES:
    try:
        _expected = eval(_want)
    except Exception:
        continue  # prose such as "19 - 5 - 6 = 8": not checkable
    _ran += 1
    try:
        _got = eval(_call)
    except Exception as _e:
        _got = f"{type(_e).__name__}: {_e}"
    if _got != _expected:
        _fails.append(f"{_call} returned {_got!r}, expected {_want}")
print(f"{_ran - len(_fails)}/{_ran}")
if _fails:
    raise AssertionError("; ".join(_fails[:2]))
"""


def run_examples(code: str, examples: list[tuple[str, str]], prelude: str = "",
                 timeout_s: float = 10.0) -> tuple[bool, str]:
    """Run (call, expected) examples against `code` in the sandbox: (all passed, output or error)."""
    program = prelude + code + "\n\n_EXAMPLES = " + repr(examples) + EXAMPLE_RUNNER
    return run_python(program, timeout_s=timeout_s, sandbox=default_sandbox())


def _is_number(s: str) -> bool:
    return bool(NUMBER_RE.match(s.replace(" ", "")))


def logprob_summary(token_logprobs: list[float] | None) -> tuple[float, float, float]:
    if not token_logprobs:
        return math.nan, math.nan, math.nan
    lp = np.asarray(token_logprobs, dtype=np.float64)
    return float(lp.min()), float(np.quantile(lp, 0.1)), float(lp.mean())


def _last_user(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            return m["content"]
    return ""


def check_draft(messages: list[dict[str, Any]], draft: str, *, completion_tokens: int | None = None,
                token_logprobs: list[float] | None = None, timeout_s: float = 5.0, prelude: str = "") -> DraftCheck:
    """Check the SLM's draft of the step that `messages` asks for. Blocking (it may run code in
    the sandbox): call it from a worker thread on an event loop. `prelude`: code the draft's
    program runs after, as the task's tool would run it (names the prompt says are defined)."""
    prompt = _last_user(messages)
    code = extract_code(draft)
    failures: list[str] = []

    code_ran = printed_number = -1.0
    if code is not None and not default_sandbox().status.available:
        # Model code runs only in the sandbox: where there is none, the draft's program is not
        # checked, and a draft that cannot be checked does not pass (the step is escalated).
        return _unchecked_draft(draft, completion_tokens, token_logprobs, default_sandbox().status.detail)
    if code is not None:
        ok, out = run_python(prelude + code, timeout_s=timeout_s, sandbox=default_sandbox())
        code_ran = 1.0 if ok else 0.0
        if ok:
            printed_number = 1.0 if _is_number(out.strip().splitlines()[-1] if out.strip() else "") else 0.0
        else:
            failures.append(f"the draft's program failed: {out}")

    asked_answer = bool(ASKS_ANSWER_RE.search(prompt))
    tagged = extract_answer(draft)
    short = tagged if tagged is not None else (draft.strip() if code is None and len(draft.strip()) <= 40 else None)
    answer_numeric = -1.0 if not short else float(_is_number(short))
    asks_letter = asked_answer and bool(ASKS_LETTER_RE.search(prompt))
    answer_letter = -1.0
    if asks_letter:
        answer_letter = float(bool(short) and bool(LETTER_RE.match(short.strip())))
        if not answer_letter:
            failures.append("the prompt asks for a letter and the draft gives none")
    answer_in_prompt = -1.0 if not short else float(short.strip() in prompt)

    examples_pass = -1.0
    examples = docstring_examples(prompt)
    if examples and code is not None:
        ok, out = run_examples(code, examples, timeout_s=timeout_s)
        m = re.match(r"(\d+)/(\d+)", out)
        if m and int(m.group(2)):
            examples_pass = int(m.group(1)) / int(m.group(2))
        else:
            examples_pass = 1.0 if ok else 0.0
        if not ok:
            failures.append(f"the draft fails the prompt's examples: {out}")

    tokens = completion_tokens if completion_tokens is not None else max(1, len(draft) // 4)
    feats = [float(tokens), float(code is not None), code_ran, printed_number, float(asked_answer),
             float(tagged is not None), answer_numeric, answer_letter, answer_in_prompt, examples_pass,
             *logprob_summary(token_logprobs)]
    return DraftCheck(np.asarray(feats, dtype=np.float32), not failures, failures[0] if failures else "ok")


def _unchecked_draft(draft: str, completion_tokens: int | None, token_logprobs: list[float] | None,
                     why: str) -> DraftCheck:
    tokens = completion_tokens if completion_tokens is not None else max(1, len(draft) // 4)
    feats = np.full(len(DRAFT_FEATURE_NAMES), np.nan, dtype=np.float32)
    feats[0], feats[1] = float(tokens), 1.0
    feats[-3:] = logprob_summary(token_logprobs)
    return DraftCheck(feats, False, f"the draft's program was not run (no sandbox: {why})")
