"""No request field silently dropped (#32 item 4): the test walks the field table
(openai_api.FIELDS) through `hera serve`, SmolLM2 local and SmolLM2 behind real HTTP as the
cloud. Each field is honoured with an effect the test observes, sends the step to the cloud
with the field named as the reason, or is refused with a 400 naming it (`param`)."""

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hera_core.backends.cloud import CloudEngine
from hera_core.serving.openai_api import FIELDS, Handling, fields_markdown
from tests.conftest import TINY, split_server, stop_server
from tests.test_tools import WEATHER

KEY = "sk-hera-test"
Q = [{"role": "user", "content": "Name a colour."}]
LOCAL = {"X-Hera-Policy": "local-only"}
CLOUD = {"X-Hera-Policy": "cloud-only"}


def make_server(local, cloud_url, tmp_path, max_tokens=24, cloud=None):
    return split_server(local, cloud or CloudEngine(cloud_url, TINY), tmp_path, max_tokens=max_tokens, api_key=KEY)


stop = stop_server


def post(srv, body, headers=None, path="/v1/chat/completions"):
    """(status, headers, body: parsed JSON, or the raw text of an event stream)."""
    req = urllib.request.Request(srv.url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, hdrs, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, raw = e.code, dict(e.headers), e.read()
    text = raw.decode()
    return status, {k.lower(): v for k, v in hdrs.items()}, text if text.startswith("data:") else json.loads(text)


def events(text):
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:") and "[DONE]" not in line]


@pytest.fixture(scope="module")
def srv(tiny_engine, cloud_url, tmp_path_factory):
    s = make_server(tiny_engine, cloud_url, tmp_path_factory.mktemp("fields"))
    yield s
    stop(s)


def ask(srv, headers=None, **fields):
    return post(srv, {"model": "hera", "messages": Q, "max_tokens": 12, **fields}, headers)


def refused(srv, field, value, headers=None, **more):
    status, _, body = ask(srv, headers, **{field: value}, **more)
    assert status == 400, body
    assert body["error"]["param"] == field and body["error"]["type"] == "invalid_request_error"
    return body["error"]["message"]


def goes_to_cloud(srv, field, value):
    """A CLOUD field: the step goes to the cloud (even where the predictor would keep it local),
    the header and the ledger name the field; a local-only step with it is a 400 that says why."""
    status, h, body = ask(srv, **{field: value})
    assert status == 200, body
    assert h["x-hera-route"] == "cloud" and h["x-hera-reason"] == field
    assert srv.ledger.rows("serve")[-1]["reason"] == field
    status, _, body = ask(srv, LOCAL, **{field: value})
    assert status == 400 and field in body["error"]["message"]


def forwarded(srv, field, good, bad):
    """A FORWARDED field: taken (its type checked: a wrong one is a 400 naming it), on either route."""
    for headers in (LOCAL, CLOUD):
        status, _, body = ask(srv, headers, **{field: good})
        assert status == 200 and body["choices"][0]["message"]["content"], body
    refused(srv, field, bad)


def greedy(srv, **more):
    status, _, body = ask(srv, LOCAL, **more)
    assert status == 200
    return body["choices"][0]["message"]["content"]


# --- one check per field of the table -------------------------------------------------------------
def check_model(srv):
    status, h, body = ask(srv)
    assert status == 200 and h["x-hera-route"] == "cloud" and h["x-hera-reason"] == "predictor"  # step 0
    status, h, body = post(srv, {"model": "hera:0", "messages": Q, "max_tokens": 8})
    assert status == 200 and h["x-hera-route"] == "local" and body["hera"]["threshold"] == 0  # fixed threshold
    status, h, body = post(srv, {"model": TINY, "messages": Q, "max_tokens": 8})
    assert status == 200 and h["x-hera-reason"] == "passthrough"


def check_messages(srv):
    short = ask(srv, LOCAL)[2]["usage"]["prompt_tokens"]
    longer = post(srv, {"model": "hera", "max_tokens": 4, "messages": [
        {"role": "user", "content": "Name a colour, please, one that you like."}]}, LOCAL)[2]["usage"]["prompt_tokens"]
    assert longer > short


def check_max_tokens(srv, field="max_tokens"):
    for headers in (LOCAL, CLOUD):
        status, _, body = post(srv, {"model": "hera", "messages": Q, field: 3}, headers)
        assert status == 200 and body["usage"]["completion_tokens"] <= 3
        assert body["choices"][0]["finish_reason"] == "length"


def check_max_completion_tokens(srv):
    check_max_tokens(srv, "max_completion_tokens")


def check_temperature(srv):
    base = greedy(srv)
    hot = [greedy(srv, temperature=2.0, seed=s) for s in (1, 2, 3)]
    assert greedy(srv, temperature=2.0, seed=1) == hot[0]  # seeded: reproducible
    assert any(h != base for h in hot)  # sampled, not the greedy answer
    status, _, body = ask(srv, CLOUD, temperature=0.5, seed=1)
    assert status == 200 and body["choices"][0]["message"]["content"]


def check_top_p(srv):
    # The nucleus of a tiny top_p is the likeliest token alone: sampling at temperature 2 is greedy again.
    assert greedy(srv, temperature=2.0, top_p=1e-9, seed=4) == greedy(srv)


def check_n(srv):
    for headers in (LOCAL, CLOUD):
        status, _, body = ask(srv, headers, n=3, temperature=1.0, seed=2)
        assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2]
    refused(srv, "n", 2, stream=True)


def check_seed(srv):
    runs = [[c["message"]["content"] for c in ask(srv, LOCAL, n=2, temperature=1.5, seed=9)[2]["choices"]]
            for _ in range(2)]
    assert runs[0] == runs[1]


def check_stop(srv):
    base = greedy(srv, max_tokens=24)
    cut = base[4:7]
    assert len(cut) == 3, base
    assert greedy(srv, max_tokens=24, stop=[cut]) == base[: base.index(cut)]
    refused(srv, "stop", ["a", "b", "c", "d", "e"])


def check_stream(srv):
    for headers in (LOCAL, CLOUD):
        status, h, text = ask(srv, headers, stream=True)
        assert status == 200 and h["content-type"].startswith("text/event-stream")
        chunks = events(text)
        assert chunks[0]["object"] == "chat.completion.chunk" and chunks[-1]["choices"][0]["finish_reason"]


def check_stream_options(srv):
    chunks = events(ask(srv, LOCAL, stream=True, stream_options={"include_usage": True})[2])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert events(ask(srv, LOCAL, stream=True)[2])[-1]["choices"]  # without it: no usage-only chunk
    refused(srv, "stream_options", {"include_everything": True}, stream=True)


def check_tools(srv):
    status, _, body = ask(srv, LOCAL, tools=[WEATHER], tool_choice="required", max_tokens=96,
                          messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert status == 200 and body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    refused(srv, "tools", [{"type": "function"}])


def check_tool_choice(srv):
    status, _, body = ask(srv, LOCAL, tools=[WEATHER], tool_choice="none")
    assert status == 200 and not body["choices"][0]["message"].get("tool_calls")
    assert ask(srv, tool_choice="required")[0] == 400  # tool_choice needs tools


def check_parallel_tool_calls(srv):
    status, _, body = ask(srv, LOCAL, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                          max_tokens=96, messages=[{"role": "user", "content": "Weather in Paris and in Rome?"}])
    assert status == 200 and len(body["choices"][0]["message"]["tool_calls"]) == 1


def check_response_format(srv):
    # The text format asks for nothing; json formats are validated (tests/test_structured.py shows both outcomes).
    assert ask(srv, LOCAL, response_format={"type": "text"})[0] == 200
    status, _, body = ask(srv, LOCAL, response_format={"type": "json_object"}, max_tokens=64)
    assert status == 200 and isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)
    status, h, body = ask(srv, response_format={"type": "json_object"})
    if status == 200:
        assert isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)
    else:
        assert status == 502 and body["error"]["code"] == "StructuredOutputError"
    refused(srv, "response_format", {"type": "yaml"})


def check_logprobs(srv, extra=None):
    k = (extra or {}).get("top_logprobs", 0)
    for headers in (LOCAL, CLOUD):  # the SLM's own, and the cloud's passed through
        status, h, body = ask(srv, headers, logprobs=True, **(extra or {}))
        assert status == 200, body
        content = body["choices"][0]["logprobs"]["content"]
        assert len(content) == body["usage"]["completion_tokens"] and all(c["logprob"] <= 0 for c in content)
        assert "".join(c["token"] for c in content) == body["choices"][0]["message"]["content"]
        assert all(len(c["top_logprobs"]) == k for c in content)
        assert all(c["top_logprobs"][0]["logprob"] >= c["logprob"] for c in content if k)  # greedy: the likeliest
    chunks = events(ask(srv, LOCAL, logprobs=True, stream=True, **(extra or {}))[2])
    assert [c for ch in chunks for c in (ch["choices"][0].get("logprobs") or {}).get("content", [])]
    assert ask(srv, LOCAL, logprobs=False)[2]["choices"][0]["logprobs"] is None
    refused(srv, "logprobs", {"on": 1})


def check_top_logprobs(srv):
    check_logprobs(srv, {"top_logprobs": 2})
    refused(srv, "top_logprobs", 2)  # without logprobs
    refused(srv, "top_logprobs", 21, logprobs=True)


def check_logit_bias(srv):
    goes_to_cloud(srv, "logit_bias", {"42": -100})
    assert ask(srv, LOCAL, logit_bias={})[0] == 200  # empty: asks for nothing


def check_presence_penalty(srv):
    goes_to_cloud(srv, "presence_penalty", 0.5)
    assert ask(srv, LOCAL, presence_penalty=0)[0] == 200


def check_frequency_penalty(srv):
    goes_to_cloud(srv, "frequency_penalty", 0.5)
    refused(srv, "frequency_penalty", 3)


def check_reasoning_effort(srv):
    goes_to_cloud(srv, "reasoning_effort", "low")


def check_verbosity(srv):
    goes_to_cloud(srv, "verbosity", "low")


def check_prediction(srv):
    goes_to_cloud(srv, "prediction", {"type": "content", "content": "Blue."})


def check_web_search_options(srv):
    goes_to_cloud(srv, "web_search_options", {})


def check_user(srv):
    forwarded(srv, "user", "user-1", 42)


def check_safety_identifier(srv):
    forwarded(srv, "safety_identifier", "hash-1", ["x"])


def check_prompt_cache_key(srv):
    forwarded(srv, "prompt_cache_key", "k1", {"a": 1})


def check_prompt_cache_options(srv):
    forwarded(srv, "prompt_cache_options", {"ttl": "5m"}, "5m")


def check_prompt_cache_retention(srv):
    forwarded(srv, "prompt_cache_retention", "in_memory", 24)


def check_moderation(srv):
    goes_to_cloud(srv, "moderation", {"mode": "default"})


def check_metadata(srv):
    forwarded(srv, "metadata", {"run": "a"}, {"run": 1})


def check_service_tier(srv):
    forwarded(srv, "service_tier", "auto", "priority")


def check_store(srv):
    forwarded(srv, "store", False, True)


def check_modalities(srv):
    assert ask(srv, LOCAL, modalities=["text"])[0] == 200
    refused(srv, "modalities", ["text", "audio"])


def check_audio(srv):
    refused(srv, "audio", {"voice": "alloy", "format": "mp3"})


def check_functions(srv):
    refused(srv, "functions", [{"name": "f", "parameters": {"type": "object"}}])


def check_function_call(srv):
    refused(srv, "function_call", "auto")


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}


def test_every_field_of_the_table_has_a_check():
    assert set(CHECKS) == set(FIELDS)


@pytest.mark.parametrize("field", list(FIELDS))
def test_field(srv, field):
    CHECKS[field](srv)


def test_refused_fields_name_themselves():
    assert {n for n, f in FIELDS.items() if f.handling is Handling.REFUSED} == {"audio", "functions", "function_call"}


def test_unknown_fields_are_refused_by_name(srv):
    for name, value in (("top_k", 5), ("repetition_penalty", 1.1), ("extra_body", {})):
        refused(srv, name, value)
    # any other model is the cloud's to judge: forwarded as it is
    status, _, body = post(srv, {"model": TINY, "messages": Q, "max_tokens": 4, "top_k": 5})
    assert status == 400 and "top_k" in body["error"]["message"]  # the cloud-sim refuses it too


def test_the_docs_show_the_table():
    doc = (Path(__file__).parents[1] / "docs" / "openai-api.md").read_text()
    assert fields_markdown() in doc
