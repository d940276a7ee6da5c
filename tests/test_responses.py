"""The Responses API (#32 item 3) through `hera serve` with the openai SDK's responses client:
text and items, instructions, previous_response_id, function tools and their outputs, streamed
events; the same per-step routing and ledger as chat completions (SmolLM2 local, SmolLM2 behind
real HTTP as the cloud; step 0 goes to the cloud, later steps stay local)."""

import json
from pathlib import Path

import openai
import pytest

from hera_core.serving.responses import RESPONSE_FIELDS, ResponseStore, fields_markdown, input_messages
from hera_core.errors import FieldError
from hera_core.serving.openai_api import Handling
from tests.conftest import TINY
from tests.test_openai_fields import KEY, LOCAL, make_server, post, stop
from tests.test_tools import WEATHER

FLAT_WEATHER = {"type": "function", **WEATHER["function"]}  # the Responses API's tool shape


@pytest.fixture(scope="module")
def srv(tiny_engine, cloud_url, tmp_path_factory):
    s = make_server(tiny_engine, cloud_url, tmp_path_factory.mktemp("responses"), max_tokens=32)
    yield s
    stop(s)


@pytest.fixture
def client(srv):
    with openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0) as c:
        yield c


def test_text_input_is_one_routed_step(client, srv):
    raw = client.responses.with_raw_response.create(model="hera", input="Name a colour.", max_output_tokens=16)
    resp = raw.parse()
    assert raw.headers["x-hera-route"] == "cloud" and raw.headers["x-hera-reason"] == "predictor"
    assert resp.object == "response" and resp.status in ("completed", "incomplete") and resp.output_text
    assert resp.usage.input_tokens > 0 and 0 < resp.usage.output_tokens <= 16
    row = srv.ledger.rows("serve")[-1]
    assert (row["route"], row["step"], row["completion_tokens"]) == ("cloud", 0, resp.usage.output_tokens)


def test_previous_response_id_continues_the_conversation_as_its_next_step(client, srv):
    first = client.responses.create(model="hera", input="Name a colour.", instructions="Answer in one word.",
                                    max_output_tokens=8)
    raw = client.responses.with_raw_response.create(model="hera", input="Another one?", previous_response_id=first.id,
                                                    max_output_tokens=8)
    second = raw.parse()
    assert raw.headers["x-hera-route"] == "local" and second.previous_response_id == first.id  # step 1: local
    # the previous answer is in the prompt: a longer one than the question alone
    alone = client.responses.create(model="hera", input="Another one?", max_output_tokens=8)
    assert second.usage.input_tokens > alone.usage.input_tokens
    assert client.responses.retrieve(first.id).output_text == first.output_text
    unkept = client.responses.create(model="hera", input="Hi", store=False, max_output_tokens=4)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="hera", input="And?", previous_response_id=unkept.id)
    assert err.value.body["param"] == "previous_response_id"


def test_streamed_events_carry_the_answer(client):
    stream = client.responses.create(model="hera", input=[{"role": "user", "content": "Name a colour."}],
                                     max_output_tokens=16, stream=True, extra_headers=LOCAL)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in ("response.completed",
                                                                                         "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and text == events[-1].response.output_text
    done = [e for e in events if e.type == "response.output_text.done"]
    assert done[0].text == text


def test_the_sdks_stream_helper(client):
    # (the helper wants response.completed: an answer that ends before max_output_tokens)
    with client.responses.stream(model="hera", input="Name a colour.", instructions="Answer with one word.",
                                 max_output_tokens=200, extra_headers=LOCAL) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(deltas)


def test_function_tools_and_their_outputs(client, srv):
    resp = client.responses.create(model="hera", input="What is the weather in Paris?", tools=[FLAT_WEATHER],
                                   tool_choice="required", max_output_tokens=96, extra_headers=LOCAL)
    calls = [o for o in resp.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and "city" in json.loads(calls[0].arguments)
    follow = client.responses.create(
        model="hera", previous_response_id=resp.id, tools=[FLAT_WEATHER], max_output_tokens=24, extra_headers=LOCAL,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 C, sunny"}])
    assert follow.output and srv.ledger.rows("serve")[-1]["step"] == 1  # the call was the assistant's turn
    streamed = list(client.responses.create(model="hera", input="What is the weather in Rome?", tools=[FLAT_WEATHER],
                                            tool_choice="required", max_output_tokens=96, stream=True,
                                            extra_headers=LOCAL))
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert done and "city" in json.loads(done[0].arguments)


def test_structured_text_format_is_response_format(client):
    fmt = {"type": "json_schema", "name": "colour", "strict": True,
           "schema": {"type": "object", "additionalProperties": False, "required": ["colour"],
                      "properties": {"colour": {"type": "string"}}}}
    try:
        raw = client.responses.with_raw_response.create(model="hera", input="Name a colour.", text={"format": fmt},
                                                        max_output_tokens=32)
    except openai.APIStatusError as exc:  # the cloud did not validate, twice: said so
        assert exc.status_code == 502 and exc.body["code"] == "StructuredOutputError"
        return
    assert "colour" in json.loads(raw.parse().output_text)


def test_input_items_become_chat_messages():
    msgs = input_messages([
        {"role": "developer", "content": "be brief"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}])
    assert [m["role"] for m in msgs] == ["developer", "user", "assistant", "tool", "user"]
    assert [c["id"] for c in msgs[2]["tool_calls"]] == ["c1", "c2"] and msgs[3]["tool_call_id"] == "c1"
    assert msgs[4]["content"][0]["type"] == "image_url"
    for bad in ([], [{"type": "web_search_call"}], [{"role": "wizard", "content": "x"}],
                [{"type": "function_call", "name": "f"}]):
        with pytest.raises(FieldError) as err:
            input_messages(bad)
        assert err.value.param == "input"


def test_the_store_is_bounded():
    store = ResponseStore(max_entries=2)
    for i in range(3):
        store.put(f"r{i}", [{"role": "user", "content": str(i)}], {"id": f"r{i}"})
    assert len(store) == 2 and store.get("r0") is None and store.conversation("r2")[0]["content"] == "2"
    with pytest.raises(FieldError):
        store.conversation("r0")


@pytest.mark.parametrize("field,value", [
    ("top_k", 3), ("background", True), ("conversation", "conv_1"), ("prompt", {"id": "p"}),
    ("max_tool_calls", 2), ("truncation", "auto"), ("include", ["file_search_call.results"]),
    ("tools", [{"type": "web_search"}]), ("input", [{"type": "computer_call"}]), ("model", TINY),
    ("previous_response_id", "resp_nope"), ("service_tier", "flex"),
])
def test_refused_fields_name_themselves(srv, field, value):
    status, _, body = post(srv, {"model": "hera", "input": "Hi", "max_output_tokens": 4, field: value},
                           path="/v1/responses")
    assert status == 400 and body["error"]["param"] == field, body


def test_cloud_fields_send_the_step_to_the_cloud(srv):
    status, h, _ = post(srv, {"model": "hera", "input": [{"role": "user", "content": "Hi"}, {"role": "assistant",
                              "content": "Hello"}, {"role": "user", "content": "Bye"}],
                              "max_output_tokens": 4, "reasoning": {"effort": "low"}}, path="/v1/responses")
    assert status == 200 and h["x-hera-route"] == "cloud" and h["x-hera-reason"] == "reasoning_effort"


def test_every_responses_field_is_in_the_docs():
    doc = (Path(__file__).parents[1] / "docs" / "openai-api.md").read_text()
    assert fields_markdown() in doc
    assert {n for n, f in RESPONSE_FIELDS.items() if f.handling is Handling.REFUSED} >= {"background", "prompt"}


def test_logprobs_are_included_on_request(client):
    resp = client.responses.create(model="hera", input="Name a colour.", max_output_tokens=8, top_logprobs=2,
                                   include=["message.output_text.logprobs"], extra_headers=LOCAL)
    part = resp.output[0].content[0]
    assert len(part.logprobs) == resp.usage.output_tokens and "".join(t.token for t in part.logprobs) == part.text
    assert all(len(t.top_logprobs) == 2 for t in part.logprobs)


# One value per Responses field: honoured ones must be served (200, and the stated effect where it
# can be seen in the response), cloud ones send the step to the cloud naming the field, refused ones
# are a 400 naming it.
SAMPLES = {
    "model": "hera", "input": "Hi", "instructions": "Be brief.", "previous_response_id": None, "store": False,
    "tools": [FLAT_WEATHER], "tool_choice": "none", "parallel_tool_calls": False, "max_output_tokens": 3,
    "temperature": 0.0, "top_p": 0.5, "stream": False, "stream_options": {"include_obfuscation": False},
    "text": {"format": {"type": "json_object"}}, "include": ["message.output_text.logprobs"],
    "top_logprobs": 1, "reasoning": {"effort": "low"}, "metadata": {"k": "v"}, "user": "u1",
    "safety_identifier": "s1", "prompt_cache_key": "p1", "prompt_cache_options": {"ttl": "5m"},
    "prompt_cache_retention": "in_memory", "moderation": {"mode": "default"}, "service_tier": "auto",
    "truncation": "disabled", "background": True, "conversation": "conv_1", "prompt": {"id": "p"},
    "max_tool_calls": 1, "background_options": {"window": "2h"}, "context_management": [{"type": "x"}],
    "image": {"size": "auto"}, "access_programs": {"x": 1},
}
CLOUD_REASON = {"reasoning": "reasoning_effort", "moderation": "moderation"}


def test_every_responses_field_is_walked(srv):
    assert set(SAMPLES) == set(RESPONSE_FIELDS)
    first = post(srv, {"model": "hera", "input": "Hi", "max_output_tokens": 3}, path="/v1/responses")[2]
    for field, rule in RESPONSE_FIELDS.items():
        value = first["id"] if field == "previous_response_id" else SAMPLES[field]
        body = {"model": "hera", "input": "Hi", "max_output_tokens": 16, field: value}
        if field == "top_logprobs":
            body["include"] = ["message.output_text.logprobs"]
        status, h, out = post(srv, body, LOCAL if rule.handling is not Handling.CLOUD else None, path="/v1/responses")
        if rule.handling is Handling.REFUSED:
            assert status == 400 and out["error"]["param"] == field, (field, out)
        elif rule.handling is Handling.CLOUD:
            assert status == 200 and h["x-hera-route"] == "cloud" and h["x-hera-reason"] == CLOUD_REASON[field]
        else:
            assert status == 200 and out["object"] == "response", (field, out)
    # effects that show in the response
    shown = post(srv, {"model": "hera", "input": "Hi", "max_output_tokens": 3, "metadata": {"k": "v"},
                       "instructions": "Be brief."}, LOCAL, path="/v1/responses")[2]
    assert shown["metadata"] == {"k": "v"} and shown["instructions"] == "Be brief." and shown["usage"]["output_tokens"] <= 3
    typed = post(srv, {"model": "hera", "input": "Hi", "max_output_tokens": 32,
                       "text": {"format": {"type": "json_object"}}}, LOCAL, path="/v1/responses")[2]
    assert isinstance(json.loads(typed["output"][0]["content"][0]["text"]), dict)
