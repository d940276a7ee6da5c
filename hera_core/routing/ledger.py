"""Cost ledger: one row per subtask in SQLite.

Durability (the `durability` setting, `ledger_durability` in the settings):
- "async" (the default): `record` gives the row its id in-process and hands it to one writer thread,
  which commits whatever has queued meanwhile in one transaction (a batch grows with load), so the
  request path never waits for SQLite. Every read of this ledger (rows, totals, cloud_spend, ...)
  first waits for the rows recorded before it, and `close()` (and interpreter exit) drains the
  queue: a clean shutdown loses nothing. A killed process (kill -9) loses the rows recorded but
  not yet committed: those of the last writer turn, i.e. the last few milliseconds of bookings
  (the writer gathers rows for LINGER_S, 5 ms, then commits them in one transaction).
  The budget never waits for the ledger: it keeps spend in memory (budget.py) and reads the ledger
  only at start. One writing process per file: ids are allocated by this process.
- "commit": answer after commit, one transaction per row, committed before `record` returns.

Either way: WAL journal with synchronous=NORMAL. A committed row survives a killed process: the WAL
is in the OS page cache and is replayed on the next open; only a power loss can drop the last
transactions. A row is never half-written (SQLite transactions are atomic). The file is created
with mode 0600: it holds session ids and costs.

`CostLedger` is what every ledger offers (the runtime, the budget, the server and `hera ledger` use
nothing else): this SQLite `Ledger` and the PostgreSQL `PgLedger` of a fleet (ledger_pg.py)
implement it, and tests/test_ledger_contract.py runs one suite against both.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import operator
import os
import sqlite3
import weakref
import threading
import time
from dataclasses import dataclass, fields
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


@dataclass(slots=True)
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
COLUMNS = tuple(_COLUMNS)  # a row's values in this order: CostLedger.record_values
_TS = _COLUMNS.index("ts")
_INSERT = f"INSERT INTO subtasks ({','.join(_COLUMNS)}) VALUES ({','.join('?' * len(_COLUMNS))})"
_INSERT_WITH_ID = f"INSERT INTO subtasks (id,{','.join(_COLUMNS)}) VALUES ({','.join('?' * (len(_COLUMNS) + 1))})"
_INSERT_ATTEMPT = ("INSERT INTO cloud_attempts (ts, run, session, step, attempt, outcome, latency_s) "
                   "VALUES (?,?,?,?,?,?,?)")
DURABILITY = ("async", "commit")  # see the module doc
LINGER_S = 0.005  # "async": the writer gathers rows this long before a commit (unless a reader waits)
_NULLABLE = {"p_local", "threshold", "predictor_version"}
_REQUIRED = [i for i, c in enumerate(_COLUMNS) if c not in _NULLABLE]  # NOT NULL columns, by position
_column_values = operator.attrgetter(*_COLUMNS)  # a row -> its values, in column order
_required_values = operator.itemgetter(*_REQUIRED)  # a row's values -> those of its NOT NULL columns
log = logging.getLogger(__name__)
# Rows of the learning loop (hera_core.routing.shadow): a shadow draft's device time, an audit's cloud
# call. Real spend (in learning_cost_usd, and off the saving), never a served subtask nor a failure.
LEARNING = "('shadow','audit')"
NOT_FAILED = "('ok','cancelled','shadow','audit')"


def totals_of(served: tuple, apart: tuple) -> dict[str, Any]:
    """A ledger's totals from its two sums (the same in SQLite and PostgreSQL): over served rows
    (count, local, cost, cloud cost, all-cloud cost, prompt, completion and cached tokens), and over
    the rows apart (failed calls, cancelled, learning-loop cost)."""
    n, local, cost, cloud_cost, all_cloud, pt, ct, cached = served
    failed, cancelled, learning = apart
    return {"subtasks": n, "failed_calls": failed, "cancelled": cancelled,
            "local_subtasks": local, "local_share": local / n if n else 0.0,
            "cost_usd": cost, "cloud_cost_usd": cloud_cost, "all_cloud_cost_usd": all_cloud,
            "learning_cost_usd": learning, "saving_usd": all_cloud - cost - learning,
            "prompt_tokens": pt, "completion_tokens": ct, "cached_tokens": cached}


@runtime_checkable
class CostLedger(Protocol):
    """A cost ledger: one row per subtask, booked (seen by every read) before the client is answered."""

    remote: bool  # bookings go over the network: the runtime makes them on a worker thread, off its event loop

    def record(self, row: LedgerRow, attempts: list[tuple[str, float]] | None = None) -> int:
        """Book one subtask and its cloud attempts ((outcome, seconds) per try) in one transaction; the
        row's id. On return the row is seen by every read of this ledger (committed, or queued for a
        writer whose rows reads wait for: see the ledger's durability). A row with `ts` 0 is stamped
        with the time now."""
        ...

    def record_values(self, values: tuple, attempts: list[tuple[str, float]] | None = None) -> int:
        """`record` of a row given as its values in LedgerRow's field order (COLUMNS): the runtime's
        per-step booking, which skips making the LedgerRow (what the SQLite ledger queues is this)."""
        return self.record(LedgerRow(*values), attempts)

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

    def __init__(self, path: str | Path, durability: str = "async") -> None:
        if durability not in DURABILITY:
            raise ValueError(f"ledger durability {durability!r}: one of {', '.join(DURABILITY)}")
        self.durability = durability
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
        self._lock = threading.Lock()  # the connection: one statement sequence at a time
        self._writer: threading.Thread | None = None
        if durability == "async":
            # Rows recorded and not yet committed, oldest first: (id, column values, attempt rows).
            self._queue: list[tuple[int, tuple, list[tuple]]] = []
            # guards _queue, _next_id, _written, _closing; `record` takes the bare lock (a C call, where
            # the Condition's `with` is two Python ones)
            self._queue_lock = threading.Lock()
            self._queued = threading.Condition(self._queue_lock)
            seq = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='subtasks'").fetchone()
            top = self._db.execute("SELECT MAX(id) FROM subtasks").fetchone()[0]
            self._next_id = max(seq[0] if seq else 0, top or 0) + 1  # the id the next row gets
            self._written = self._next_id - 1  # every id up to this one is committed
            self._closing = False
            self._hurry = False  # a reader waits in flush(): commit now, without lingering
            self._writer = threading.Thread(target=self._write_loop, name="hera-ledger-writer", daemon=True)
            self._writer.start()
            ref = weakref.ref(self)  # a ledger nobody closed is still drained at interpreter exit
            self._atexit = lambda: (lambda ledger: ledger and ledger.close())(ref())
            atexit.register(self._atexit)

    def record(self, row: LedgerRow, attempts: list[tuple[str, float]] | None = None) -> int:
        """Book one subtask (and its cloud attempts) in one transaction (see the module doc for when
        it is committed); the row's id."""
        row.ts = row.ts or time.time()
        return self.record_values(_column_values(row), attempts)  # (not asdict: it deep-copies, ~10 us)

    def record_values(self, values: tuple, attempts: list[tuple[str, float]] | None = None) -> int:
        if not values[_TS]:
            values = (*values[:_TS], time.time(), *values[_TS + 1:])
        ts, run, session, step = values[_TS], values[0], values[1], values[2]
        tries = [(ts, run, session, step, i + 1, outcome, lat)
                 for i, (outcome, lat) in enumerate(attempts)] if attempts else []
        if self._writer is None:
            with self._transaction():
                cur = self._db.execute(_INSERT, values)
                if tries:
                    self._db.executemany(_INSERT_ATTEMPT, tries)
            return int(cur.lastrowid)
        # What the database would refuse is refused here, on the caller's side, as it would be at
        # commit: a row the writer cannot commit would otherwise hold up every row queued after it.
        if None in _required_values(values) or any(None in t for t in tries):
            raise sqlite3.IntegrityError("NOT NULL constraint failed: a ledger row or attempt lacks a value")
        with self._queue_lock:
            if self._closing:
                raise ValueError("the ledger is closed")
            row_id = self._next_id
            self._next_id += 1
            self._queue.append((row_id, values, tries))
            if len(self._queue) == 1:  # the writer sleeps only on an empty queue
                self._queued.notify_all()
        return row_id

    @contextlib.contextmanager
    def _transaction(self):
        """One transaction on the connection, committed, or rolled back on any error."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _write_loop(self) -> None:
        """The writer thread: commits what has queued, one transaction per turn, until closed."""
        while True:
            with self._queued:
                while not self._queue and not self._closing:
                    self._queued.wait()
                if self._queue and not self._closing and not self._hurry:
                    # Let a group form: one commit (and one hand-over of the GIL to this thread)
                    # per LINGER_S instead of per row. flush() and close() cut the wait short.
                    self._queued.wait(LINGER_S)
                if not self._queue:
                    return
                batch, self._queue, self._hurry = self._queue, [], False
            try:
                with self._transaction():
                    self._db.executemany(_INSERT_WITH_ID, [[i, *v] for i, v, _ in batch])
                    tries = [t for _, _, ts in batch for t in ts]
                    if tries:
                        self._db.executemany(_INSERT_ATTEMPT, tries)
            except Exception:  # noqa: BLE001 - a full disk, a locked file: keep the rows and try again
                log.exception("ledger %s: %d rows not committed; retrying", self.path, len(batch))
                with self._queued:
                    self._queue[:0] = batch
                    self._queued.wait(0.5)
                continue
            with self._queued:
                self._written = batch[-1][0]
                self._queued.notify_all()

    def flush(self) -> None:
        """Wait until every row recorded so far is committed (a no-op with durability "commit")."""
        if self._writer is None:
            return
        with self._queued:
            target = self._next_id - 1
            if self._written < target:
                self._hurry = True
                self._queued.notify_all()
            while self._written < target and self._writer.is_alive():
                self._queued.wait()

    def attempts(self, run: str | None = None) -> list[dict[str, Any]]:
        return self._select("cloud_attempts", run)

    def rows(self, run: str | None = None) -> list[dict[str, Any]]:
        return self._select("subtasks", run)

    def _select(self, table: str, run: str | None) -> list[dict[str, Any]]:
        """Every row of `table` (of one run, if given) in id order, once the queue is committed."""
        self.flush()
        q = f"SELECT * FROM {table}" + (" WHERE run=?" if run else "") + " ORDER BY id"
        with self._lock:
            cur = self._db.execute(q, (run,) if run else ())
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def totals(self, run: str | None = None) -> dict[str, Any]:
        """Sums over served subtasks (rows of failed cloud calls are counted apart, as `failed_calls`,
        and of subtasks whose client left mid-answer as `cancelled`)."""
        self.flush()
        where = " WHERE status='ok'" + (" AND run=?" if run else "")
        q = ("SELECT COUNT(*), COALESCE(SUM(route='local'),0), COALESCE(SUM(cost_usd),0), "
             "COALESCE(SUM(CASE WHEN route='cloud' THEN cost_usd ELSE 0 END),0), "
             "COALESCE(SUM(cloud_cost_usd),0), COALESCE(SUM(prompt_tokens),0), "
             f"COALESCE(SUM(completion_tokens),0), COALESCE(SUM(cached_tokens),0) FROM subtasks{where}")
        with self._lock:
            served = self._db.execute(q, (run,) if run else ()).fetchone()
            apart = self._db.execute(
                f"SELECT COALESCE(SUM(status NOT IN {NOT_FAILED}),0), COALESCE(SUM(status='cancelled'),0), "
                f"COALESCE(SUM(CASE WHEN status IN {LEARNING} THEN cost_usd ELSE 0 END),0) "
                "FROM subtasks" + (" WHERE run=?" if run else ""), (run,) if run else ()).fetchone()
        return totals_of(served, apart)

    def cloud_spend(self, since: float) -> list[tuple[str, float, float]]:
        """Per session: (session, cloud USD all time, cloud USD since the unix time `since`)."""
        self.flush()
        with self._lock:
            return self._db.execute(
                "SELECT session, SUM(cost_usd), SUM(CASE WHEN ts >= ? THEN cost_usd ELSE 0 END) "
                "FROM subtasks WHERE route='cloud' GROUP BY session", (since,)).fetchall()

    def sessions(self, run: str | None = None) -> list[dict[str, Any]]:
        self.flush()
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
        """Commit every queued row, stop the writer, close the file (twice is harmless)."""
        if self._writer is not None:
            with self._queued:
                self._closing = True
                self._queued.notify_all()
            self._writer.join()
            atexit.unregister(self._atexit)
        with self._lock:
            self._db.close()
