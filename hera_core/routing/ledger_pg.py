"""The cost ledger on PostgreSQL: one ledger for a fleet of HERA nodes.

The same `CostLedger` interface and the same rows as the SQLite `Ledger` (`ledger.url =
"postgresql://..."` picks this one), plus, per row, the node that booked it and an idempotent row
id, so a row delivered twice (a retry after a lost acknowledgement) is stored once. psycopg 3 with a connection pool;
one transaction per subtask, committed before `record` returns, so a response is sent only after
its row is in the database, or, while the database cannot be reached, in the node's spool file
(appended and fsynced): a node that loses the database keeps serving, and delivers the spooled rows,
in order and at most once each (the row id), with its first booking after the database is back, or
sooner from a background courier thread that retries every `retry_after_s` while the spool is not
empty (also for a spool left by a node that died: it is delivered when the node starts again).

Schema versions: `hera_schema` holds the version; a database of an older version is migrated in
place on open (each migration is idempotent DDL), a newer one is refused with a message.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from dataclasses import asdict
from typing import Any

from hera_core.errors import ConfigError
from hera_core.routing.ledger import _COLUMNS, LEARNING, NOT_FAILED, CostLedger, LedgerRow, totals_of

SCHEMA_VERSION = 4
MIGRATIONS = {  # version -> DDL that brings a database from version - 1 to it
    1: """
CREATE TABLE IF NOT EXISTS subtasks (
    id BIGSERIAL PRIMARY KEY,
    row_uid UUID NOT NULL UNIQUE,          -- idempotent id: a row delivered twice is stored once
    node TEXT NOT NULL,                    -- the HERA node that booked it
    ts DOUBLE PRECISION NOT NULL,
    run TEXT NOT NULL,
    session TEXT NOT NULL,
    step INTEGER NOT NULL,
    route TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    latency_s DOUBLE PRECISION NOT NULL,
    cost_usd DOUBLE PRECISION NOT NULL,
    cloud_cost_usd DOUBLE PRECISION NOT NULL,
    p_local DOUBLE PRECISION,
    threshold DOUBLE PRECISION,
    reason TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'ok'
);
CREATE INDEX IF NOT EXISTS subtasks_run ON subtasks(run);
CREATE INDEX IF NOT EXISTS subtasks_session ON subtasks(session);
CREATE TABLE IF NOT EXISTS cloud_attempts (
    id BIGSERIAL PRIMARY KEY,
    subtask_uid UUID NOT NULL,
    node TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    run TEXT NOT NULL,
    session TEXT NOT NULL,
    step INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    latency_s DOUBLE PRECISION NOT NULL,
    UNIQUE (subtask_uid, attempt)
);
""",
    2: """
CREATE TABLE IF NOT EXISTS budget_holds (
    id UUID PRIMARY KEY,
    node TEXT NOT NULL,
    session TEXT NOT NULL,
    usd DOUBLE PRECISION NOT NULL,         -- the most the held cloud call can cost
    expires DOUBLE PRECISION NOT NULL      -- unix time after which the hold no longer counts (its node died)
);
""",
    # Cloud spend per session and per UTC day, kept by the booking transaction: a budget check
    # reads two rows instead of summing the whole ledger (which grows for ever).
    3: """
CREATE TABLE IF NOT EXISTS cloud_spend (
    scope TEXT PRIMARY KEY,                -- 'session:<id>' or 'day:<days since 1970-01-01, UTC>'
    usd DOUBLE PRECISION NOT NULL
);
INSERT INTO cloud_spend (scope, usd)
    SELECT 'session:' || session, SUM(cost_usd) FROM subtasks WHERE route = 'cloud' GROUP BY session
    UNION ALL
    SELECT 'day:' || FLOOR(ts / 86400)::BIGINT, SUM(cost_usd) FROM subtasks WHERE route = 'cloud'
    GROUP BY FLOOR(ts / 86400)::BIGINT
ON CONFLICT (scope) DO NOTHING;
""",
    4: """
ALTER TABLE subtasks ADD COLUMN IF NOT EXISTS predictor_version TEXT;  -- the predictor version that routed it
""",
}


def spend_scopes(session: str, ts: float) -> tuple[str, str]:
    """The cloud_spend rows a cloud step at `ts` counts in: its UTC day and its session."""
    return f"day:{int(ts // 86400)}", f"session:{session}"


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    import psycopg
    from psycopg_pool import PoolTimeout

    return (psycopg.OperationalError, PoolTimeout)


def default_node_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class PgLedger(CostLedger):
    """The cost ledger a fleet of nodes shares, in PostgreSQL (see the module doc)."""

    remote = True  # bookings go over the network: the runtime makes them off its event loop

    def __init__(self, url: str, *, node: str | None = None, pool_size: int = 4, connect_timeout_s: float = 5.0,
                 spool_path: str | Path | None = None, retry_after_s: float = 2.0) -> None:
        from psycopg_pool import ConnectionPool

        self.node = node or default_node_id()
        self.spool_path = Path(spool_path) if spool_path else None
        self._spool_lock = threading.Lock()
        # After the database failed once, spool at once for this long instead of waiting for a
        # connection on every step; then try again.
        self.retry_after_s = retry_after_s
        self._down_until = 0.0
        self._recheck = False
        # No check on checkout (a round trip per transaction): a connection broken by a database
        # restart fails its first use, that step is spooled, and the pool drops the connection.
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=False, timeout=connect_timeout_s,
                                    kwargs={"autocommit": False, "connect_timeout": max(1, int(connect_timeout_s))})
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
        except Exception as exc:  # noqa: BLE001 - psycopg's PoolTimeout hides the reason in its message
            self._pool.close()
            raise ConfigError(f"cannot reach the PostgreSQL ledger ({type(exc).__name__}); check ledger_url "
                              "(HERA_LEDGER_URL) and that the server is up") from None
        self._migrate()
        self._closed = threading.Event()
        self._courier: threading.Thread | None = None
        if self.spooled():  # rows left by a previous run of this node
            self._start_courier()

    def is_down(self) -> bool:
        """The database failed moments ago (within `retry_after_s`): callers skip it instead of
        waiting for a connection that will not come."""
        return time.monotonic() < self._down_until

    def mark_down(self) -> None:
        self._down_until = time.monotonic() + self.retry_after_s
        self._recheck = True  # the pool may hold connections the outage broke

    def _pool_ready(self):
        """The pool, its idle connections tested once after an outage (broken ones replaced), so
        the first steps after a database restart do not each find a dead connection."""
        if self._recheck:
            self._recheck = False
            try:
                self._pool.check()
            except Exception:  # noqa: BLE001 - still down: the next use fails and marks it again
                pass
        return self._pool

    def _start_courier(self) -> None:
        with self._spool_lock:
            if self._courier is not None and self._courier.is_alive():
                return
            self._courier = threading.Thread(target=self._deliver_until_empty, name="hera-ledger-courier",
                                             daemon=True)
            self._courier.start()

    def _deliver_until_empty(self) -> None:
        while not self._closed.wait(self.retry_after_s):
            if self.is_down():
                continue
            try:
                self.deliver_spool()
            except (ConnectionError, *_unreachable_errors()):
                self.mark_down()
                continue
            if not self.spooled():
                return

    def _migrate(self) -> None:
        with self._pool.connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(727274)")  # one node migrates at a time
            conn.execute("CREATE TABLE IF NOT EXISTS hera_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM hera_schema").fetchone()
            version = row[0] if row else 0
            if version > SCHEMA_VERSION:
                raise ConfigError(f"the PostgreSQL ledger has schema version {version}, this HERA knows up to "
                                  f"{SCHEMA_VERSION}; upgrade HERA on this node")
            for v in range(version + 1, SCHEMA_VERSION + 1):
                conn.execute(MIGRATIONS[v])
            if row is None:
                conn.execute("INSERT INTO hera_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
            elif version < SCHEMA_VERSION:
                conn.execute("UPDATE hera_schema SET version = %s", (SCHEMA_VERSION,))

    def record(self, row: LedgerRow, attempts: list[tuple[str, float]] | None = None,
               row_uid: str | None = None) -> int:
        """Book one subtask (and its cloud attempts) in one transaction, committed on return; a
        `row_uid` already stored is not stored again (its id is returned). With a spool file, a
        database that cannot be reached spools the row instead (id 0 until it is delivered)."""
        row.ts = row.ts or time.time()
        item = {"uid": row_uid or str(uuid.uuid4()), "row": asdict(row), "attempts": [list(a) for a in attempts or []]}
        try:
            if self.spool_path is not None and self.is_down():
                raise ConnectionError("the database was unreachable moments ago")
            self.deliver_spool()
            with self._pool_ready().connection() as conn:
                spend: dict[str, float] = {}
                got = self._insert(conn, item, spend)
                self._add_spend(conn, spend)
                return got
        except (ConnectionError, *_unreachable_errors()) as exc:
            if self.spool_path is None:
                raise ConfigError(f"the PostgreSQL ledger cannot be reached ({type(exc).__name__}) and this node "
                                  "has no spool file") from None
            if not isinstance(exc, ConnectionError):
                self.mark_down()
            self._spool(item)
            self._start_courier()
            return 0

    def _insert(self, conn, item: dict[str, Any], spend: dict[str, float]) -> int:
        """Insert one spooled-or-fresh item; a new cloud row's cost is added to `spend` by scope."""
        values, uid = item["row"], item["uid"]
        cols = ["row_uid", "node", *_COLUMNS]
        got = conn.execute(f"INSERT INTO subtasks ({','.join(cols)}) VALUES ({','.join(['%s'] * len(cols))}) "
                           "ON CONFLICT (row_uid) DO NOTHING RETURNING id",
                           [uid, self.node, *[values[c] for c in _COLUMNS]]).fetchone()
        if got is None:  # delivered before
            return int(conn.execute("SELECT id FROM subtasks WHERE row_uid = %s", (uid,)).fetchone()[0])
        if values["route"] == "cloud" and values["cost_usd"]:
            for scope in spend_scopes(values["session"], values["ts"]):
                spend[scope] = spend.get(scope, 0.0) + values["cost_usd"]
        if item["attempts"]:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO cloud_attempts (subtask_uid, node, ts, run, session, step, attempt, outcome, "
                    "latency_s) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                    [(uid, self.node, values["ts"], values["run"], values["session"], values["step"], i + 1, outcome,
                      lat) for i, (outcome, lat) in enumerate(item["attempts"])])
        return int(got[0])

    @staticmethod
    def _add_spend(conn, spend: dict[str, float]) -> None:
        """Add to the spend counters in one sorted order, so concurrent bookings never deadlock."""
        if spend:
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO cloud_spend (scope, usd) VALUES (%s, %s) ON CONFLICT (scope) "
                                "DO UPDATE SET usd = cloud_spend.usd + EXCLUDED.usd", sorted(spend.items()))

    # --- the spool: rows booked while the database was away -------------------------------------
    def _spool(self, item: dict[str, Any]) -> None:
        with self._spool_lock:
            self.spool_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.spool_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (json.dumps(item) + "\n").encode())
                os.fsync(fd)  # durable before the response goes out
            finally:
                os.close(fd)

    def spooled(self) -> int:
        """Rows waiting in the spool file."""
        with self._spool_lock:
            if self.spool_path is None or not self.spool_path.exists():
                return 0
            return sum(1 for line in self.spool_path.read_text().splitlines() if line.strip())

    def deliver_spool(self) -> int:
        """Deliver the spooled rows in one transaction, then empty the spool; a crash in between
        delivers them again later, and the row ids keep each stored once. Returns how many."""
        with self._spool_lock:
            if self.spool_path is None or not self.spool_path.exists() or self.spool_path.stat().st_size == 0:
                return 0
            items = [json.loads(line) for line in self.spool_path.read_text().splitlines() if line.strip()]
            with self._pool_ready().connection() as conn:
                spend: dict[str, float] = {}
                for item in items:
                    self._insert(conn, item, spend)
                self._add_spend(conn, spend)
            os.truncate(self.spool_path, 0)
            return len(items)

    def wait_delivered(self, timeout_s: float) -> bool:
        """Wait until the spool is empty and the courier has stopped; False after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            courier = self._courier
            if not self.spooled() and (courier is None or not courier.is_alive()):
                return True
            time.sleep(0.05)
        return False

    def connection(self):
        """A pooled connection, one transaction (committed when the `with` block ends)."""
        return self._pool_ready().connection()

    def _dicts(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        with self._pool.connection() as conn:
            cur = conn.execute(sql, params)
            names = [d.name for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def attempts(self, run: str | None = None) -> list[dict[str, Any]]:
        return self._dicts("SELECT * FROM cloud_attempts" + (" WHERE run=%s" if run else "") + " ORDER BY id",
                           (run,) if run else ())

    def rows(self, run: str | None = None) -> list[dict[str, Any]]:
        return self._dicts("SELECT * FROM subtasks" + (" WHERE run=%s" if run else "") + " ORDER BY id",
                           (run,) if run else ())

    def totals(self, run: str | None = None) -> dict[str, Any]:
        """The SQLite ledger's totals, over every node's rows."""
        where = " WHERE status='ok'" + (" AND run=%s" if run else "")
        args = (run,) if run else ()
        with self._pool.connection() as conn:
            served = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM((route='local')::int),0), COALESCE(SUM(cost_usd),0), "
                "COALESCE(SUM(CASE WHEN route='cloud' THEN cost_usd ELSE 0 END),0), COALESCE(SUM(cloud_cost_usd),0), "
                "COALESCE(SUM(prompt_tokens),0), COALESCE(SUM(completion_tokens),0), COALESCE(SUM(cached_tokens),0) "
                f"FROM subtasks{where}", args).fetchone()
            apart = conn.execute(
                f"SELECT COALESCE(SUM((status NOT IN {NOT_FAILED})::int),0), "
                f"COALESCE(SUM((status='cancelled')::int),0), "
                f"COALESCE(SUM(CASE WHEN status IN {LEARNING} THEN cost_usd ELSE 0 END),0) "
                "FROM subtasks" + (" WHERE run=%s" if run else ""), args).fetchone()
        return totals_of(served, apart)

    def per_node(self, run: str | None = None) -> list[dict[str, Any]]:
        """Totals per node (the fleet view)."""
        where = " WHERE status='ok'" + (" AND run=%s" if run else "")
        return self._dicts("SELECT node, COUNT(*) AS subtasks, SUM((route='local')::int) AS local_subtasks, "
                           "SUM(cost_usd) AS cost_usd, SUM(cloud_cost_usd) AS all_cloud_cost_usd "
                           f"FROM subtasks{where} GROUP BY node ORDER BY node", (run,) if run else ())

    def cloud_spend(self, since: float) -> list[tuple[str, float, float]]:
        with self._pool.connection() as conn:
            return [tuple(r) for r in conn.execute(
                "SELECT session, SUM(cost_usd), SUM(CASE WHEN ts >= %s THEN cost_usd ELSE 0 END) "
                "FROM subtasks WHERE route='cloud' GROUP BY session", (since,)).fetchall()]

    def sessions(self, run: str | None = None) -> list[dict[str, Any]]:
        where = " WHERE status='ok'" + (" AND run=%s" if run else "")
        rows = self._dicts("SELECT session, COUNT(*) AS subtasks, SUM((route='local')::int) AS local_subtasks, "
                           "SUM(cost_usd) AS cost_usd, SUM(cloud_cost_usd) AS all_cloud_cost_usd "
                           f"FROM subtasks{where} GROUP BY session ORDER BY MIN(id)", (run,) if run else ())
        return rows

    def close(self) -> None:
        self._closed.set()
        if self._courier is not None:
            self._courier.join(timeout=5)
        self._pool.close()


class PgBudget:
    """Cloud spend caps shared by every node of a PostgreSQL ledger.

    Spend is what the shared ledger has booked on the cloud, plus the holds of calls in flight.
    Before a cloud call a node takes a hold of the call's highest price, atomically (one advisory
    lock serializes the check and the insert across the fleet), unless a cap is already reached;
    after the step's row is committed the hold is dropped. So concurrent nodes overspend a cap by at
    most what the calls admitted last cost beyond their holds, and never by the calls still in
    flight. A hold whose node died stops counting after `hold_ttl_s`. `clock` gives unix seconds
    for the day and the holds' expiry (every node of a test passes the same fake one).
    """

    def __init__(self, ledger: PgLedger, *, per_session_usd: float | None = None, per_day_usd: float | None = None,
                 action: str = "local", hold_ttl_s: float = 600.0, when_unreachable: str = "refuse",
                 clock: Callable[[], float] = time.time) -> None:
        if action not in ("local", "refuse"):
            raise ValueError(f"budget action must be 'local' or 'refuse', got {action!r}")
        self.ledger, self.per_session_usd, self.per_day_usd = ledger, per_session_usd, per_day_usd
        self.action, self.hold_ttl_s = action, hold_ttl_s
        self._clock = clock
        # The database is away and the caps cannot be checked: "refuse" cloud steps (they run on
        # the SLM with budget_action local, else 429), or "allow" them unchecked.
        self.when_unreachable = when_unreachable

    def _spent(self, conn, session: str, now: float) -> tuple[float, float]:
        """(session spend, day spend): booked (the counters) plus held by calls in flight, one query."""
        day, sess = spend_scopes(session, now)
        return conn.execute(
            "SELECT COALESCE((SELECT usd FROM cloud_spend WHERE scope = %s), 0) "
            "     + COALESCE((SELECT SUM(usd) FROM budget_holds WHERE session = %s AND expires > %s), 0), "
            "       COALESCE((SELECT usd FROM cloud_spend WHERE scope = %s), 0) "
            "     + COALESCE((SELECT SUM(usd) FROM budget_holds WHERE expires > %s), 0)",
            (sess, session, now, day, now)).fetchone()

    def _over(self, session_total: float, day_total: float) -> str | None:
        if self.per_day_usd is not None and day_total >= self.per_day_usd:
            return "daily"
        if self.per_session_usd is not None and session_total >= self.per_session_usd:
            return "session"
        return None

    def _unchecked(self) -> str | None:
        return "unchecked" if self.when_unreachable == "refuse" else None

    def exceeded(self, session: str) -> str | None:
        if self.ledger.is_down():
            return self._unchecked()
        try:
            with self.ledger.connection() as conn:
                return self._over(*self._spent(conn, session, self._clock()))
        except _unreachable_errors():
            self.ledger.mark_down()
            return self._unchecked()

    def reserve(self, session: str, usd: float) -> tuple[str | None, object]:
        if self.ledger.is_down():  # do not wait for a connection on every step of an outage
            return self._unchecked(), None
        try:
            return self._reserve(session, usd)
        except _unreachable_errors():
            self.ledger.mark_down()
            return self._unchecked(), None

    def _reserve(self, session: str, usd: float) -> tuple[str | None, object]:
        now = self._clock()
        with self.ledger.connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(727275)")  # the fleet's check-and-hold, one at a time
            over = self._over(*self._spent(conn, session, now))
            if over is not None:
                return over, None
            hold = str(uuid.uuid4())
            conn.execute("INSERT INTO budget_holds (id, node, session, usd, expires) VALUES (%s,%s,%s,%s,%s)",
                         (hold, self.ledger.node, session, usd, now + self.hold_ttl_s))
            return None, hold

    def settle(self, session: str, hold: object, usd: float) -> None:
        """The step is booked (its cost is in the ledger) or did not reach the cloud: drop the hold."""
        if hold is not None and not self.ledger.is_down():
            try:
                with self.ledger.connection() as conn:  # this hold, and any that expired (their nodes died)
                    conn.execute("DELETE FROM budget_holds WHERE id = %s OR expires <= %s", (hold, self._clock()))
            except _unreachable_errors():
                self.ledger.mark_down()  # the hold expires by itself

    def add(self, session: str, usd: float) -> None:
        """Spend is read from the shared ledger's rows: nothing to add."""
