"""Writes tasks.jsonl: 72 tasks of eight reasoning-gym families that no shipped predictor was trained
on (9 each), in `hera profile/eval --tasks-file` format, to measure HERA on unfamiliar tasks.

    .venv/bin/python bench/eval/unfamiliar/make_tasks.py
"""

import json
from pathlib import Path

import reasoning_gym

# family -> the task file's scorer for its answers
FAMILIES = {"count_bits": "number", "gcd": "number", "lcm": "number", "leg_counting": "number",
            "spell_backward": "exact", "caesar_cipher": "exact", "base_conversion": "exact",
            "word_sequence_reversal": "exact"}
PER_FAMILY = 9

if __name__ == "__main__":
    lines = []
    for family, scorer in FAMILIES.items():
        for i, e in enumerate(reasoning_gym.create_dataset(family, size=PER_FAMILY, seed=7)):
            lines.append(json.dumps({"id": f"{family}-{i}", "family": family, "question": e["question"],
                                     "answer": str(e["answer"]), "scorer": scorer}))
    out = Path(__file__).with_name("tasks.jsonl")
    out.write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} tasks -> {out}")
