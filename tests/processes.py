"""Starting servers in child processes for tests and benchmarks."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request


def wait_for_http(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """Wait until `url` answers any HTTP status; kill `proc` and raise if it exits or time runs out."""
    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # an HTTP error is an answer: the server is up
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
                raise RuntimeError(f"{' '.join(map(str, proc.args[:4]))} did not start: {err}")
            time.sleep(0.2)
