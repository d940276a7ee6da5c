"""`hera serve` nodes in child processes, sharing one ledger, for the fleet tests and benchmark."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hera_core.serving.assembly import free_port
from tests.conftest import TINY
from tests.processes import wait_for_http


@dataclass
class Node:
    node_id: str
    url: str
    proc: subprocess.Popen
    cache_dir: Path

    def kill(self) -> None:
        """kill -9: no shutdown, no flush, nothing."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=20)

    def log_tail(self, chars: int = 2000) -> str:
        return (self.cache_dir / "serve.log").read_text(errors="replace")[-chars:]

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Fleet:
    nodes: list[Node] = field(default_factory=list)

    def close(self) -> None:
        for n in self.nodes:
            if n.alive:
                n.proc.terminate()
        for n in self.nodes:
            try:
                n.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                n.kill()


def start_fleet(n: int, tmp_path: Path, tiny_model_path: Path, upstream_url: str, *, ledger_url: str | None,
                server_toml: str = "", cloud_toml: str = "") -> Fleet:
    """`n` `hera serve` processes on free ports over SmolLM2 and a cloud at `upstream_url`, booking into
    PostgreSQL at `ledger_url` (None: each node its own SQLite file). `server_toml` / `cloud_toml`:
    more lines for those sections (caps, budget_action, timeouts)."""
    fleet = Fleet()
    try:
        for k in range(n):
            port, node_id, cache = free_port(), f"node-{k}", tmp_path / f"cache{k}"
            cfg = tmp_path / f"node{k}.toml"
            cfg.write_text(f'max_tokens = 4\n[local]\nmodel = "{TINY}"\nn_ctx = 1024\nn_threads = 1\n'
                           f'[cloud]\nbase_url = "{upstream_url}/v1"\nmodel = "fake-model"\n{cloud_toml}\n'
                           f'[server]\nport = {port}\napi_keys = []\nmax_concurrency = 500\n{server_toml}\n')
            env = {**os.environ, "HERA_NODE_ID": node_id, "HERA_CACHE_DIR": str(cache)}
            env.pop("HERA_LEDGER_URL", None)
            if ledger_url is not None:
                env["HERA_LEDGER_URL"] = ledger_url
            os.makedirs(cache / "models", exist_ok=True)
            for f in tiny_model_path.parent.glob(tiny_model_path.stem + ".*"):  # the model and its checksum
                os.symlink(f, cache / "models" / f.name)
            with open(cache / "serve.log", "wb") as log:  # a file, not a pipe nobody drains under load
                proc = subprocess.Popen([sys.executable, "-m", "hera_core.cli", "--config", str(cfg), "serve"],
                                        env=env, stdout=subprocess.DEVNULL, stderr=log)
            fleet.nodes.append(Node(node_id, f"http://127.0.0.1:{port}", proc, cache))
        for node in fleet.nodes:
            try:
                wait_for_http(node.url + "/healthz", node.proc, timeout_s=120)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\n{node.log_tail()}") from None
    except BaseException:
        fleet.close()
        raise
    return fleet
