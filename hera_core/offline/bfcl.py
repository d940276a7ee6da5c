"""Tool-calling tasks from the Berkeley Function Calling Leaderboard (the `bfcl-eval` package).

Its single-turn categories as one-step agent tasks: the question, the functions offered as OpenAI
tools, and BFCL's own AST checker on the calls the model made (the irrelevance category: correct
when the model calls nothing). bfcl-eval is installed without its dependencies (it pins numpy
1.26.4 and a dozen provider SDKs, none of which its data or checker need); its checker reads one
provider table (`MODEL_CONFIG_MAPPING`, to know that a model's function names carry `_` where BFCL
has `.`), which we provide instead of importing the SDKs behind it.

Function names: BFCL's contain dots (`math.factorial`); OpenAI's may not, so dots become
underscores in the tools and the checker maps them back, as BFCL does for OpenAI's models.

A leaf adapter: it works on BFCL's own entries (dicts) and imports no other offline module;
`workloads.py` turns the entries into `Task`s (an import-linter contract keeps it so).
"""

from __future__ import annotations

import json
import sys
import types
from functools import lru_cache
from typing import Any

from hera_core.offline.package_data import package_file

# family -> BFCL v4 category (single-turn, Python)
CATEGORIES = {"bfcl_simple": "simple_python", "bfcl_multiple": "multiple", "bfcl_parallel": "parallel",
              "bfcl_parallel_multiple": "parallel_multiple", "bfcl_irrelevance": "irrelevance"}
MODEL_NAME = "hera"  # the checker's model key: a model whose function names use _ for .
SYSTEM = "You are a helpful assistant with tools. Call a tool only when one fits the request."


def _data_file(relpath: str) -> str:
    return package_file("bfcl_eval", f"data/{relpath}")


@lru_cache(maxsize=None)
def _load(category: str) -> list[dict[str, Any]]:
    with open(_data_file(f"BFCL_v4_{category}.json")) as f:
        entries = [json.loads(line) for line in f if line.strip()]
    if category != "irrelevance":
        with open(_data_file(f"possible_answer/BFCL_v4_{category}.json")) as f:
            answers = {a["id"]: a["ground_truth"] for a in map(json.loads, filter(str.strip, f))}
        for e in entries:
            e["ground_truth"] = answers[e["id"]]
    return entries


def openai_name(name: str) -> str:
    return name.replace(".", "_")


def _schema(node: Any) -> Any:
    """BFCL's parameter types (dict, float, tuple, any, ...) as JSON Schema, BFCL's own mapping."""
    from bfcl_eval.constants.type_mappings import GORILLA_TO_OPENAPI

    if isinstance(node, list):
        return [_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k == "type" and isinstance(v, str):
            out[k] = GORILLA_TO_OPENAPI.get(v, v)
        elif k == "properties" and isinstance(v, dict):
            out[k] = {name: _schema(sub) for name, sub in v.items()}
        elif k in ("items", "additionalProperties", "anyOf", "oneOf", "allOf"):
            out[k] = _schema(v)
        else:
            out[k] = v
    return out


def openai_tools(functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": openai_name(f["name"]), "description": f.get("description", ""),
                                              "parameters": _schema(f.get("parameters") or {"type": "dict"})}}
            for f in functions]


def entries(family: str) -> list[dict[str, Any]]:
    """All tasks of one BFCL family, in the dataset's order, as the fields of a task: `task_id`,
    `question` (the user's turn), `answer` (the ground truth as JSON) and `entry` (the functions,
    category, messages and ground truth that the harness and `score` read)."""
    category = CATEGORIES[family]
    out = []
    for e in _load(category):
        turn = e["question"][0]  # single-turn: one list of messages
        out.append({"task_id": e["id"],
                    "question": "\n".join(m["content"] for m in turn if m.get("role") == "user"),
                    "answer": json.dumps(e.get("ground_truth", [])),
                    "entry": {"functions": e["function"], "category": category, "messages": turn,
                              "ground_truth": e.get("ground_truth")}})
    return out


def _checker():
    """BFCL's AST checker, with the one provider table it reads supplied here (see the module doc)."""
    name = "bfcl_eval.constants.model_config"
    if name not in sys.modules:
        shim = types.ModuleType(name)

        class _Configs(dict):
            def __missing__(self, key):
                return types.SimpleNamespace(underscore_to_dot=True)

        shim.MODEL_CONFIG_MAPPING = _Configs()
        sys.modules[name] = shim
    from bfcl_eval.constants.enums import Language
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker

    return ast_checker, Language.PYTHON


def score(entry: dict[str, Any], calls: list[dict[str, Any]]) -> float:
    """1.0 when BFCL's checker accepts the calls (OpenAI tool_calls) for a task's `entry`, else 0.0."""
    if entry["category"] == "irrelevance":
        return float(not calls)
    if not calls:
        return 0.0
    try:
        made = [{c["function"]["name"]: json.loads(c["function"]["arguments"])} for c in calls]
    except (KeyError, TypeError, json.JSONDecodeError):
        return 0.0
    ast_checker, python = _checker()
    result = ast_checker(entry["functions"], made, entry["ground_truth"], python, entry["category"], MODEL_NAME)
    return float(bool(result.get("valid")))
