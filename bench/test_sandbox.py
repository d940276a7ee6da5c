"""What the kernel sandbox costs per run of model-written code: the bubblewrap sandbox (namespaces,
seccomp, read-only root, fresh tmpfs) against a plain child process (`python -I -S`, rlimits,
empty environment: the weak mode of HERA_SANDBOX_ALLOW_UNSAFE=1, the old sandbox's shape), on
the same programs in one run.

Programs: a one-line print (start-up cost alone) and a typical draft check (a GSM-style program
of the committed traces).

extra_info: plain_median_ms, isolated_median_ms, added_ms (their difference) and ratio_vs_plain.
"""

from __future__ import annotations

import statistics
import time

import pytest

from hera_core.checks.sandbox import Sandbox

PROGRAMS = {
    "print": "print(1)",
    "draft": ("orange_blocks = 4\ngreen_blocks = 2 * orange_blocks\ntotal_blocks = 31\n"
              "white_blocks = total_blocks - (orange_blocks + green_blocks)\nprint(white_blocks)\n"),
}


@pytest.fixture(scope="module")
def sandboxes() -> dict[str, Sandbox]:
    isolated = Sandbox()
    isolated.require()
    plain = Sandbox(bwrap="/nonexistent/bwrap", allow_unsafe=True)
    assert plain.status.mechanism == "unsafe-process"
    return {"isolated": isolated, "plain": plain}


@pytest.mark.parametrize("program", list(PROGRAMS))
def test_sandbox_run(benchmark, sandboxes, program):
    """One round runs the program in a plain child, then in the sandbox (interleaved, so both see
    the same machine load); the benchmark's time is the pair's."""
    code = PROGRAMS[program]
    times: dict[str, list[float]] = {"plain": [], "isolated": []}
    for _ in range(3):  # warm-up: page cache, the probe
        for box in sandboxes.values():
            box.run(code)

    def pair():
        for mode in ("plain", "isolated"):
            t0 = time.perf_counter()
            ok, out = sandboxes[mode].run(code)
            times[mode].append(time.perf_counter() - t0)
            assert ok, out

    benchmark.pedantic(pair, rounds=40, iterations=1)
    plain, isolated = (statistics.median(times[m]) * 1000 for m in ("plain", "isolated"))
    benchmark.extra_info.update(plain_median_ms=round(plain, 2), isolated_median_ms=round(isolated, 2),
                                added_ms=round(isolated - plain, 2), ratio_vs_plain=round(isolated / plain, 3))
