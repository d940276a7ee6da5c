"""What the benchmark files share: the smoke mode and peer servers in child processes.

Smoke mode (HERA_BENCH_SMOKE=1, what `make bench-smoke` and CI run, with --benchmark-disable):
every benchmark runs its body once on a small workload (`sized`), so a benchmark that breaks fails
CI in minutes; a case too heavy for that skips with the reason (`skip_in_smoke`). The numbers of a
smoke run mean nothing.

Peer servers (llama-server, LiteLLM's proxy, the scripted upstream) are somebody else's code that
a benchmark compares against or stands on: `Peer` starts one, waits until it is ready (not merely
listening), and when it dies, before or during a measurement, starts it once more; a second death
skips the case with the reason and the tail of the peer's log, never a flaky failure. HERA's own
server is not a peer: when it fails, the benchmark fails.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from hera_core.serving.assembly import free_port

SMOKE = os.environ.get("HERA_BENCH_SMOKE", "") not in ("", "0")
T = TypeVar("T")


def sized(full: T, smoke: T) -> T:
    """`full` in a measuring run, `smoke` in a smoke run."""
    return smoke if SMOKE else full


def skip_in_smoke(reason: str) -> None:
    if SMOKE:
        pytest.skip(f"smoke mode: {reason}; `make bench` runs it")


def http_status(url: str, timeout_s: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET; (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (OSError, ValueError):
        return 0, b""


class PeerDied(Exception):
    """The peer exited (or stopped answering) while it was needed."""


# What a measurement sees when the server it talks to dies under it (any other error is the
# benchmark's own and fails it).
PEER_ERRORS = (aiohttp.ClientConnectionError, ConnectionError, urllib.error.URLError, asyncio.TimeoutError, PeerDied)


class Peer:
    """One peer server in a child process. A restart keeps the port: whatever was configured with
    the peer's URL (a proxy in front of it) still reaches it.

    argv(port): the command line; ready_path: a GET path; ready(status, body): whether that answer
    means the server can serve (default: status 200); log: its stdout and stderr go there.
    """

    def __init__(self, name: str, argv: Callable[[int], list[str]], ready_path: str, log: Path, *,
                 ready: Callable[[int, bytes], bool] = lambda status, _: status == 200, timeout_s: float = 120.0,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name, self.argv, self.ready_path, self.log = name, argv, ready_path, log
        self.ready, self.timeout_s, self.env, self.cwd = ready, timeout_s, env, cwd
        self.proc: subprocess.Popen | None = None
        self.port = free_port()
        self.starts = 0  # processes started so far (at most 2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 600) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:].strip()
        except OSError:
            return ""

    def _start_once(self) -> None:
        self.stop()
        self.starts += 1
        with open(self.log, "ab") as out:
            out.write(f"--- start {self.starts}: port {self.port}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.argv(self.port), stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=self.cwd)
        deadline = time.monotonic() + self.timeout_s
        while True:
            status, body = http_status(self.url + self.ready_path)
            if self.ready(status, body):
                return
            if not self.alive:
                raise PeerDied(f"{self.name} exited with status {self.proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise PeerDied(f"{self.name} was not ready within {self.timeout_s:.0f} s")
            time.sleep(0.2)

    def start(self) -> "Peer":
        """Start and wait until ready; one more try when the first dies; skip when both do."""
        while True:
            try:
                self._start_once()
                return self
            except PeerDied as exc:
                self.stop()
                if self.starts >= 2:
                    pytest.skip(f"peer {self.name} failed twice ({exc}); its log ends: {self.log_tail()}")

    def run(self, measure: Callable[[str], T]) -> T:
        """measure(url), measured again on a restarted peer when the peer dies (or drops the
        connection) under it; skipped with the reason when that happens twice."""
        while True:
            if not self.alive:
                self.start()
            try:
                return measure(self.url)
            except PEER_ERRORS as exc:
                if self.starts >= 2:
                    pytest.skip(f"peer {self.name} failed during the measurement twice ({type(exc).__name__}: "
                                f"{exc}); its log ends: {self.log_tail()}")
                self._start_once_or_skip(exc)

    def _start_once_or_skip(self, exc: BaseException) -> None:
        try:
            self._start_once()
        except PeerDied as again:
            self.stop()
            pytest.skip(f"peer {self.name} failed ({type(exc).__name__}: {exc}) and did not restart ({again}); "
                        f"its log ends: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

