"""The trace store: what HERA keeps of served steps to learn the agent it serves (SQLite, beside
the ledger).

One row per step that has both answers: the cloud's and the SLM's (a shadow draft of a step routed
to the cloud, or an audited step kept local whose cloud answer was asked for too). The row keeps
what the predictor saw (its feature row) and what the two answers were, so `hera learn` can label
the step by their agreement (hera_core.checks.agreement) and retrain on it. Rows of `local-only`
steps are never written (they never reach the cloud, and their data never leaves the device's
ledger); a request can turn tracing off (the server's `X-HERA-Trace: off` header).

Bounded: past `max_rows`, the oldest rows are deleted first. The file is created with mode 0600:
it holds prompts and answers.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS steps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,              -- unix time the row was written
    kind TEXT NOT NULL,            -- 'shadow' (routed to the cloud, the SLM drafted too) or 'audit'
    session TEXT NOT NULL,
    step INTEGER NOT NULL,         -- 0-based position in its session
    cluster TEXT NOT NULL,         -- the served agent the step belongs to (familiarity's family)
    opening TEXT NOT NULL,         -- the session's opening user message (familiarity's text)
    prompt TEXT NOT NULL,          -- the step's last user message (agreement reads its examples)
    features TEXT NOT NULL,        -- JSON list: the predictor's feature row (FEATURE_NAMES order)
    predictor_version TEXT NOT NULL,
    cloud_text TEXT NOT NULL,
    cloud_calls TEXT,              -- JSON list of tool calls, or NULL
    draft_text TEXT NOT NULL,
    draft_calls TEXT,
    label INTEGER,                 -- 1 substitutable, 0 not, NULL not labelled yet
    rule TEXT                      -- the agreement rule that gave the label
);
CREATE INDEX IF NOT EXISTS steps_unlabelled ON steps(label) WHERE label IS NULL;
"""


@dataclass
class TraceRow:
    kind: str
    session: str
    step: int
    cluster: str
    opening: str
    prompt: str
    features: list[float]
    predictor_version: str
    cloud_text: str
    draft_text: str
    cloud_calls: list[dict[str, Any]] | None = None
    draft_calls: list[dict[str, Any]] | None = None
    label: int | None = None
    rule: str | None = None
    id: int | None = None
    ts: float = field(default=0.0)


COLUMNS = ("ts", "kind", "session", "step", "cluster", "opening", "prompt", "features", "predictor_version",
            "cloud_text", "cloud_calls", "draft_text", "draft_calls", "label", "rule")


class TraceStore:
    """Thread-safe (one connection behind a lock): rows are added from worker threads."""

    def __init__(self, path: str | Path, max_rows: int = 50_000) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.path = Path(path)
        self.max_rows = max_rows
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(SCHEMA)
        self._lock = threading.Lock()

    def add(self, row: TraceRow) -> int:
        values = record_values(row)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            cur = self._conn.execute(f"INSERT INTO steps ({', '.join(COLUMNS)}) VALUES "
                                     f"({', '.join('?' * len(COLUMNS))})", values)
            # Oldest first past the bound: ids grow with time, so the smallest go.
            self._conn.execute("DELETE FROM steps WHERE id <= (SELECT MAX(id) FROM steps) - ?", (self.max_rows,))
            self._conn.execute("COMMIT")
            return int(cur.lastrowid)

    def set_label(self, row_id: int, label: int, rule: str) -> None:
        with self._lock:
            self._conn.execute("UPDATE steps SET label = ?, rule = ? WHERE id = ?", (int(label), rule, row_id))

    def rows(self, *, labelled: bool | None = None, since_id: int = 0, kind: str | None = None) -> list[TraceRow]:
        where, args = row_filter(labelled, since_id, kind, "?")
        with self._lock:
            cur = self._conn.execute(f"SELECT id, {', '.join(COLUMNS)} FROM steps WHERE {where} ORDER BY id", args)
            records = cur.fetchall()
        return [row_from_record(r) for r in records]

    def count(self, *, labelled: bool | None = None) -> int:
        where = "" if labelled is None else (" WHERE label IS NOT NULL" if labelled else " WHERE label IS NULL")
        with self._lock:
            return int(self._conn.execute(f"SELECT COUNT(*) FROM steps{where}").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "TraceStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def record_values(row: TraceRow) -> tuple:
    """A row's values in COLUMNS order, as both stores write them (lists as JSON text)."""
    return (row.ts or time.time(), row.kind, row.session, row.step, row.cluster, row.opening, row.prompt,
            json.dumps([float(x) for x in row.features]), row.predictor_version, row.cloud_text,
            json.dumps(row.cloud_calls) if row.cloud_calls else None, row.draft_text,
            json.dumps(row.draft_calls) if row.draft_calls else None, row.label, row.rule)


def row_filter(labelled: bool | None, since_id: int, kind: str | None, mark: str) -> tuple[str, list]:
    """The WHERE clause of `rows()` and its arguments, with the driver's placeholder `mark`."""
    where, args = [f"id > {mark}"], [since_id]
    if labelled is not None:
        where.append("label IS NOT NULL" if labelled else "label IS NULL")
    if kind is not None:
        where.append(f"kind = {mark}")
        args.append(kind)
    return " AND ".join(where), args


def _today_row(features: list[float]) -> list[float]:
    """A stored feature row in today's FEATURE_NAMES order: a row stored before the answer schema's
    size was a feature lacks it (missing, NaN: whether that step asked for a schema is not known)."""
    from hera_core.routing.predictor import FEATURE_NAMES, V2_FEATURE_NAMES

    if len(features) == len(V2_FEATURE_NAMES) < len(FEATURE_NAMES):
        return features + [float("nan")]
    return features


def row_from_record(r: tuple) -> TraceRow:
    (rid, ts, kind, session, step, cluster, opening, prompt, features, version, cloud_text, cloud_calls,
     draft_text, draft_calls, label, rule) = r
    return TraceRow(kind=kind, session=session, step=step, cluster=cluster, opening=opening, prompt=prompt,
                    features=_today_row(json.loads(features)), predictor_version=version, cloud_text=cloud_text,
                    draft_text=draft_text, cloud_calls=json.loads(cloud_calls) if cloud_calls else None,
                    draft_calls=json.loads(draft_calls) if draft_calls else None, label=label, rule=rule,
                    id=rid, ts=ts)
