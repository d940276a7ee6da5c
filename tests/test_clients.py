"""Client libraries whose pins clash with the project's own set, end to end through `hera serve`
(#32 item 5): instructor and the OpenAI Agents SDK (openai 3.x) in `.venv-clients-agents`,
llama-index (openai 2.x) in `.venv-clients-llamaindex`, each from its pinned requirements in
tests/clients/ (`make clients`, which `make test` runs). Each client runs as a child process of
its own environment against a server in this one (SmolLM2 local, SmolLM2 over HTTP as the cloud),
prints what it got as JSON, and the test checks it and the ledger rows the server booked."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.test_openai_fields import KEY, make_server, stop

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = ROOT / "tests" / "clients"
SEASONS = {"spring", "summer", "autumn", "winter"}


def run_client(venv: str, script: str, *args: str, timeout: int = 300) -> dict:
    python = ROOT / venv / "bin" / "python"
    if not python.exists():
        pytest.skip(f"{venv} is not built: run `make clients` (make test does)")
    done = subprocess.run([str(python), str(CLIENTS / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=CLIENTS)
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def srv(tiny_engine, cloud_url, tmp_path_factory):
    s = make_server(tiny_engine, cloud_url, tmp_path_factory.mktemp("clients"), max_tokens=128)
    yield s
    stop(s)


def routes_since(srv, before: int) -> list[str]:
    return [r["route"] for r in srv.ledger.rows("serve")[before:] if r["status"] == "ok"]


def valid_trip(trip: dict) -> bool:
    return isinstance(trip["city"], str) and 1 <= trip["days"] <= 14 and trip["season"] in SEASONS


@pytest.mark.parametrize("mode", ["json_schema", "tools"])
@pytest.mark.parametrize("policy", ["local-only", "cloud-only"])
def test_instructor_gets_a_typed_result(srv, policy, mode):
    before = len(srv.ledger.rows("serve"))
    trip = run_client(".venv-clients-agents", "instructor_trip.py", srv.url + "/v1", KEY, policy, mode)
    assert valid_trip(trip)
    assert routes_since(srv, before) == [policy.split("-")[0]]  # one call, on the route asked for


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_the_openai_agents_sdk_calls_its_tool_through_hera(srv, api):
    before = len(srv.ledger.rows("serve"))
    out = run_client(".venv-clients-agents", "agents_tool.py", srv.url + "/v1", KEY, "local-only", api)
    assert len(out["calls"]) == 1  # the required tool, called once with integer arguments
    call = out["calls"][0]
    assert out["final_output"] == str(call["a"] + call["b"])
    assert routes_since(srv, before) == ["local"]


def test_llama_index_chats_streams_and_predicts_a_typed_result(srv):
    before = len(srv.ledger.rows("serve"))
    out = run_client(".venv-clients-llamaindex", "llamaindex_chat.py", srv.url + "/v1", KEY, "local-only")
    assert out["chat"].strip() and out["stream"].strip() and valid_trip(out["trip"])
    assert routes_since(srv, before) == ["local"] * 3
