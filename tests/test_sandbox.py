"""Escape tests of the sandbox that runs model-written code (pytest -m sandbox).

Each test is an attempt a prompt-injected program could make; each asserts the attempt fails
*and* that nothing reached the host (the host side is checked from here, not only what the
program says about itself)."""

from __future__ import annotations

import ast

import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from hera_core.checks import seccomp
from hera_core.checks.drafts import check_draft, vote_key
from hera_core.checks.sandbox import Sandbox, SandboxLimits, SandboxUnavailableError, run_python

pytestmark = pytest.mark.sandbox

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def box() -> Sandbox:
    sandbox = Sandbox()
    status = sandbox.status
    if not status.available:
        pytest.fail(f"no sandbox on this machine: {status.detail}")
    assert status.mechanism == "bubblewrap"
    return sandbox


def attempt(box: Sandbox, code: str, timeout_s: float = 5.0) -> tuple[bool, str]:
    return box.run(code, timeout_s=timeout_s)


# -- the five attempts that succeeded before the sandbox (issue 27) --------------------------------

def test_host_files_cannot_be_read(box):
    ok, out = attempt(box, "print(open('/etc/passwd').read())")
    assert not ok and "FileNotFoundError" in out
    ok, out = attempt(box, f"import os; print(os.listdir({str(REPO)!r}))")
    assert not ok and "FileNotFoundError" in out
    # The project's parent folder: absent, or (a checkout under /tmp) the sandbox's own /tmp, its
    # working folder, which holds nothing of the host's.
    ok, out = attempt(box, f"import os; print(os.listdir({str(REPO.parent)!r}))")
    assert ("FileNotFoundError" in out) if not ok else REPO.name not in ast.literal_eval(out.strip())


def test_writes_stay_inside_the_sandbox(box):
    name = f"/tmp/hera-escape-{uuid.uuid4().hex}"
    ok, out = attempt(box, f"open({name!r}, 'w').write('x'); import os; print(os.path.exists({name!r}))")
    assert ok and out == "True"  # written to the sandbox's own tmpfs...
    assert not os.path.exists(name)  # ...which the host never sees


def test_raw_socket_is_refused(box):
    ok, out = attempt(box, "import _socket; s = _socket.socket(); print(s)")
    assert not ok and "PermissionError" in out


def test_no_shell_or_other_program(box):
    ok, out = attempt(box, "import subprocess; print(subprocess.run(['id'], capture_output=True).stdout)")
    assert not ok and ("PermissionError" in out or "FileNotFoundError" in out)
    ok, out = attempt(box, "import os; print(os.system('id'))")
    assert ok and out != "0"  # no /bin/sh: the shell itself cannot start


def test_parent_environment_and_secrets_are_unreachable(box, monkeypatch):
    secret = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("HERA_CLOUD_API_KEY", secret)
    program = (
        "import os\n"
        "seen = [repr(dict(os.environ))]\n"
        "for pid in [p for p in os.listdir('/proc') if p.isdigit()] + [str(os.getppid())]:\n"
        "    try: seen.append(open(f'/proc/{pid}/environ', 'rb').read().decode(errors='replace'))\n"
        "    except OSError as e: seen.append(type(e).__name__)\n"
        f"try: seen.append(open('/proc/{os.getpid()}/environ', 'rb').read().decode(errors='replace'))\n"
        "except OSError as e: seen.append(type(e).__name__)\n"
        "print(seen)\n"
    )
    ok, out = attempt(box, program)
    assert ok and out.startswith("[\"{'PWD': '/tmp', 'LC_CTYPE': 'C.UTF-8'}\"")  # bwrap's and Python's own only
    assert secret not in out and "HERA_CLOUD_API_KEY" not in out


# -- more attempts ---------------------------------------------------------------------------------

def test_ledger_and_model_files_are_unreachable(box, tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    ledger.write_bytes(b"SQLite format 3\x00secret rows")
    from hera_core.install.models import default_cache_dir
    ok, out = attempt(box, f"print(open({str(ledger)!r}, 'rb').read())")
    assert not ok and "FileNotFoundError" in out and "secret" not in out
    for folder in (tmp_path, default_cache_dir(), Path(sys.prefix), REPO):
        ok, out = attempt(box, f"import os; print(os.listdir({str(folder)!r}))")
        assert not ok and "FileNotFoundError" in out, folder


def test_home_and_root_are_empty(box):
    ok, out = attempt(box, f"import os; print(os.listdir({str(Path.home())!r}))")
    assert not ok or "'.ssh'" not in out and "'.cache'" not in out and "'work'" not in out
    ok, out = attempt(box, "import os; print(sorted(os.listdir('/')), os.listdir('/etc'))")
    top, etc = out.split("] [")
    assert ok and not {"home", "work", "sys", "var", "bin", "sbin", "opt", "srv", "mnt"} & set(eval(top + "]"))
    assert etc == "'ld.so.cache']"  # the dynamic loader's index, nothing else of /etc


def test_project_package_and_site_packages_cannot_be_imported(box):
    for module in ("hera_core", "numpy", "llama_cpp", "pip"):
        ok, out = attempt(box, f"import {module}")
        assert not ok and "ModuleNotFoundError" in out, module


def test_fork_bomb_fails_at_its_first_fork(box):
    ok, out = attempt(box, "import os\nwhile True:\n    os.fork()", timeout_s=3.0)
    assert not ok and "PermissionError" in out
    ok, out = attempt(box, "import threading\nts = [threading.Thread(target=sum, args=([1],)) for _ in range(8)]\n"
                      "[t.start() for t in ts]; [t.join() for t in ts]; print('threads ok')")
    assert ok and out == "threads ok"  # threads still work


def test_disk_fill_is_capped(box):
    limits = SandboxLimits(tmpfs_bytes=8 << 20, file_bytes=64 << 20)
    small = Sandbox(limits)
    ok, out = small.run("n = 0\nwith open('fill', 'wb', buffering=0) as f:\n"
                        "    try:\n        while True:\n            f.write(b'x' * 65536); n += 65536\n"
                        "    except OSError as e:\n        print(n, e.errno)\n")
    assert ok, out
    written, errno_ = map(int, out.split())
    assert written <= 8 << 20 and errno_ == 28  # ENOSPC at the tmpfs's size
    ok, out = box.run("open('big', 'wb').write(b'x' * (32 << 20))")  # RLIMIT_FSIZE: 16 MiB
    assert not ok
    for elsewhere in ("/fill", "/dev/fill", "/usr/lib/fill", "/proc/fill"):  # /tmp is the only writable place
        ok, out = box.run(f"open({elsewhere!r}, 'wb').write(b'x')")
        assert not ok and any(e in out for e in ("Read-only", "PermissionError", "FileNotFound")), (elsewhere, out)


def test_huge_output_is_cut_and_the_run_killed(box):
    start = time.monotonic()
    ok, out = attempt(box, "while True:\n    print('x' * 10000)", timeout_s=20.0)
    assert not ok and "output over" in out
    assert time.monotonic() - start < 15  # killed at the cap, not at the timeout


def test_signals_cannot_reach_the_host(box):
    me = os.getpid()
    ok, out = attempt(box, "import os, signal\nres = []\n"
                      f"for pid in (os.getppid(), 1, {me}):\n"
                      "    try: os.kill(pid, signal.SIGKILL); res.append('sent')\n"
                      "    except OSError as e: res.append(type(e).__name__)\n"
                      "print(os.getpid(), res)")
    # The sandbox's init (its parent, pid 1) ignores what its descendants send; the host's pid
    # does not exist in the sandbox's PID namespace. The program itself lived on to print.
    assert ok and out.endswith("['sent', 'sent', 'ProcessLookupError']"), out


def test_ptrace_and_process_memory_are_refused(box):
    ok, out = attempt(box, "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                      "r = libc.ptrace(16, 1, 0, 0)\nprint(r, ctypes.get_errno())")  # PTRACE_ATTACH
    assert ok and out == "-1 1"  # EPERM
    ok, out = attempt(box, "open('/proc/1/mem', 'rb').read(1)")
    assert not ok


def test_symlink_and_proc_root_tricks_find_nothing(box):
    ok, out = attempt(box, "import os\nos.symlink('/etc/passwd', 'p')\nprint(open('p').read())")
    assert not ok and "FileNotFoundError" in out
    for path in ("/proc/self/root/etc/passwd", "/proc/1/root/etc/passwd", f"/proc/1/cwd/{REPO.name}"):
        ok, out = attempt(box, f"print(open({path!r}).read())")
        assert not ok, path


def test_raw_syscalls_through_ctypes_are_refused(box):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    program = (
        "import ctypes, struct\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        f"fd = libc.syscall({seccomp._ABIS[os.uname().machine][1]['socket']}, 2, 1, 0)\n"  # AF_INET, SOCK_STREAM
        "err = ctypes.get_errno()\n"
        f"addr = struct.pack('!HH4s8x', 2, {port}, bytes([127, 0, 0, 1]))\n"
        "addr = bytes([2, 0]) + addr[2:]\n"
        "c = libc.connect(fd, addr, len(addr)) if fd >= 0 else -1\n"
        "print(fd, err, c)\n"
    )
    ok, out = attempt(box, program)
    assert ok and out.split()[:2] == ["-1", "13"], out  # EACCES from the filter
    with pytest.raises(TimeoutError):
        listener.accept()  # nothing reached the host's loopback
    listener.close()


def test_no_network_even_over_loopback(box):
    ok, out = attempt(box, "import socket; socket.create_connection(('127.0.0.1', 22), timeout=1)")
    assert not ok and "PermissionError" in out


def test_runs_cannot_see_each_other(box):
    token = uuid.uuid4().hex
    results: dict[str, tuple[bool, str]] = {}

    def writer():
        results["w"] = box.run(f"open('/tmp/secret', 'w').write({token!r}); import time; time.sleep(1.5); print('done')")

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.5)  # the writer is (very likely) inside its sandbox now; either way nothing may show
    results["r"] = box.run("import os; print(os.listdir('/tmp'), [open('/proc/%s/cmdline' % p).read() "
                           "for p in os.listdir('/proc') if p.isdigit()])")
    t.join()
    assert results["w"] == (True, "done")
    ok, out = results["r"]
    assert ok and token not in out and "secret" not in out


def _host_processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_no_process_outlives_its_run(box):
    marker = f"hera-orphan-{uuid.uuid4().hex}"
    # The program makes itself findable from the host (its command line carries the marker), ignores
    # SIGTERM, and sleeps past its timeout.
    program = ("import os, signal, sys\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
               "os.execv(sys.executable, [sys.executable, '-I', '-S', '-c', "
               f"'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)', {marker!r}])\n")
    ok, out = box.run(program, timeout_s=2.0)
    assert not ok and out == "timed out after 2s"
    deadline = time.monotonic() + 5
    while _host_processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _host_processes_with(marker) == []


def test_nested_namespaces_and_mounts_are_refused(box):
    ok, out = attempt(box, "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                      "print(libc.unshare(0x10000000), ctypes.get_errno(), "  # CLONE_NEWUSER
                      "libc.mount(b'none', b'/tmp', b'tmpfs', 0, None), ctypes.get_errno())")
    assert ok and out == "-1 1 -1 1"


def test_no_capabilities_and_no_root(box):
    ok, out = attempt(box, "import os\nst = open('/proc/self/status').read()\n"
                      "caps = [l.split()[1] for l in st.splitlines() if l.startswith('CapEff')][0]\n"
                      "try: os.setuid(0); became = 'root'\n"
                      "except OSError as e: became = type(e).__name__\n"
                      "print(os.getuid(), caps, became)")
    assert ok and out == "65534 0000000000000000 OSError"  # uid 0 is not even mapped in its namespace


def test_memory_is_capped(box):
    ok, out = attempt(box, "b = bytearray(2 << 30); print(len(b))")
    assert not ok and "MemoryError" in out


def test_interpreter_is_read_only(box):
    ok, out = attempt(box, "import os; open(os.__file__, 'a').write('# owned')")
    assert not ok and ("Read-only file system" in out or "PermissionError" in out)


def test_host_identity_is_hidden(box):
    ok, out = attempt(box, "import socket, os; print(socket.gethostname(), os.path.exists('/sys'))")
    assert ok and out == "sandbox False"


# -- what it still does, and where it cannot be had ------------------------------------------------

def test_ordinary_programs_behave_as_before(box):
    assert box.run("print(sum(range(10)))") == (True, "45")
    assert box.run("exit(0)") == (True, "")
    ok, out = box.run("raise ValueError('bad input')")
    assert not ok and out == "ValueError: bad input"
    ok, out = box.run("import time\nwhile True: pass", timeout_s=1.0)
    assert not ok and out == "timed out after 1s"
    assert box.run("import math, json, itertools, fractions, re; print(json.dumps([math.gcd(12, 18)]))") == (True, "[6]")


def test_large_programs_pass_whole(box):
    program = "x = 0\n" + "x += 1\n" * 50000 + "print(x)"
    assert box.run(program, timeout_s=20) == (True, "50000")


def test_unavailable_sandbox_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    none = Sandbox(bwrap=str(tmp_path / "no-bwrap"))
    assert not none.status.available and "could not start" in none.status.detail
    with pytest.raises(SandboxUnavailableError, match="HERA_SANDBOX_ALLOW_UNSAFE"):
        none.run(f"open({str(marker)!r}, 'w')")
    assert not marker.exists()
    with pytest.raises(SandboxUnavailableError):
        run_python("print(1)", sandbox=none)


def test_unsafe_mode_only_when_asked(tmp_path):
    weak = Sandbox(bwrap=str(tmp_path / "no-bwrap"), allow_unsafe=True)
    assert weak.status.mechanism == "unsafe-process" and "HERA_SANDBOX_ALLOW_UNSAFE" in weak.status.detail
    assert weak.run("print(6 * 7)") == (True, "42")


def test_draft_checks_escalate_where_no_sandbox(tmp_path, monkeypatch):
    import hera_core.checks.drafts as drafts

    none = Sandbox(bwrap=str(tmp_path / "no-bwrap"))
    monkeypatch.setattr(drafts, "default_sandbox", lambda: none)
    draft = "```python\nprint(2 + 2)\n```\nANSWER: 4"
    check = check_draft([{"role": "user", "content": "What is 2 + 2? End with ANSWER: <number>"}], draft)
    assert not check.passed and "sandbox" in check.detail
    assert vote_key(draft) != vote_key(draft)  # unverifiable answers never agree with each other


def test_seccomp_program_is_well_formed():
    for machine in ("x86_64", "aarch64"):
        prog = seccomp.filter_program(machine)
        assert len(prog) % 8 == 0 and len(prog) // 8 < 4096  # BPF_MAXINSNS
    with pytest.raises(ValueError, match="no seccomp table"):
        seccomp.filter_program("mips")
