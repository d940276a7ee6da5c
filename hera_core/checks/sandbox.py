"""Running model-written code: always in a separate, isolated process, never in this one.

The child runs `python -I` (no site, no user paths) with an empty environment, in a temporary
working directory, under memory and CPU limits and a wall-clock timeout, with socket creation
disabled (model code has no business on the network).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# The child's entry point: blocks sockets, then runs the program from main.py (so its line
# numbers in error messages are the program's own).
_ENTRY = (
    "import socket as _s\n"
    "def _no_network(*a, **k):\n"
    "    raise OSError('network access is disabled in the sandbox')\n"
    "_s.socket = _s.create_connection = _s.getaddrinfo = _s.socketpair = _no_network\n"
    "del _s\n"
    "import runpy\n"
    "runpy.run_path('main.py', run_name='__main__')\n"
)


def run_python(code: str, timeout_s: float = 5.0, max_output: int | None = 500) -> tuple[bool, str]:
    """(ok, output): stdout when the program exits 0, else the last line of its error."""
    def limits() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        # One second past the wall-clock timeout: CPU time never runs ahead of wall time, so a busy
        # loop always ends as "timed out" (at an equal limit the two raced, and the message varied).
        cpu = int(timeout_s) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))

    with tempfile.TemporaryDirectory(prefix="hera-tool-") as cwd:
        Path(cwd, "main.py").write_text(code)
        try:
            proc = subprocess.run([sys.executable, "-I", "-c", _ENTRY], cwd=cwd, capture_output=True,
                                  text=True, timeout=timeout_s, env={}, preexec_fn=limits)
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout_s:.0f}s"
    if proc.returncode < 0 and not proc.stderr.strip():  # killed by a signal, silently
        return False, f"killed by {signal.Signals(-proc.returncode).name}"
    if proc.returncode != 0:
        err = proc.stderr.strip() or proc.stdout.strip()
        return False, (err.splitlines() or ["error"])[-1][:300]
    out = proc.stdout.strip()
    return True, (out[:max_output] if out else "(nothing)")
