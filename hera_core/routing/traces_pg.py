"""The trace store of a fleet: the same rows as `TraceStore` (hera_core.routing.traces), in the
PostgreSQL database the fleet's ledger uses (`ledger_url`), so every node learns from the traffic
all nodes served. Each row names the node that traced it. Bounded like the SQLite store: past
`max_rows`, the oldest rows go first. Needs the [fleet] extra (psycopg, psycopg_pool).
"""

from __future__ import annotations

from hera_core.routing.traces import COLUMNS, TraceRow, record_values, row_filter, row_from_record

SCHEMA = """
CREATE TABLE IF NOT EXISTS hera_traces (
    id BIGSERIAL PRIMARY KEY,
    node TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    kind TEXT NOT NULL,
    session TEXT NOT NULL,
    step INTEGER NOT NULL,
    cluster TEXT NOT NULL,
    opening TEXT NOT NULL,
    prompt TEXT NOT NULL,
    features TEXT NOT NULL,
    predictor_version TEXT NOT NULL,
    cloud_text TEXT NOT NULL,
    cloud_calls TEXT,
    draft_text TEXT NOT NULL,
    draft_calls TEXT,
    label INTEGER,
    rule TEXT
);
CREATE INDEX IF NOT EXISTS hera_traces_unlabelled ON hera_traces (id) WHERE label IS NULL;
"""


class PgTraceStore:
    """`TraceStore`'s interface over PostgreSQL (thread-safe: a small connection pool)."""

    def __init__(self, url: str, *, node: str | None = None, max_rows: int = 50_000, pool_size: int = 2,
                 connect_timeout_s: float = 5.0) -> None:
        from psycopg_pool import ConnectionPool

        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        from hera_core.routing.ledger_pg import default_node_id

        self.max_rows, self.node = max_rows, node or default_node_id()
        self.path = "the fleet's database"  # where the rows are, for messages (TraceStore names its file)
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=False, timeout=connect_timeout_s,
                                    kwargs={"autocommit": True, "connect_timeout": int(connect_timeout_s)})
        self._pool.open(wait=True, timeout=connect_timeout_s)
        with self._pool.connection() as conn:
            conn.execute("SELECT pg_advisory_lock(4812)")  # nodes starting together create the table once
            try:
                conn.execute(SCHEMA)
            finally:
                conn.execute("SELECT pg_advisory_unlock(4812)")

    def add(self, row: TraceRow) -> int:
        values = record_values(row)
        with self._pool.connection() as conn, conn.transaction():
            row_id = conn.execute(f"INSERT INTO hera_traces (node, {', '.join(COLUMNS)}) VALUES "
                                  f"(%s, {', '.join(['%s'] * len(COLUMNS))}) RETURNING id",
                                  (self.node, *values)).fetchone()[0]
            # Oldest first past the bound: ids grow with time, so the smallest go.
            conn.execute("DELETE FROM hera_traces WHERE id <= (SELECT MAX(id) FROM hera_traces) - %s",
                         (self.max_rows,))
        return int(row_id)

    def set_label(self, row_id: int, label: int, rule: str) -> None:
        with self._pool.connection() as conn:
            conn.execute("UPDATE hera_traces SET label = %s, rule = %s WHERE id = %s", (int(label), rule, row_id))

    def rows(self, *, labelled: bool | None = None, since_id: int = 0, kind: str | None = None) -> list[TraceRow]:
        where, args = row_filter(labelled, since_id, kind, "%s")
        with self._pool.connection() as conn:
            records = conn.execute(f"SELECT id, {', '.join(COLUMNS)} FROM hera_traces WHERE {where} ORDER BY id",
                                   args).fetchall()
        return [row_from_record(tuple(r)) for r in records]

    def count(self, *, labelled: bool | None = None) -> int:
        where = "" if labelled is None else (" WHERE label IS NOT NULL" if labelled else " WHERE label IS NULL")
        with self._pool.connection() as conn:
            return int(conn.execute(f"SELECT COUNT(*) FROM hera_traces{where}").fetchone()[0])

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> "PgTraceStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
