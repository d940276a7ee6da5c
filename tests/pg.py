"""A private PostgreSQL cluster for the fleet tests: initdb in a temp folder, on a free port,
run as the `postgres` user when the tests run as root (PostgreSQL refuses root)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time

from hera_core.serving.assembly import free_port


def pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return versions[-1] if versions else None


class PgCluster:
    def __init__(self) -> None:
        initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        if not initdb or not pg_ctl:
            raise RuntimeError("PostgreSQL is not installed (initdb/pg_ctl not found); .ci/run installs Debian's "
                               "`postgresql` package, or run `apt-get install postgresql`")
        self.pg_ctl = pg_ctl
        self.dir = tempfile.mkdtemp(prefix="hera-pg-")
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run([*self.as_user, initdb, "-D", self.data, "-A", "trust", "-U", "hera", "--no-sync"],
                       check=True, capture_output=True)
        self.start()
        self.url = f"postgresql://hera@127.0.0.1:{self.port}/postgres"

    def new_database(self) -> str:
        """A fresh, empty database on this server; its URL."""
        import uuid

        import psycopg

        name = f"t{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + "/" + name

    def start(self) -> None:
        subprocess.run([*self.as_user, self.pg_ctl, "-D", self.data, "-w", "-l", os.path.join(self.dir, "log"),
                        "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
                        "start"], check=True, capture_output=True)

    def stop(self, mode: str = "fast") -> None:
        subprocess.run([*self.as_user, self.pg_ctl, "-D", self.data, "-m", mode, "-w", "stop"], capture_output=True)

    def restart(self) -> None:
        self.stop("immediate")
        time.sleep(0.2)
        self.start()

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
