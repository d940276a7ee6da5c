"""Writes stream.jsonl: the task stream of the learning evaluation, 200 tasks of eight reasoning-gym
families that no shipped predictor was trained on (25 each), interleaved the way a served agent's
traffic arrives, in `hera profile/eval --tasks-file` format. Seed 11 (the unfamiliar-task
evaluation used seed 7 for the same families), written before any learning result was seen.

    .venv/bin/python bench/eval/learn/make_stream.py
"""

import json
import random
from pathlib import Path

import reasoning_gym

# family -> the task file's scorer for its answers
FAMILIES = {"count_bits": "number", "gcd": "number", "lcm": "number", "leg_counting": "number",
            "spell_backward": "exact", "caesar_cipher": "exact", "base_conversion": "exact",
            "word_sequence_reversal": "exact"}
PER_FAMILY = 25
SEED = 11

if __name__ == "__main__":
    tasks = []
    for family, scorer in FAMILIES.items():
        for i, e in enumerate(reasoning_gym.create_dataset(family, size=PER_FAMILY, seed=SEED)):
            tasks.append({"id": f"{family}-{i}", "family": family, "question": e["question"],
                          "answer": str(e["answer"]), "scorer": scorer})
    random.Random(SEED).shuffle(tasks)  # traffic mixes the agent's kinds of work
    out = Path(__file__).with_name("stream.jsonl")
    out.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    print(f"{len(tasks)} tasks -> {out}")
