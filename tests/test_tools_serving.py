"""Tool-calling agents through `hera serve`: the openai SDK (streaming and not), a LangChain
`bind_tools` loop and an AG2 agent with a tool; local and cloud tool steps in the ledger; an
invalid local call escalated, never returned."""

import json
import subprocess
import sys

import jsonschema
import pytest

from hera_core.backends.cloud import CloudEngine
from tests.conftest import TINY, free_port, run, split_server, stop_server
from tests.processes import wait_for_http
from tests.test_tools import ADD, BOOK, WEATHER, qwen_engine  # noqa: F401  (fixture)

KEY = "sk-hera-test"
QWEN = "qwen2.5-coder-0.5b"


def serve(local, cloud_url, cloud_model, tmp_path, max_tokens=96):
    return split_server(local, CloudEngine(cloud_url, cloud_model), tmp_path, max_tokens=max_tokens, api_key=KEY)


stop = stop_server


@pytest.fixture
def tiny_server(tiny_engine, cloud_url, tmp_path):
    srv = serve(tiny_engine, cloud_url, TINY, tmp_path)
    yield srv
    stop(srv)


def valid(calls, tools):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for c in calls:
        jsonschema.validate(json.loads(c.function.arguments), schemas[c.function.name])
    return True


def test_the_sdk_gets_valid_calls_from_both_routes_streaming_and_not(tiny_server):
    import openai

    tools = [ADD, WEATHER]
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key=KEY, max_retries=0)
    ask = [{"role": "user", "content": "Add 17 and 25."}]
    raw = client.chat.completions.with_raw_response.create(model="hera", messages=ask, tools=tools,
                                                           tool_choice="required")
    first = raw.parse()
    assert raw.headers["x-hera-route"] == "cloud"  # step 0: the cloud stand-in, which speaks tools too
    msg = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and msg.tool_calls and valid(msg.tool_calls, tools)
    history = ask + [msg.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "42"}]
    for stream in (False, True):
        kwargs = dict(model="hera", messages=history, tools=tools, tool_choice={"type": "function",
                                                                                "function": {"name": "add"}})
        if stream:  # the SDK reassembles the streamed tool-call deltas
            with client.chat.completions.stream(**kwargs) as s:
                for _ in s:
                    pass
                final = s.get_final_completion()
        else:
            final = client.chat.completions.create(**kwargs)
        calls = final.choices[0].message.tool_calls
        assert final.choices[0].finish_reason == "tool_calls" and [c.function.name for c in calls] == ["add"]
        assert valid(calls, tools)
    rows = tiny_server.ledger.rows("serve")
    assert [r["route"] for r in rows] == ["cloud", "local", "local"]
    assert [r["step"] for r in rows] == [0, 1, 1]


def test_an_invalid_local_call_is_escalated_never_returned(tiny_server):
    """max_tokens cuts the SLM's call short: the step goes to the cloud (booked with the draft's
    energy), and what comes back holds no invalid call either (the cloud's is cut too)."""
    import openai

    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key=KEY, max_retries=0)
    history = [{"role": "user", "content": "Book a flight."}, {"role": "assistant", "content": "Where to?"},
               {"role": "user", "content": "Oslo to Rome."}]
    raw = client.chat.completions.with_raw_response.create(model="hera", messages=history, tools=[BOOK],
                                                           tool_choice="required", max_tokens=8)
    out = raw.parse()
    assert raw.headers["x-hera-route"] == "cloud" and raw.headers["x-hera-reason"] == "invalid-tool-call"
    assert not out.choices[0].message.tool_calls
    row = tiny_server.ledger.rows("serve")[-1]
    assert row["reason"] == "invalid-tool-call" and row["cost_usd"] > row["cloud_cost_usd"]


def test_malformed_tools_are_a_400_with_an_openai_body(tiny_server):
    from tests.test_server import http

    status, _, body = http(tiny_server, "/v1/chat/completions",
                           {"model": "hera", "messages": [{"role": "user", "content": "hi"}],
                            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}]})
    err = json.loads(body)["error"]
    assert status == 400 and "JSON Schema" in err["message"] and err["type"] == "invalid_request_error"


# --- real agent frameworks, with the SLM that can use tools ---------------------------------------
@pytest.fixture(scope="module")
def qwen_cloud():
    """`hera cloud-sim` serving Qwen2.5-Coder-0.5B: a cloud stand-in that calls tools."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hera_core.cli", "cloud-sim", "--model", QWEN,
                             "--port", str(port), "--threads", "1", "--n-ctx", "2048"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_http(f"http://127.0.0.1:{port}/healthz", proc, timeout_s=120)
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def qwen_server(qwen_engine, qwen_cloud, tmp_path):  # noqa: F811
    srv = serve(qwen_engine, qwen_cloud, QWEN, tmp_path)
    yield srv
    stop(srv)


@pytest.mark.parametrize("streaming", [False, True])
def test_langchain_tool_loop_through_hera(qwen_server, streaming):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    ran = []

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        ran.append((a, b))
        return a + b

    llm = ChatOpenAI(model="hera", base_url=qwen_server.url + "/v1", api_key=KEY, max_retries=0,
                     streaming=streaming, temperature=0).bind_tools([add])
    messages = [HumanMessage("Use the add tool to compute 1234 + 4321, then tell me the result.")]
    for _ in range(3):  # the agent loop: call tools until the model answers
        reply = llm.invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            break
        for call in reply.tool_calls:
            assert call["name"] == "add" and set(call["args"]) == {"a", "b"}
            messages.append(ToolMessage(str(add.invoke(call["args"])), tool_call_id=call["id"]))
    assert ran and ran[0] == (1234, 4321)
    rows = qwen_server.ledger.rows("serve")
    assert rows[0]["route"] == "cloud" and {r["route"] for r in rows[1:]} == {"local"} and len(rows) >= 2


def test_ag2_agent_with_a_tool_through_hera(qwen_server):
    from ag2 import Agent
    from ag2.config import OpenAIConfig

    ran = []

    def get_weather(city: str) -> str:
        """The current weather in a city."""
        ran.append(city)
        return f"Sunny and 21 C in {city}."

    agent = Agent("assistant", prompt="Use the tools you have.", tools=[get_weather],
                  config=OpenAIConfig(model="hera", base_url=qwen_server.url + "/v1", api_key=KEY, max_tokens=96,
                                      streaming=False))

    async def go():
        return await agent.ask("What is the weather in Paris?")

    reply = run(go())
    assert ran and ran[0].lower().startswith("paris")
    assert reply.body
    rows = qwen_server.ledger.rows("serve")
    assert [r["route"] for r in rows][:2] == ["cloud", "local"]
