"""Cost ledger: one row per subtask in SQLite.

Durability rule: WAL journal with synchronous=NORMAL, one transaction per row, committed before
the caller answers the client. A committed row survives a killed process (kill -9): the WAL is in
the OS page cache and is replayed on the next open; only a power loss can drop the last
transactions. A row is never half-written (SQLite transactions are atomic). The file is created
with mode 0600: it holds session ids and costs.

`CostLedger` is what every ledger offers (the runtime, the budget, the server and `hera ledger` use
nothing else): this SQLite `Ledger` and the PostgreSQL `PgLedger` of a fleet (ledger_pg.py)
implement it, and tests/test_ledger_contract.py runs one suite against both.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

SCHEMA = """
CREATE TABLE IF NOT EXISTS subtasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,                 -- unix time the subtask finished
    run TEXT NOT NULL,                -- label grouping rows (a demo arm, a server instance)
    session TEXT NOT NULL,            -- agent session id
    step INTEGER NOT NULL,            -- 0-based position of the subtask in its session
    route TEXT NOT NULL,              -- 'local' or 'cloud'
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,   -- prompt tokens reused from the local KV cache
    latency_s REAL NOT NULL,
    cost_usd REAL NOT NULL,           -- what this subtask cost on its route
    cloud_cost_usd REAL NOT NULL,     -- what it would have cost on the cloud (= cost_usd there)
    p_local REAL,                     -- predictor's P(SLM good enough); NULL when not scored
    threshold REAL,                   -- kappa(step) used for the decision
    reason TEXT NOT NULL,             -- why this route (predictor, local-only, budget, fallback...)
    status TEXT NOT NULL DEFAULT 'ok', -- 'ok', 'cancelled' (client left mid-answer), 'shadow' or 'audit'
                                       -- (the learning loop's own calls), or an error class
    predictor_version TEXT            -- the predictor version that routed it (NULL: not recorded)
);
CREATE INDEX IF NOT EXISTS subtasks_run ON subtasks(run);
CREATE TABLE IF NOT EXISTS cloud_attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    run TEXT NOT NULL,
    session TEXT NOT NULL,
    step INTEGER NOT NULL,
    attempt INTEGER NOT NULL,         -- 1-based try of this subtask's cloud request
    outcome TEXT NOT NULL,            -- 'ok', an HTTP status, a connection error, 'circuit-open'
    latency_s REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS subtasks_session ON subtasks(session);
"""


@dataclass
class LedgerRow:
    run: str
    session: str
    step: int
    route: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    latency_s: float
    cost_usd: float
    cloud_cost_usd: float
    p_local: float | None
    threshold: float | None
    reason: str
    status: str = "ok"
    ts: float = 0.0
    predictor_version: str | None = None


_COLUMNS = [f.name for f in fields(LedgerRow)]
# Rows of the learning loop (hera_core.routing.shadow): a shadow draft's device time, an audit's cloud
# call. Real spend (in learning_cost_usd, and off the saving), never a served subtask nor a failure.
LEARNING = "('shadow','audit')"
NOT_FAILED = "('ok','cancelled','shadow','audit')"


@runtime_checkable
class CostLedger(Protocol):
    """A cost ledger: one row per subtask, booked before the client is answered."""

    remote: bool  # bookings go over the network: the runtime makes them on a worker thread, off its event loop

    def record(self, row: LedgerRow, attempts: list[tuple[str, float]] | None = None) -> int:
        """Book one subtask and its cloud attempts ((outcome, seconds) per try) in one transaction,
        committed on return; the row's id. A row with `ts` 0 is stamped with the time now."""
        ...

    def rows(self, run: str | None = None) -> list[dict[str, Any]]:
        """Every row (of one run label), oldest first: the LedgerRow fields and its `id`."""
        ...

    def attempts(self, run: str | None = None) -> list[dict[str, Any]]:
        """Every cloud attempt (of one run label) in booking order, `attempt` counting from 1."""
        ...

    def totals(self, run: str | None = None) -> dict[str, Any]:
        """Sums over served subtasks (status ok); failed calls and cancelled steps counted apart."""
        ...

    def sessions(self, run: str | None = None) -> list[dict[str, Any]]:
        """Per session, in order of its first row: subtasks, local_subtasks, cost_usd, all_cloud_cost_usd."""
        ...

    def per_node(self, run: str | None = None) -> list[dict[str, Any]]:
        """Per node that booked rows: node, subtasks, local_subtasks, cost_usd, all_cloud_cost_usd."""
        ...

    def cloud_spend(self, since: float) -> list[tuple[str, float, float]]:
        """Per session: (session, cloud USD all time, cloud USD since the unix time `since`)."""
        ...

    def close(self) -> None:
        ...


class Ledger(CostLedger):
    """The cost ledger of one node, in a SQLite file (see the module doc for its durability)."""

    remote = False  # a local file: a booking takes microseconds, inline on the event loop

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # Create with 0600 before SQLite opens it, so no other user can ever read it.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(subtasks)")}
        if "predictor_version" not in columns:  # a ledger written before versions were recorded
            self._db.execute("ALTER TABLE subtasks ADD COLUMN predictor_version TEXT")
        self._lock = threading.Lock()

    def record(self, row: LedgerRow, attempts: list[tuple[str, float]] | None = None) -> int:
        """Book one subtask (and its cloud attempts) in one transaction, committed on return."""
        row.ts = row.ts or time.time()
        values = asdict(row)
        sql = f"INSERT INTO subtasks ({','.join(_COLUMNS)}) VALUES ({','.join('?' * len(_COLUMNS))})"
        with self._lock:
            self._db.execute("BEGIN")
            try:
                cur = self._db.execute(sql, [values[c] for c in _COLUMNS])
                if attempts:
                    self._db.executemany(
                        "INSERT INTO cloud_attempts (ts, run, session, step, attempt, outcome, latency_s) "
                        "VALUES (?,?,?,?,?,?,?)",
                        [(row.ts, row.run, row.session, row.step, i + 1, outcome, lat)
                         for i, (outcome, lat) in enumerate(attempts)])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return int(cur.lastrowid)

    def attempts(self, run: str | None = None) -> list[dict[str, Any]]:
        q = "SELECT * FROM cloud_attempts" + (" WHERE run=?" if run else "") + " ORDER BY id"
        with self._lock:
            cur = self._db.execute(q, (run,) if run else ())
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def rows(self, run: str | None = None) -> list[dict[str, Any]]:
        q = "SELECT * FROM subtasks" + (" WHERE run=?" if run else "") + " ORDER BY id"
        with self._lock:
            cur = self._db.execute(q, (run,) if run else ())
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def totals(self, run: str | None = None) -> dict[str, Any]:
        """Sums over served subtasks (rows of failed cloud calls are counted apart, as `failed_calls`,
        and of subtasks whose client left mid-answer as `cancelled`)."""
        where = " WHERE status='ok'" + (" AND run=?" if run else "")
        q = ("SELECT COUNT(*), COALESCE(SUM(route='local'),0), COALESCE(SUM(cost_usd),0), "
             "COALESCE(SUM(CASE WHEN route='cloud' THEN cost_usd ELSE 0 END),0), "
             "COALESCE(SUM(cloud_cost_usd),0), COALESCE(SUM(prompt_tokens),0), "
             f"COALESCE(SUM(completion_tokens),0), COALESCE(SUM(cached_tokens),0) FROM subtasks{where}")
        with self._lock:
            n, local, cost, cloud_cost, all_cloud, pt, ct, cached = self._db.execute(q, (run,) if run else ()).fetchone()
            failed, cancelled, learning = self._db.execute(
                f"SELECT COALESCE(SUM(status NOT IN {NOT_FAILED}),0), COALESCE(SUM(status='cancelled'),0), "
                f"COALESCE(SUM(CASE WHEN status IN {LEARNING} THEN cost_usd ELSE 0 END),0) "
                "FROM subtasks" + (" WHERE run=?" if run else ""), (run,) if run else ()).fetchone()
        return {"subtasks": n, "failed_calls": failed, "cancelled": cancelled,
                "local_subtasks": local, "local_share": local / n if n else 0.0,
                "cost_usd": cost, "cloud_cost_usd": cloud_cost, "all_cloud_cost_usd": all_cloud,
                "learning_cost_usd": learning, "saving_usd": all_cloud - cost - learning,
                "prompt_tokens": pt, "completion_tokens": ct,
                "cached_tokens": cached}

    def cloud_spend(self, since: float) -> list[tuple[str, float, float]]:
        """Per session: (session, cloud USD all time, cloud USD since the unix time `since`)."""
        with self._lock:
            return self._db.execute(
                "SELECT session, SUM(cost_usd), SUM(CASE WHEN ts >= ? THEN cost_usd ELSE 0 END) "
                "FROM subtasks WHERE route='cloud' GROUP BY session", (since,)).fetchall()

    def sessions(self, run: str | None = None) -> list[dict[str, Any]]:
        where = " WHERE status='ok'" + (" AND run=?" if run else "")
        q = (f"SELECT session, COUNT(*), SUM(route='local'), SUM(cost_usd), SUM(cloud_cost_usd) FROM subtasks{where} "
             "GROUP BY session ORDER BY MIN(id)")
        with self._lock:
            return [{"session": s, "subtasks": n, "local_subtasks": loc, "cost_usd": c, "all_cloud_cost_usd": a}
                    for s, n, loc, c, a in self._db.execute(q, (run,) if run else ()).fetchall()]

    def per_node(self, run: str | None = None) -> list[dict[str, Any]]:
        """Totals per node: one node, this one (a shared PostgreSQL ledger has a row per node)."""
        t = self.totals(run)
        return [{"node": "this node (SQLite)", "subtasks": t["subtasks"], "local_subtasks": t["local_subtasks"],
                 "cost_usd": t["cost_usd"], "all_cloud_cost_usd": t["all_cloud_cost_usd"]}]

    def close(self) -> None:
        with self._lock:
            self._db.close()
