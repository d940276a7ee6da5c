"""The device-side checks of an SLM draft (hera_core.checks.drafts): real sandbox runs."""

import math

import numpy as np
import pytest

from hera_core.checks.drafts import DRAFT_FEATURE_NAMES, check_draft, docstring_examples

F = {name: i for i, name in enumerate(DRAFT_FEATURE_NAMES)}
ASK_CODE = [{"role": "user", "content": "What is 6 * 7?\n\nWrite a short Python program that computes and prints the answer."}]
ASK_ANSWER = ASK_CODE + [{"role": "assistant", "content": "```python\nprint(6 * 7)\n```"},
                         {"role": "user", "content": "The program printed:\n42\nReply with only the final answer, as: ANSWER: <answer>"}]
ASK_LETTER = [{"role": "user", "content": "Q? A) x B) y\nReply with only the letter of the correct option, as: ANSWER: <letter>"}]
FUNCTION = [{"role": "user", "content": 'Complete this function.\n\n```python\ndef add(a, b):\n    """Sum.\n    >>> add(2, 3)\n    5\n    >>> add(-1, 1)\n    0\n    """\n```'}]


def feats(messages, draft, **kw):
    check = check_draft(messages, draft, **kw)
    assert check.features.shape == (len(DRAFT_FEATURE_NAMES),) and check.features.dtype == np.float32
    return check, {name: float(check.features[i]) for name, i in F.items()}


def test_a_program_that_runs_and_prints_a_number():
    check, f = feats(ASK_CODE, "```python\nprint(6 * 7)\n```")
    assert check.passed and f["has_code"] == 1 and f["code_ran"] == 1 and f["code_printed_number"] == 1


def test_a_program_that_fails_is_a_failed_check():
    check, f = feats(ASK_CODE, "```python\nprint(6 * undefined_name)\n```")
    assert not check.passed and f["code_ran"] == 0 and f["code_printed_number"] == -1
    assert "NameError" in check.detail


def test_a_program_that_hangs_times_out():
    check, f = feats(ASK_CODE, "```python\nwhile True:\n    pass\n```", timeout_s=1.0)
    assert not check.passed and f["code_ran"] == 0 and "timed out" in check.detail


def test_the_final_answer_is_read_against_its_prompt():
    _, f = feats(ASK_ANSWER, "ANSWER: 42")
    assert f["asked_answer"] == 1 and f["answer_tagged"] == 1 and f["answer_numeric"] == 1 and f["answer_in_prompt"] == 1
    _, f = feats(ASK_ANSWER, "ANSWER: 41")
    assert f["answer_in_prompt"] == 0
    _, f = feats(ASK_ANSWER, "42")  # untagged short answer: still read
    assert f["answer_tagged"] == 0 and f["answer_numeric"] == 1 and f["has_code"] == 0 and f["code_ran"] == -1


@pytest.mark.parametrize("draft, ok", [("ANSWER: B", True), ("ANSWER: (C)", True), ("ANSWER: maybe", False),
                                       ("The answer is probably the second one", False)])
def test_a_letter_when_a_letter_was_asked(draft, ok):
    check, f = feats(ASK_LETTER, draft)
    assert check.passed is ok and f["answer_letter"] == float(ok)


def test_the_prompts_docstring_examples_run_against_the_draft():
    check, f = feats(FUNCTION, "```python\ndef add(a, b):\n    return a + b\n```")
    assert check.passed and f["examples_pass"] == 1.0
    check, f = feats(FUNCTION, "```python\ndef add(a, b):\n    return a - b + 2 * min(a, 0)\n```")
    assert not check.passed and f["examples_pass"] == 0.0 and "examples" in check.detail
    assert docstring_examples("f(1, 2) == 3\nprose\n", entry="f") == [("f(1, 2)", "3")]


def test_log_probabilities_summarised_and_missing_ones_are_nan():
    _, f = feats(ASK_ANSWER, "ANSWER: 42", token_logprobs=[-0.1, -2.0, -0.3, -0.05, 0.0, -0.2, -0.1, -0.4, -0.3, -0.2])
    assert f["logprob_min"] == pytest.approx(-2.0) and f["logprob_mean"] == pytest.approx(-0.365, abs=1e-5)
    assert f["logprob_min"] <= f["logprob_q10"] <= f["logprob_mean"]
    _, f = feats(ASK_ANSWER, "ANSWER: 42")
    assert math.isnan(f["logprob_min"]) and math.isnan(f["logprob_mean"])
