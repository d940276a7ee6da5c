"""Labels without ground truth: does the SLM's draft of a step do what the cloud's answer did?

Served traffic has no right answers, but a step routed to the cloud has the cloud's answer, and the
SLM can draft the same step on the device (a shadow draft). The step is labelled *substitutable*
when the two agree on what the step does, by the first rule that applies:

1. `tool_calls`: either answer calls tools: the same calls (names, JSON-equal arguments), in order.
2. `program`: both answers hold a Python program: the same behaviour in the sandbox, i.e. the same
   last printed line (or one printing a single value the other's last line ends with: "13" and
   "... is 13."), and where the prompt carries docstring examples of a function, the same results
   of those calls (a program that only defines a function prints nothing).
3. `value`: both answers reduce to a short value: an `ANSWER:` value, a program's printed result,
   a choice letter ("the answer is C"), or a short reply as a whole; equal after normalising
   (case, spaces, commas in numbers, a trailing period, `$`/`%`), the same tokens in another
   format, or one a single value the other ends with.
4. `text`: otherwise free text: token-set F1 of the two answers at least TEXT_F1 (validated against
   the ground-truth substitution labels of the committed traces; see docs/learning.md).

A rule that cannot decide (a program that fails in both answers, a value on one side only) counts
as disagreement: a step is substitutable only on positive evidence.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from hera_core.checks.drafts import CODE_RE, docstring_examples, extract_answer, extract_code
from hera_core.checks.sandbox import Sandbox, default_sandbox, run_python

TEXT_F1 = 0.8  # token-set F1 at or above which two free-text answers agree (docs/learning.md)
SHORT_REPLY = 40  # characters: a reply this short is its own value

CHOICE_RE = re.compile(r"(?:answer|option|choice)\s*(?:is|would be|:)?\s*[:\-]?\s*\(?\**([A-J])\**\)?(?![A-Za-z])",
                       re.I)
NUMBER_CLEAN_RE = re.compile(r"(?<=\d),(?=\d{3}\b)")
TOKEN_RE = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class StepAgreement:
    substitutable: bool
    rule: str  # "tool_calls", "program", "value" or "text"
    detail: str  # the two values compared, shortened, or the similarity


def normalize_value(value: str) -> str:
    v = value.strip().strip("`*").strip()
    v = NUMBER_CLEAN_RE.sub("", v)
    v = v.rstrip(".").strip().lower()
    v = re.sub(r"^\$|%$", "", v).strip()
    v = re.sub(r"\s*,\s*", ",", v)
    return re.sub(r"\s+", " ", v)


def _canonical_calls(calls: list[dict[str, Any]] | None) -> list[tuple[str, str]] | None:
    """(name, arguments as canonical JSON) per call; the arguments string parsed when it is JSON."""
    if not calls:
        return None
    out = []
    for c in calls:
        fn = c.get("function", c)
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        out.append((str(fn.get("name")), json.dumps(args, sort_keys=True, separators=(",", ":"))))
    return out


_BEHAVIOUR_RUNNER = """
for _call in {calls!r}:
    try:
        print(repr(eval(_call)))
    except Exception as _e:
        print(type(_e).__name__)
"""


def program_behaviour(code: str, prompt: str, sandbox: Sandbox, timeout_s: float) -> str | None:
    """What a program does, as text: its last printed line, then the results of the prompt's
    docstring example calls (evaluated after the program). None when it fails or times out."""
    calls = [call for call, _ in docstring_examples(prompt)]
    program = code + ("\n\n" + _BEHAVIOUR_RUNNER.format(calls=calls) if calls else "")
    ok, out = run_python(program, timeout_s=timeout_s, max_output=4000, sandbox=sandbox)
    if not ok:
        return None
    lines = [ln.strip() for ln in out.splitlines() if ln.strip() and out != "(nothing)"]
    if calls:
        return " | ".join(lines[-len(calls):] if len(lines) >= len(calls) else lines)
    return lines[-1] if lines else ""


def short_value(text: str, printed: str | None) -> str | None:
    """The value an answer amounts to, when it has one: `ANSWER:`, what its program printed, a
    choice letter, or the whole reply when it is short."""
    tagged = extract_answer(text)
    if tagged:
        return normalize_value(tagged)
    if printed:
        return normalize_value(printed)
    choices = CHOICE_RE.findall(text)
    if choices:
        return choices[-1].lower()
    bare = CODE_RE.sub("", text).strip()
    if bare and len(bare) <= SHORT_REPLY:
        return normalize_value(bare)
    return None


VALUE_TOKEN_RE = re.compile(r"-?[a-z0-9]+(?:\.[0-9]+)?")


def values_agree(a: str | None, b: str | None) -> bool:
    """Two results (printed lines, answer values) agree: equal after normalising, the same words and
    numbers in the same order in another format ("a, b" and "['a', 'b']"), or one is a single number
    or word that the other ends with ("13" and "The number of 1 bits in 1120951905 is 13."): the same
    result, one side stating it in a sentence. (Not a longer value: "b, c" is not "a, b, c".)"""
    if a is None or b is None:
        return False
    a, b = normalize_value(a), normalize_value(b)
    if a == b:
        return True
    ta, tb = VALUE_TOKEN_RE.findall(a), VALUE_TOKEN_RE.findall(b)
    if ta and ta == tb:  # the same words and numbers in the same order: only the format differs ("a, b", ['a','b'])
        return True
    short, long_ = sorted((ta, tb), key=len)
    return len(short) == 1 and long_[-1:] == short


def token_f1(a: str, b: str) -> float:
    ta, tb = set(TOKEN_RE.findall(a.lower())), set(TOKEN_RE.findall(b.lower()))
    if not ta or not tb:
        return 0.0
    common = len(ta & tb)
    return 2 * common / (len(ta) + len(tb))


def step_agreement(prompt: str, cloud_text: str, draft_text: str, *,
                   cloud_calls: list[dict[str, Any]] | None = None, draft_calls: list[dict[str, Any]] | None = None,
                   sandbox: Sandbox | None = None, timeout_s: float = 5.0, text_f1: float = TEXT_F1) -> StepAgreement:
    """Whether the draft agrees with the cloud's answer of the step `prompt` (its last user
    message) asked for. Blocking: it may run both programs in the sandbox."""
    a_calls, b_calls = _canonical_calls(cloud_calls), _canonical_calls(draft_calls)
    if a_calls or b_calls:
        same = a_calls == b_calls
        return StepAgreement(same, "tool_calls", f"{len(a_calls or [])} vs {len(b_calls or [])} calls"
                             + ("" if same else ": differ"))
    sandbox = sandbox or default_sandbox()
    a_code, b_code = extract_code(cloud_text), extract_code(draft_text)
    if a_code is not None and b_code is not None:
        if not sandbox.status.available:
            return StepAgreement(False, "program", "not run: no sandbox")
        a_out = program_behaviour(a_code, prompt, sandbox, timeout_s)
        b_out = program_behaviour(b_code, prompt, sandbox, timeout_s)
        same = values_agree(a_out, b_out)
        return StepAgreement(same, "program", f"{str(a_out)[:60]!r} vs {str(b_out)[:60]!r}")
    printed = {}
    for side, code in (("cloud", a_code), ("draft", b_code)):
        if code is not None and sandbox.status.available:
            ok, out = run_python(code, timeout_s=timeout_s, sandbox=sandbox)
            printed[side] = (out.splitlines() or [""])[-1] if ok and out != "(nothing)" else None
    a_val = short_value(cloud_text, printed.get("cloud"))
    b_val = short_value(draft_text, printed.get("draft"))
    if a_val is not None or b_val is not None:
        return StepAgreement(values_agree(a_val, b_val), "value", f"{a_val!r} vs {b_val!r}")
    f1 = token_f1(cloud_text, draft_text)
    return StepAgreement(f1 >= text_f1, "text", f"token F1 {f1:.2f}")
