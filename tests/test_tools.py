"""Tool calls: requests checked, calls decoded under the tools' grammar and never returned invalid,
through the engine, the runtime, `hera serve` and real clients (openai SDK, LangChain, AG2)."""

import json

import jsonschema
import pytest

from hera_core.backends.tools import ToolSet, parse_calls, template_messages
from hera_core.errors import InvalidRequestError
from tests.conftest import TINY, run

ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"]}}}
# A schema with the usual shapes: nested object, array, enum, number, boolean, optional fields.
BOOK = {"type": "function", "function": {"name": "book_flight", "parameters": {
    "type": "object", "required": ["route", "passengers", "cabin"], "properties": {
        "route": {"type": "object", "required": ["from", "to"],
                  "properties": {"from": {"type": "string"}, "to": {"type": "string"}}},
        "passengers": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
        "cabin": {"enum": ["economy", "business"]}, "max_price": {"type": "number"},
        "refundable": {"type": "boolean"}}}}}


# --- the request's tools ---------------------------------------------------------------------
@pytest.mark.parametrize("tools,choice,fragment", [
    ("add", None, "must be a list"),
    ([{"type": "function"}], None, "tools[0]"),
    ([{"type": "function", "function": {"name": "bad name!"}}], None, "name"),
    ([ADD, ADD], None, "second function"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}], None, "JSON Schema"),
    ([ADD], "sometimes", "tool_choice"),
    ([ADD], {"type": "function", "function": {"name": "nope"}}, "not among the tools"),
    (None, "required", "needs tools"),
])
def test_malformed_tools_are_the_clients_mistake(tools, choice, fragment):
    with pytest.raises(InvalidRequestError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        ToolSet.parse(tools, choice)


def test_tool_choice_forms():
    assert ToolSet.parse(None) is None and ToolSet.parse([]) is None
    auto = ToolSet.parse([ADD, WEATHER])
    assert auto.choice == "auto" and auto.parallel and auto.callable_names() == ["add", "get_weather"]
    named = ToolSet.parse([ADD, WEATHER], {"type": "function", "function": {"name": "get_weather"}})
    assert named.callable_names() == ["get_weather"] and not named.parallel
    assert not ToolSet.parse([ADD], "required", parallel_tool_calls=False).parallel
    assert named.request_fields()["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


def test_calls_are_parsed_and_checked_against_their_schema():
    ts = ToolSet.parse([ADD, WEATHER])
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    content, calls, errors = parse_calls(text, ts)
    assert content.strip() == "Let me check." and not errors
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("call_") for c in calls)
    # small models write the call bare, fenced or not: the same checks apply
    for bare in ('{"name": "add", "arguments": {"a": 3, "b": 4}}', '```json\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n```'):
        content, calls, errors = parse_calls(bare, ts)
        assert content == "" and len(calls) == 1 and not errors
    for bad, why in (('<tool_call>\n{"name": "add", "arguments": {"a": "x", "b": 2}}\n</tool_call>', "schema"),
                     ('<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', "not among"),
                     ('<tool_call>\n{"name": "add", "arguments": {"a": 1,\n</tool_call>', "not JSON"),
                     ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}', "not closed")):
        _, calls, errors = parse_calls(bad, ts)
        assert not calls and any(why in e for e in errors), (bad, errors)
    assert parse_calls("Just text.", ts) == ("Just text.", [], [])
    assert parse_calls("Just text.", ToolSet.parse([ADD], "required"))[2]  # required, and no call


def test_history_with_calls_is_given_to_templates_as_objects():
    msgs = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"}]
    out = template_messages(msgs)
    assert out[0]["content"] == "" and out[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}
    assert msgs[0]["tool_calls"][0]["function"]["arguments"] == '{"a": 1, "b": 2}'  # the request is not changed
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        template_messages([{"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": "{"}}]}])


def test_cloud_calls_that_break_their_schema_are_left_out():
    ts = ToolSet.parse([ADD])
    ok = {"id": "x1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    bad = {"id": "x2", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    valid, errors = ts.check_openai_calls([ok, bad, {"function": {"name": "add", "arguments": "{"}}])
    assert valid == [ok] and len(errors) == 2


# --- the engine: a call decoded under the grammar is valid, whatever the model --------------------
SCHEMAS = [ADD, WEATHER, BOOK]
PROMPTS = ["Add 17 and 25.", "Book me a business flight from Oslo to Rome for passengers 1 and 2.",
           "What is the weather like in Lima, in fahrenheit?", "Hello!"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_calls_from_the_tiny_model_are_valid_or_not_returned(tiny_engine, prompt):
    """SmolLM2-135M knows nothing of tools. Under the grammar, every call it finishes parses and
    validates; one it does not finish (it can loop inside a free string or array until max_tokens)
    is an error, never a call."""
    ts = ToolSet.parse(SCHEMAS, "required")
    gen = run(tiny_engine.generate([{"role": "user", "content": prompt}], max_tokens=160, toolset=ts))
    for call in gen.tool_calls:
        jsonschema.validate(json.loads(call["function"]["arguments"]), ts.schemas[call["function"]["name"]])
    assert (gen.finish_reason == "tool_calls") == bool(gen.tool_calls) and bool(gen.tool_calls) != bool(gen.tool_errors)
    if prompt == PROMPTS[0]:  # a small schema it finishes
        assert [c["function"]["name"] for c in gen.tool_calls] == ["add"]


def test_a_named_function_is_the_one_called_and_none_calls_nothing(tiny_engine):
    ts = ToolSet.parse(SCHEMAS, {"type": "function", "function": {"name": "book_flight"}})
    gen = run(tiny_engine.generate([{"role": "user", "content": "Add 2 and 3."}], max_tokens=160, toolset=ts))
    assert [c["function"]["name"] for c in gen.tool_calls] == ["book_flight"] and not gen.tool_errors
    gen = run(tiny_engine.generate([{"role": "user", "content": "Add 2 and 3."}], max_tokens=24,
                                   toolset=ToolSet.parse(SCHEMAS, "none")))
    assert not gen.tool_calls and "<tool_call>" not in gen.text


def test_a_call_cut_by_max_tokens_is_an_error_not_a_call(tiny_engine):
    ts = ToolSet.parse([BOOK], "required")
    gen = run(tiny_engine.generate([{"role": "user", "content": "Book a flight."}], max_tokens=6, toolset=ts))
    assert not gen.tool_calls and gen.tool_errors


@pytest.fixture(scope="module")
def qwen_engine():
    """The SLM of the demo: Qwen2.5-Coder-0.5B, whose chat template has a tools section."""
    from hera_core.backends.llamacpp import LlamaCppEngine
    from hera_core.install.models import model_path

    try:
        path = model_path("qwen2.5-coder-0.5b")
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{exc} (make test runs `hera models ensure qwen2.5-coder-0.5b`)")
    engine = LlamaCppEngine(path, name="qwen2.5-coder-0.5b", n_ctx=2048, n_slots=2, n_threads=1)
    yield engine
    run(engine.close())


def test_the_slm_calls_a_tool_by_itself_and_reads_its_result(qwen_engine):
    ts = ToolSet.parse([ADD, WEATHER])
    ask = [{"role": "user", "content": "Use the add tool to compute 1234 + 4321."}]
    gen = run(qwen_engine.generate(ask, max_tokens=64, toolset=ts))
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in gen.tool_calls] == \
        [("add", {"a": 1234, "b": 4321})]
    assert gen.finish_reason == "tool_calls"
    history = ask + [{"role": "assistant", "content": None, "tool_calls": gen.tool_calls},
                     {"role": "tool", "tool_call_id": gen.tool_calls[0]["id"], "content": "5555"}]
    # the tool's answer is in the prompt the template renders
    assert "5555" in qwen_engine.detokenize(qwen_engine.tokenize_messages(history, ts))
    gen = run(qwen_engine.generate(history, max_tokens=64, toolset=ToolSet.parse([ADD], "none")))
    assert "5555" in gen.text and not gen.tool_calls


@pytest.mark.parametrize("choice", ["required", "auto"])
def test_llguidance_runs_the_same_grammar_to_the_same_calls(qwen_engine, choice):
    """local.tool_grammar = "llguidance": the tools' grammar (its Lark form, the call tags as the
    model's special tokens) masks the whole vocabulary at each step; greedy under it gives the
    same calls as llama.cpp's grammar sampler, each valid for its schema."""
    from hera_core.backends.llamacpp import LlamaCppEngine
    from hera_core.install.models import model_path

    llg = LlamaCppEngine(model_path("qwen2.5-coder-0.5b"), n_ctx=2048, n_slots=2, n_threads=1,
                         tool_grammar="llguidance")
    try:
        ts = ToolSet.parse([ADD, WEATHER, BOOK], choice)
        for ask in ("Use the add tool to compute 1234 + 4321.",
                    "Book an economy flight from Oslo to Rome for passengers 1 and 2."):
            msgs = [{"role": "user", "content": ask}]
            mine = run(llg.generate(msgs, max_tokens=160, toolset=ts))
            ref = run(qwen_engine.generate(msgs, max_tokens=160, toolset=ts))
            assert mine.tool_calls and not mine.tool_errors
            for call in mine.tool_calls:
                jsonschema.validate(json.loads(call["function"]["arguments"]), ts.schemas[call["function"]["name"]])
            assert [(c["function"]["name"], c["function"]["arguments"]) for c in mine.tool_calls] == \
                [(c["function"]["name"], c["function"]["arguments"]) for c in ref.tool_calls]
    finally:
        run(llg.close())


def test_an_unknown_grammar_engine_is_refused():
    from hera_core.backends.llamacpp import LlamaCppEngine
    from hera_core.errors import InvalidRequestError
    from hera_core.install.models import model_path

    with pytest.raises(InvalidRequestError, match="tool_grammar"):
        LlamaCppEngine(model_path(TINY), n_ctx=256, tool_grammar="xgrammar")
