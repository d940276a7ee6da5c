"""`hera serve` against real clients: the official openai SDK (sync, async, streaming) and an AG2
agent, with SmolLM2 as the local SLM and SmolLM2 behind real HTTP as the cloud."""

import json
import urllib.error
import urllib.request

import pytest

from hera_core.config import load_settings
from hera_core.backends.cloud import CloudEngine
from hera_core.routing.ledger import Ledger
from hera_core.routing.predictor import Kappa
from hera_core.routing.runtime import Runtime
from hera_core.serving.assembly import budget_from
from hera_core.serving.server import create_app
from tests.conftest import TINY, ServerThread, run
from tests.factories import random_predictor

SPLIT = Kappa(base=1.01, per_step=-1.02, max_steps=1)  # step 0 -> cloud, later steps -> local
KEY = "sk-hera-test"
Q = [{"role": "user", "content": "Name a colour."}]
Q2 = Q + [{"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}]


def make_server(tiny_engine, cloud_url, tmp_path, **server):
    settings = load_settings(env={}, overrides={"max_tokens": 24, **{f"server.{k}": v for k, v in server.items()}})
    ledger = Ledger(tmp_path / "ledger.sqlite")
    holder = {}

    def make_app():
        cloud = CloudEngine(cloud_url, TINY)
        holder["rt"] = Runtime(tiny_engine, cloud, random_predictor(kappa=SPLIT), ledger, settings.prices,
                               run="serve", max_tokens=24, budget=budget_from(settings, ledger))
        return create_app(settings, runtime=holder["rt"])

    srv = ServerThread(make_app)
    srv.ledger, srv.rt = ledger, holder["rt"]
    return srv


@pytest.fixture
def server(tiny_engine, cloud_url, tmp_path):
    srv = make_server(tiny_engine, cloud_url, tmp_path, api_keys=[KEY])
    yield srv
    srv.call(srv.rt.cloud.close())
    srv.close()
    srv.ledger.close()


@pytest.fixture
def client(server):
    import openai

    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as c:
        yield c


def http(server, path, body=None, headers=None, method=None):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method=method or ("POST" if data else "GET"),
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_routes_by_step_with_visible_decisions(client, server):
    raw = client.chat.completions.with_raw_response.create(model="hera", messages=Q, max_tokens=16)
    first = raw.parse()
    assert raw.headers["x-hera-route"] == "cloud" and float(raw.headers["x-hera-cost-usd"]) > 0
    assert 0 <= float(raw.headers["x-hera-p-local"]) <= 1
    assert first.choices[0].message.content and first.usage.prompt_tokens > 0
    raw = client.chat.completions.with_raw_response.create(model="hera", messages=Q2, max_tokens=16)
    assert raw.headers["x-hera-route"] == "local"
    rows = server.ledger.rows("serve")
    assert [(r["step"], r["route"]) for r in rows] == [(0, "cloud"), (1, "local")]
    assert rows[0]["session"] == rows[1]["session"]  # derived from the conversation's opening


def test_streaming_equals_non_streaming(client):
    whole = client.chat.completions.create(model="hera", messages=Q2, max_tokens=16).choices[0].message.content
    stream = client.chat.completions.create(model="hera", messages=Q2, max_tokens=16, stream=True)
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(parts) == whole and len(parts) >= 2


def test_async_client_streaming_and_not(server):
    import openai

    async def go():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as c:
            r = await c.chat.completions.create(model="hera", messages=Q, max_tokens=12)
            s = await c.chat.completions.create(model="hera", messages=Q, max_tokens=12, stream=True)
            text = "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])
            return r.choices[0].message.content, text

    whole, streamed = run(go())
    assert whole == streamed  # cloud route both times: greedy stand-in, same answer


def test_other_models_pass_through_to_the_cloud(client, server):
    raw = client.chat.completions.with_raw_response.create(model=TINY, messages=Q2, max_tokens=8)
    assert raw.headers["x-hera-route"] == "cloud" and raw.headers["x-hera-reason"] == "passthrough"
    assert server.ledger.rows("serve")[-1]["reason"] == "passthrough"


def test_policy_header_overrides_the_predictor(client, server):
    raw = client.chat.completions.with_raw_response.create(
        model="hera", messages=Q, max_tokens=8, extra_headers={"X-Hera-Policy": "local-only"})
    assert raw.headers["x-hera-route"] == "local" and raw.headers["x-hera-reason"] == "local-only"
    raw = client.chat.completions.with_raw_response.create(
        model="hera", messages=Q2, max_tokens=8, extra_headers={"X-Hera-Policy": "cloud-only"})
    assert raw.headers["x-hera-route"] == "cloud"


def test_tool_steps_are_routed_like_any_other(client, server):
    """A request with tools is scored and routed like any step (step 1 here: local); a confidential
    tool step stays on the device. tests/test_tools.py checks the calls themselves."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    raw = client.chat.completions.with_raw_response.create(model="hera", messages=Q2, max_tokens=8, tools=tools)
    assert raw.headers["x-hera-route"] == "local" and raw.headers["x-hera-reason"] == "predictor"
    status, headers, _ = http(server, "/v1/chat/completions", {"model": "hera", "messages": Q, "tools": tools,
                                                               "max_tokens": 8}, headers={"X-Hera-Policy": "local-only"})
    assert status == 200 and headers["x-hera-route"] == "local"


def test_n_choices_are_sampled_on_the_route_taken_and_booked_once(client, server):
    """OpenAI's `n` through the openai SDK: on the SLM (local-only) the n samples share the
    prompt's KV and decode together; on the cloud one request asks for n choices. One ledger
    row per step, with every choice's completion tokens and the prompt once."""
    for policy, route in (("local-only", "local"), ("cloud-only", "cloud")):
        raw = client.chat.completions.with_raw_response.create(
            model="hera", messages=Q, max_tokens=12, n=3, temperature=1.0, seed=11,
            extra_headers={"X-Hera-Policy": policy})
        done = raw.parse()
        assert raw.headers["x-hera-route"] == route
        assert [c.index for c in done.choices] == [0, 1, 2] and all(c.message.content for c in done.choices)
        assert len({c.message.content for c in done.choices}) > 1  # sampled at temperature 1
        row = server.ledger.rows("serve")[-1]
        assert row["route"] == route and row["completion_tokens"] == done.usage.completion_tokens
        assert done.usage.completion_tokens > 12  # the tokens of more than one choice
    again = client.chat.completions.create(model="hera", messages=Q, max_tokens=12, n=3, temperature=1.0, seed=11,
                                           extra_headers={"X-Hera-Policy": "local-only"})
    first = [c.message.content for c in client.chat.completions.create(
        model="hera", messages=Q, max_tokens=12, n=3, temperature=1.0, seed=11,
        extra_headers={"X-Hera-Policy": "local-only"}).choices]
    assert [c.message.content for c in again.choices] == first  # a seed makes them reproducible


@pytest.mark.parametrize("body,headers,status,fragment", [
    (b"{not json", {}, 400, "not valid JSON"),
    (b'{"model": "hera", "messages": [], "temperature": NaN}', {}, 400, "not valid JSON"),  # NaN is not JSON
    (b'{"model": "hera", "messages": [{"role": "user", "content": "\xff"}]}', {}, 400, "not valid JSON"),
    ({"model": "hera", "messages": Q, "n": 3, "stream": True}, {}, 400, "without streaming"),
    ({"model": "hera", "messages": Q, "n": 0}, {}, 400, "n"),
    ({"model": "hera", "messages": Q, "n": 2, "top_p": 0}, {}, 400, "top_p"),
    ({"model": "hera"}, {}, 400, "messages"),
    ({"model": "hera", "messages": [{"role": "wizard", "content": "x"}]}, {}, 400, "role"),
    ({"model": "hera", "messages": Q, "max_tokens": 10**6}, {}, 400, "cap"),
    ({"model": "hera:2", "messages": Q}, {}, 400, "threshold"),
    ({"model": "hera", "messages": Q}, {"X-Hera-Policy": "sometimes"}, 400, "X-Hera-Policy"),
    ({"model": "hera", "messages": Q}, {"Authorization": "Bearer wrong"}, 401, "API key"),
    ({"model": "hera", "messages": [{"role": "user", "content": "x" * 5_000_000}]}, {}, 413, "too large"),
])
def test_bad_requests_are_openai_shaped_4xx(server, body, headers, status, fragment):
    code, _, raw = http(server, "/v1/chat/completions", body, headers)
    assert code == status
    err = json.loads(raw)["error"]
    assert fragment.lower() in err["message"].lower() and {"type", "param", "code"} <= set(err)


def test_unknown_path_and_method_are_json_errors(server):
    code, _, raw = http(server, "/v1/nope")
    assert code == 404 and "error" in json.loads(raw)
    code, _, raw = http(server, "/v1/chat/completions", method="GET")
    assert code == 405 and "error" in json.loads(raw)


def test_models_health_metrics_and_ledger(client, server):
    client.chat.completions.create(model="hera", messages=Q, max_tokens=8)
    assert "hera" in [m.id for m in client.models.list().data]
    assert http(server, "/healthz", headers={"Authorization": ""})[0] == 200
    code, _, text = http(server, "/metrics")
    assert code == 200 and b'hera_requests_total{route="cloud",status="ok"} 1.0' in text
    assert b"hera_request_latency_seconds_bucket" in text and b"hera_kv_cache_hit_rate" in text
    code, _, raw = http(server, "/v1/hera/ledger")
    ledger = json.loads(raw)
    assert ledger["totals"]["subtasks"] == 1 and ledger["sessions"][0]["subtasks"] == 1


@pytest.mark.parametrize("action,expect", [("local", 200), ("refuse", 429)])
def test_session_budget(tiny_engine, cloud_url, tmp_path, action, expect):
    srv = make_server(tiny_engine, cloud_url, tmp_path, session_budget_usd=0.0, budget_action=action)
    try:
        code, headers, raw = http(srv, "/v1/chat/completions", {"model": "hera", "messages": Q, "max_tokens": 8},
                                  headers={"X-Hera-Session": "capped"})
        assert code == expect
        if expect == 200:
            assert headers["x-hera-route"] == "local" and headers["x-hera-reason"] == "budget-session"
        else:
            assert json.loads(raw)["error"]["type"] == "insufficient_quota" and "Retry-After" in headers
    finally:
        srv.call(srv.rt.cloud.close())
        srv.close()
        srv.ledger.close()


def test_pass_through_is_budgeted_and_booked_by_the_runtime(tiny_engine, cloud_url, tmp_path):
    """A request for another model counts against the session's cap like a routed cloud step, and
    is refused (it cannot move to the SLM) once the cap is spent, streaming or not."""
    srv = make_server(tiny_engine, cloud_url, tmp_path, session_budget_usd=1e-9, budget_action="local")
    try:
        body = {"model": TINY, "messages": Q, "max_tokens": 8}
        code, headers, _ = http(srv, "/v1/chat/completions", body, headers={"X-Hera-Session": "p"})
        assert code == 200 and float(headers["x-hera-cost-usd"]) > 0
        row = srv.ledger.rows("serve")[-1]
        assert (row["reason"], row["session"], row["model"]) == ("passthrough", "p", TINY) and row["cost_usd"] > 0
        for extra in ({}, {"stream": True}):
            code, _, raw = http(srv, "/v1/chat/completions", {**body, **extra}, headers={"X-Hera-Session": "p"})
            assert code == 429 and json.loads(raw)["error"]["type"] == "insufficient_quota"
        code, _, raw = http(srv, "/v1/chat/completions", {**body, "stream": True}, headers={"X-Hera-Session": "q"})
        assert code == 200 and raw.rstrip().endswith(b"data: [DONE]")
        assert srv.ledger.rows("serve")[-1]["session"] == "q" and srv.ledger.rows("serve")[-1]["status"] == "ok"
    finally:
        srv.call(srv.rt.cloud.close())
        srv.close()
        srv.ledger.close()


def test_ag2_agent_runs_a_multi_step_conversation_through_hera(server):
    from ag2 import Agent
    from ag2.config import OpenAIConfig

    agent = Agent("assistant", prompt="You are brief.",
                  config=OpenAIConfig(model="hera", base_url=server.url + "/v1", api_key=KEY, max_tokens=16,
                                      streaming=False))

    async def go():
        reply = await agent.ask("Name a fruit.")
        reply = await reply.ask("Name another fruit.")
        reply = await reply.ask("And a third one?")
        return reply.body

    assert run(go())
    rows = server.ledger.rows("serve")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [r["route"] for r in rows] == ["cloud", "local", "local"]
    assert len({r["session"] for r in rows}) == 1


def test_a_streaming_client_that_leaves_stops_its_local_answer(server):
    """The client closes the connection after the first chunk: the local answer stops at its next
    chunk instead of decoding to max_tokens, and the ledger books the step as cancelled."""
    import http.client
    import time
    from urllib.parse import urlparse

    long = [{"role": "user", "content": "Count from 1 to 300, separated by commas."}]
    engine = server.rt.local
    before = engine.stats["generated_tokens"]
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/chat/completions",
                 json.dumps({"model": "hera", "messages": long, "max_tokens": 400, "stream": True}),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", "X-Hera-Policy": "local-only"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.headers["x-hera-route"] == "local"
    assert resp.readline().startswith(b"data: ")  # the role chunk: decoding has started
    conn.sock.close()  # the client goes away
    conn.close()
    deadline = time.monotonic() + 60
    while not [r for r in server.ledger.rows("serve") if r["status"] == "cancelled"]:
        assert time.monotonic() < deadline, "no cancelled row in the ledger"
        time.sleep(0.05)
    row = [r for r in server.ledger.rows("serve") if r["status"] == "cancelled"][0]
    assert row["route"] == "local" and row["cost_usd"] > 0  # the energy of the time it ran
    assert server.ledger.totals("serve")["cancelled"] == 1
    while engine.occupancy().busy:  # the slot is handed back after the chunk in flight
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert engine.stats["generated_tokens"] - before < 400


def test_a_client_that_leaves_before_a_whole_answer_stops_it(server):
    """Not streaming: the client closes the connection while the local answer decodes; the
    handler is cancelled, the answer stops at its next chunk and the step is booked cancelled."""
    import socket
    import time
    from urllib.parse import urlparse

    body = json.dumps({"model": "hera", "max_tokens": 400,
                       "messages": [{"role": "user", "content": "Count from 1 to 300, separated by commas."}]})
    engine = server.rt.local
    before = engine.stats["generated_tokens"]
    url = urlparse(server.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=60)
    sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.hostname}\r\nAuthorization: Bearer {KEY}\r\n"
                  f"Content-Type: application/json\r\nX-Hera-Policy: local-only\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    deadline = time.monotonic() + 60
    while not engine.occupancy().busy:  # the answer is decoding
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sock.close()
    while not [r for r in server.ledger.rows("serve") if r["status"] == "cancelled"]:
        assert time.monotonic() < deadline, "no cancelled row in the ledger"
        time.sleep(0.05)
    while engine.occupancy().busy:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert engine.stats["generated_tokens"] - before < 400
    assert server.ledger.totals("serve")["subtasks"] == 0  # nothing was served
