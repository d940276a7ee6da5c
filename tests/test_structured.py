"""Structured outputs (#32 item 1): response_format json_object and json_schema through `hera
serve`. A cloud answer is validated before it is returned (one retry, then an error that says
so); a local one decodes under a grammar of the schema where the engine can constrain it, else
the step goes to the cloud with reason `structured`."""

import json
import re

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hera_core.backends.cloud import CloudEngine
from hera_core.backends.structured import ANSWER_TOOL, ResponseFormat, answer_toolset, int_range_gbnf, schema_gbnf
from hera_core.backends.tools import ToolSet
from hera_core.errors import FieldError
from tests.conftest import ServerThread, run
from tests.fake_upstream import FakeUpstream
from tests.test_openai_fields import LOCAL, Q, events, make_server, post, stop
from tests.test_tools import WEATHER

PLAN = {"type": "object", "additionalProperties": False, "required": ["steps", "done"],
        "properties": {"steps": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                       "done": {"type": "boolean"}}}


def schema_format(schema=PLAN, strict=True, name="plan"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}


# --- the request's response_format ------------------------------------------------------------------
@pytest.mark.parametrize("value,fragment", [
    ("json", "must be an object"),
    ({"type": "xml"}, "not one of"),
    ({"type": "json_schema"}, "json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"schema": PLAN}}, "name"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": PLAN}}, "name"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "bogus"}}}, "not a valid JSON Schema"),
    (schema_format({"type": "object", "properties": {"a": {"type": "string"}}}), "additionalProperties"),
    (schema_format({"type": "object", "additionalProperties": False, "properties": {"a": {"type": "string"}}}),
     "leaves out a"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": PLAN, "strict": "yes"}}, "strict"),
])
def test_a_bad_response_format_is_refused_by_name(value, fragment):
    with pytest.raises(FieldError, match=fragment) as err:
        ResponseFormat.parse(value)
    assert err.value.param == "response_format"


def test_validation_of_answers():
    fmt = ResponseFormat.parse(schema_format())
    assert fmt.validate('{"steps": ["a"], "done": false}') is None
    assert "not JSON" in fmt.validate('```json\n{"steps": ["a"], "done": false}\n```')  # a fenced block is not JSON
    assert "steps" in fmt.validate('{"steps": [], "done": false}')
    assert "done" in fmt.validate('{"steps": ["a"]}')
    obj = ResponseFormat.parse({"type": "json_object"})
    assert obj.validate('{"a": 1}') is None and "not an object" in obj.validate("[1]")
    assert ResponseFormat.parse({"type": "text"}) is None and ResponseFormat.parse(None) is None
    assert fmt.request_field() == schema_format() and fmt.size == 2  # steps, done


@given(lo=st.one_of(st.none(), st.integers(-1200, 1200)), hi=st.one_of(st.none(), st.integers(-1200, 1200)),
       exclusive=st.booleans())
@settings(max_examples=150, deadline=None)
def test_an_integer_range_compiles_to_exactly_its_integers(lo, hi, exclusive):
    """The grammar's integer rule (llama-cpp-python's converter has none for minimum/maximum) against
    jsonschema: the same integers on -3000..3000, as JSON spells them (no leading zeros, no -0)."""
    schema = {"type": "integer"}
    if lo is not None:
        schema["exclusiveMinimum" if exclusive else "minimum"] = lo
    if hi is not None:
        schema["exclusiveMaximum" if exclusive else "maximum"] = hi
    alts = int_range_gbnf(schema)
    allowed = [i for i in range(-3000, 3001) if jsonschema.Draft202012Validator(schema).is_valid(i)]
    if lo is None and hi is None or not allowed:
        assert alts is None
        return
    pattern = "|".join("".join(p[1:-1] if p.startswith('"') else p for p in alt.strip("()").split(" "))
                       for alt in alts.split(" | "))
    assert [i for i in range(-3000, 3001) if re.fullmatch(pattern, str(i))] == allowed
    assert not re.fullmatch(pattern, "-0") and not re.fullmatch(pattern, "007")


def test_the_answer_grammar_bounds_integers():
    fmt = ResponseFormat.parse(schema_format({"type": "object", "additionalProperties": False, "required": ["d"],
                                              "properties": {"d": {"type": "integer", "minimum": 1, "maximum": 14}}}))
    grammar = answer_toolset(fmt).grammar(opened=False)
    assert '(([1-9]) | ("1" [0-4])) space' in grammar and "integral-part" not in grammar
    tools = ToolSet.parse([{"type": "function", "function": {"name": "f", "parameters": fmt.schema()}}], "required")
    assert '(([1-9]) | ("1" [0-4])) space' in tools.grammar(opened=False)  # client tools' calls too
    assert answer_toolset(fmt).validate(ANSWER_TOOL, {"d": 15})  # validated against the schema as given


# --- the cloud's answer, validated --------------------------------------------------------------------
class ScriptedAnswers(FakeUpstream):
    """The fault-injection upstream, answering each request with the next of `answers`."""

    def __init__(self, answers):
        super().__init__()
        self.answers = list(answers)

    def _reply(self, body):
        reply = super()._reply(body)
        reply["choices"][0]["message"]["content"] = self.answers.pop(0)
        return reply


@pytest.fixture
def scripted(tiny_engine, tmp_path):
    made = []

    def start(answers):
        up = ScriptedAnswers(answers)
        upstream = ServerThread(up.app)
        srv = make_server(tiny_engine, None, tmp_path, cloud=CloudEngine(upstream.url + "/v1", "fake"))
        made.append((srv, upstream))
        return srv, up

    yield start
    for srv, upstream in made:
        stop(srv)
        upstream.close()


def ask_structured(srv, fmt, **more):
    return post(srv, {"model": "hera", "messages": Q, "max_tokens": 32, "response_format": fmt, **more})


def test_a_valid_cloud_answer_is_returned_and_the_format_reached_the_cloud(scripted):
    srv, up = scripted(['{"steps": ["buy milk"], "done": false}'])
    status, h, body = ask_structured(srv, schema_format())
    assert status == 200 and h["x-hera-route"] == "cloud" and h["x-hera-reason"] == "predictor"  # step 0
    assert json.loads(body["choices"][0]["message"]["content"]) == {"steps": ["buy milk"], "done": False}
    assert up.seen[0]["body"]["response_format"] == schema_format()
    assert "tools" not in up.seen[0]["body"]  # the SLM's way to a structured answer is its own


def test_an_invalid_cloud_answer_is_retried_once(scripted):
    srv, up = scripted(['```json\n{"steps": ["a"]}\n```', '{"steps": ["a"], "done": true}'])
    status, _, body = ask_structured(srv, schema_format())
    assert status == 200 and json.loads(body["choices"][0]["message"]["content"])["done"] is True
    assert len(up.seen) == 2
    row = srv.ledger.rows("serve")[-1]
    assert row["status"] == "ok" and row["prompt_tokens"] == 22  # both calls' tokens booked (11 + 11)


def test_twice_invalid_is_an_error_that_says_so_never_a_bad_answer(scripted):
    srv, up = scripted(["not json", '{"steps": "a", "done": 1}'])
    status, _, body = ask_structured(srv, schema_format())
    assert status == 502 and body["error"]["code"] == "StructuredOutputError"
    assert "not JSON" in body["error"]["message"] and "does not match the schema" in body["error"]["message"]
    assert srv.ledger.rows("serve")[-1]["status"] == "StructuredOutputError"


def test_json_object_rejects_an_array(scripted):
    srv, _ = scripted(["[1, 2]", "[3]"])
    status, _, body = ask_structured(srv, {"type": "json_object"})
    assert status == 502 and "not an object" in body["error"]["message"]


def test_a_streamed_structured_answer_is_sent_only_once_valid(scripted):
    srv, up = scripted(["Sure! here it is", '{"steps": ["x"], "done": false}', "nope", "nope"])
    status, _, text = ask_structured(srv, schema_format(), stream=True)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in events(text) if c.get("choices"))
    assert status == 200 and json.loads(content) == {"steps": ["x"], "done": False}
    assert "Sure" not in text  # the invalid first answer never reached the client
    status, _, text = ask_structured(srv, schema_format(), stream=True)
    errors = [c for c in events(text) if "error" in c]
    assert errors and errors[0]["error"]["code"] == "StructuredOutputError"


# --- through the real models ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def srv(tiny_engine, cloud_url, tmp_path_factory):
    s = make_server(tiny_engine, cloud_url, tmp_path_factory.mktemp("structured"), max_tokens=64)
    yield s
    stop(s)


BOUNDED = {"type": "object", "additionalProperties": False, "required": ["steps", "done"],
           "properties": {"steps": {"type": "array", "items": {"type": "string", "maxLength": 30}, "minItems": 1,
                                    "maxItems": 3},
                          "done": {"type": "boolean"}}}


def test_a_local_structured_answer_decodes_under_the_schema(srv):
    """SmolLM2-135M writes no JSON by itself; under the grammar its answer is an instance of the schema."""
    ask = [{"role": "user", "content": "Plan a trip to Paris."}]
    # (json_object bounds nothing: asked to plan, the tiny model's object can run past max_tokens,
    # and a cut one is refused (tested below), depending on the engine's cache state; asked for
    # one short field, it closes its object)
    short = [{"role": "user", "content": 'Reply with a JSON object with one key "city" for a trip to Paris.'}]
    for fmt, msgs in ((schema_format(BOUNDED), ask), ({"type": "json_object"}, short)):
        status, h, body = post(srv, {"model": "hera", "messages": msgs, "max_tokens": 160, "response_format": fmt},
                               LOCAL)
        assert status == 200 and h["x-hera-route"] == "local", (fmt, body)
        answer = json.loads(body["choices"][0]["message"]["content"])
        jsonschema.validate(answer, fmt.get("json_schema", {}).get("schema", {"type": "object"}))
        assert body["choices"][0]["finish_reason"] == "stop" and not body["choices"][0]["message"].get("tool_calls")
    status, _, text = post(srv, {"model": "hera", "messages": ask, "max_tokens": 160, "stream": True,
                                 "response_format": schema_format(BOUNDED)}, LOCAL)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in events(text) if c.get("choices"))
    jsonschema.validate(json.loads(content), BOUNDED)


def test_a_structured_step_is_a_forced_answer_call_to_the_predictor(srv):
    """On an engine with its own structured decoding, the tool features of a structured step
    describe the forced answer call it would be on an engine without one (tools offered 1, forced
    1), and its row carries the schema's size; the prompt itself is not changed."""
    from hera_core.routing.predictor import FEATURE_NAMES
    from hera_core.routing.step import StepRequest

    fmt = ResponseFormat.parse(schema_format())
    msgs = [{"role": "user", "content": "Plan a short trip."}]
    plain = srv.call(srv.rt.plan(StepRequest(msgs, "f", step=1)))[1]
    shaped = srv.call(srv.rt.plan(StepRequest(msgs, "f", step=1, response_format=fmt)))[1]
    col = {name: i for i, name in enumerate(FEATURE_NAMES)}
    assert plain.features[0, col["tools_offered"]] == 0 and shaped.features[0, col["tools_offered"]] == 1
    assert shaped.features[0, col["tool_choice_forced"]] == 1
    assert plain.features[0, col["answer_schema_size"]] == 0 and shaped.features[0, col["answer_schema_size"]] == 2
    assert shaped.prefill.prompt_tokens == plain.prefill.prompt_tokens  # the same prompt, scored


def test_a_cut_local_answer_is_never_returned(srv):
    """An unbounded array the tiny model repeats until max_tokens: no valid answer, so none is sent."""
    status, _, body = post(srv, {"model": "hera", "messages": [{"role": "user", "content": "Plan a trip to Paris."}],
                                 "max_tokens": 24, "response_format": schema_format(PLAN)}, LOCAL)
    if status == 200:
        jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), PLAN)
    else:
        assert status == 502 and body["error"]["code"] == "StructuredOutputError"
        assert srv.ledger.rows("serve")[-1]["status"] == "StructuredOutputError"


def test_any_root_decodes_on_the_slm(srv):
    """The engine's own response_format grammar takes any schema, not only an object (what a
    function's arguments would be)."""
    ints = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4}
    status, h, body = post(srv, {"model": "hera", "messages": Q, "max_tokens": 32,
                                 "response_format": schema_format(ints, strict=False)}, LOCAL)
    assert status == 200 and h["x-hera-route"] == "local"
    jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), ints)


@pytest.mark.parametrize("extra", [{"response_format": {"type": "json_object"}, "tools": [WEATHER]}])
def test_what_the_slm_cannot_constrain_goes_to_the_cloud(srv, extra):
    messages = Q + [{"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}]  # step 1
    status, h, body = post(srv, {"model": "hera", "messages": messages, "max_tokens": 24, **extra})
    assert h.get("x-hera-reason") == "structured" or (status == 502 and "StructuredOutputError" in str(body))
    status, _, body = post(srv, {"model": "hera", "messages": messages, **extra}, LOCAL)
    assert status == 400 and "structured" in body["error"]["message"]


def test_structured_steps_never_return_an_invalid_answer(srv):
    """Whatever the route: a 200 carries an answer that validates, anything else is an error that says so."""
    for messages in (Q, Q + [{"role": "assistant", "content": "Blue."}, {"role": "user", "content": "A plan?"}]):
        status, h, body = post(srv, {"model": "hera", "messages": messages, "max_tokens": 96,
                                     "response_format": schema_format(BOUNDED)})
        if status == 200:
            jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), BOUNDED)
        else:
            assert status == 502 and body["error"]["code"] == "StructuredOutputError"


def test_n_with_a_format_is_refused_by_name(srv):
    status, _, body = post(srv, {"model": "hera", "messages": Q, "n": 2, "response_format": {"type": "json_object"}})
    assert status == 400 and body["error"]["param"] == "n"


def test_the_cloud_route_answers_a_schema_too(srv):
    """The stand-in cloud decodes under the schema like a provider with structured outputs: step 0
    (the cloud's) comes back valid, checked by HERA before it is returned."""
    status, h, body = post(srv, {"model": "hera", "messages": [{"role": "user", "content": "Plan a trip to Rome."}],
                                 "max_tokens": 160, "response_format": schema_format(BOUNDED)})
    assert status == 200 and h["x-hera-route"] == "cloud", body
    jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), BOUNDED)


# --- clients: typed results through hera serve ------------------------------------------------------------
def _trip_model():
    from typing import Literal

    from pydantic import BaseModel, Field

    class Trip(BaseModel):
        city: str = Field(max_length=24)
        days: int = Field(ge=1, le=14)
        season: Literal["spring", "summer", "autumn", "winter"]

    return Trip


@pytest.mark.parametrize("policy", ["local-only", "cloud-only"])
def test_langchain_with_structured_output(srv, policy):
    from langchain_openai import ChatOpenAI

    from tests.test_openai_fields import KEY

    Trip = _trip_model()
    llm = ChatOpenAI(model="hera", base_url=srv.url + "/v1", api_key=KEY, max_tokens=96, max_retries=0,
                     default_headers={"X-Hera-Policy": policy})
    trip = llm.with_structured_output(Trip).invoke("Plan a short trip to Lisbon.")  # method json_schema (strict)
    assert isinstance(trip, Trip) and 1 <= trip.days <= 14
    assert srv.ledger.rows("serve")[-1]["route"] == policy.split("-")[0]


@pytest.mark.parametrize("output", ["native", "tool"])
def test_pydantic_ai_agent_with_a_typed_output(srv, output):
    from pydantic_ai import Agent, NativeOutput
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from openai import AsyncOpenAI

    from tests.test_openai_fields import KEY

    Trip = _trip_model()
    client = AsyncOpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0,
                         default_headers={"X-Hera-Policy": "local-only"})
    model = OpenAIChatModel("hera", provider=OpenAIProvider(openai_client=client))
    # native: response_format json_schema; tool: pydantic-ai's own output tool, a forced tool call (one:
    # SmolLM2 repeats a call until max_tokens when the grammar allows several)
    agent = Agent(model, output_type=NativeOutput(Trip) if output == "native" else Trip,
                  model_settings={"max_tokens": 256, "parallel_tool_calls": False})
    result = agent.run_sync("Plan a short trip to Lisbon.")
    assert isinstance(result.output, Trip) and 1 <= result.output.days <= 14


def test_json_strings_hold_no_raw_control_characters():
    """llama-cpp-python's converter lets a newline into a string (SmolLM2 then wrote one, and the
    answer did not parse); the grammar HERA compiles excludes them, as llama.cpp's own does."""
    gbnf = schema_gbnf({"type": "object", "properties": {"s": {"type": "string"}}})
    assert 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |' in gbnf


def test_llguidance_compiles_the_schema_itself(tiny_model_path):
    """With local.tool_grammar = "llguidance" the schema goes to llguidance as JSON Schema (its Lark
    form of the converter's GBNF nests too deeply for strings with maxLength)."""
    from hera_core.backends.llamacpp import LlamaCppEngine

    schema = {"type": "object", "additionalProperties": False, "required": ["city", "days", "note"],
              "properties": {"city": {"type": "string", "maxLength": 24}, "note": {"type": "string", "maxLength": 40},
                             "days": {"type": "integer", "minimum": 1, "maximum": 14}}}
    fmt = ResponseFormat.parse(schema_format(schema))

    async def go():
        engine = LlamaCppEngine(tiny_model_path, n_ctx=1024, n_threads=1, n_slots=1, tool_grammar="llguidance")
        try:
            return await engine.generate([{"role": "user", "content": "Plan a trip to Oslo."}], max_tokens=96,
                                         response_format=fmt)
        finally:
            await engine.close()

    gen = run(go())
    assert gen.finish_reason == "stop" and fmt.validate(gen.text) is None, gen.text
