import os
import stat
import sqlite3

from hera_core.routing.ledger import Ledger, LedgerRow


def row(**kw):
    base = dict(run="r", session="s", step=0, route="cloud", model="m", prompt_tokens=100, completion_tokens=10,
                cached_tokens=0, latency_s=0.5, cost_usd=0.002, cloud_cost_usd=0.002, p_local=0.3, threshold=0.6,
                reason="predictor")
    base.update(kw)
    return LedgerRow(**base)


def test_file_is_private_and_in_wal_mode(tmp_path):
    path = tmp_path / "ledger.sqlite"
    led = Ledger(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    led.record(row())
    other = sqlite3.connect(path)  # WAL is a property of the file: any connection reports it
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()
    led.close()


def test_totals_sessions_and_saving(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    led.record(row(session="a", step=0, route="cloud", cost_usd=0.002, cloud_cost_usd=0.002))
    led.record(row(session="a", step=1, route="local", cost_usd=0.0001, cloud_cost_usd=0.003))
    led.record(row(session="b", step=0, route="local", cost_usd=0.0001, cloud_cost_usd=0.001))
    led.record(row(run="other", cost_usd=5.0))
    t = led.totals("r")
    assert t["subtasks"] == 3 and t["local_subtasks"] == 2
    assert abs(t["local_share"] - 2 / 3) < 1e-12
    assert abs(t["cost_usd"] - 0.0022) < 1e-12 and abs(t["cloud_cost_usd"] - 0.002) < 1e-12
    assert abs(t["all_cloud_cost_usd"] - 0.006) < 1e-12 and abs(t["saving_usd"] - 0.0038) < 1e-12
    assert [s["session"] for s in led.sessions("r")] == ["a", "b"]
    assert led.totals()["subtasks"] == 4
    led.close()


def test_committed_rows_are_visible_to_another_connection_at_once(tmp_path):
    """Answer-after-commit: the row is in the file when record returns; the default: once flushed."""
    path = tmp_path / "l.sqlite"
    led = Ledger(path, durability="commit")
    led.record(row())
    other = sqlite3.connect(path)
    assert other.execute("SELECT COUNT(*) FROM subtasks").fetchone()[0] == 1
    led.close()
    led = Ledger(path)
    led.record(row())
    led.flush()
    assert other.execute("SELECT COUNT(*) FROM subtasks").fetchone()[0] == 2
    other.close()
    led.close()


def test_a_clean_shutdown_loses_no_queued_row_and_ids_are_the_rows_ids(tmp_path):
    """The writer's queue is drained by close(): every id record returned is a row in the file,
    and a reopened ledger goes on numbering after them."""
    path = tmp_path / "l.sqlite"
    led = Ledger(path)
    ids = [led.record(row(step=i), [("ok", 0.1)] if i % 2 else None) for i in range(500)]
    led.close()
    led = Ledger(path)
    assert [r["id"] for r in led.rows()] == ids == list(range(1, 501))
    assert [r["step"] for r in led.rows()] == list(range(500)) and len(led.attempts()) == 250
    assert led.record(row()) == 501
    led.close()
    other = sqlite3.connect(path)
    assert other.execute("SELECT COUNT(*) FROM subtasks").fetchone()[0] == 501
    other.close()


def test_a_ledger_nobody_closed_is_drained_at_interpreter_exit(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "l.sqlite"
    code = ("from hera_core.routing.ledger import Ledger, LedgerRow\n"
            f"led = Ledger({str(path)!r})\n"
            "for i in range(200):\n"
            "    led.record(LedgerRow('r', 's', i, 'cloud', 'm', 1, 1, 0, 0.1, 0.0, 0.0, None, None, 'x'))\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    other = sqlite3.connect(path)
    assert other.execute("SELECT COUNT(*) FROM subtasks").fetchone()[0] == 200
    other.close()


def test_an_unknown_durability_is_refused(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="durability"):
        Ledger(tmp_path / "l.sqlite", durability="sometimes")


def test_rows_name_the_predictor_version_and_old_ledgers_gain_the_column(tmp_path):
    import sqlite3

    from hera_core.routing.ledger import SCHEMA

    path = tmp_path / "old.sqlite"
    old_schema = "\n".join(line for line in SCHEMA.replace("DEFAULT 'ok',", "DEFAULT 'ok'").splitlines()
                           if "predictor_version" not in line)
    assert "predictor_version" not in old_schema
    with sqlite3.connect(path) as db:
        db.executescript(old_schema)
        db.execute("INSERT INTO subtasks (ts, run, session, step, route, model, prompt_tokens, completion_tokens, "
                   "cached_tokens, latency_s, cost_usd, cloud_cost_usd, reason) "
                   "VALUES (1, 'r', 's', 0, 'cloud', 'm', 1, 1, 0, 0.1, 0.0, 0.0, 'old row')")
    ledger = Ledger(path)
    ledger.record(LedgerRow(run="r", session="s", step=1, route="local", model="m", prompt_tokens=1,
                            completion_tokens=1, cached_tokens=0, latency_s=0.1, cost_usd=0.0, cloud_cost_usd=0.0,
                            p_local=0.9, threshold=0.6, reason="predictor", predictor_version="v3"))
    assert [r["predictor_version"] for r in ledger.rows("r")] == [None, "v3"]
    ledger.close()


def test_kill_9_keeps_every_flushed_row_and_no_half_row(tmp_path):
    """The default durability's promise to a killed process: the rows committed (every row recorded
    before a flush() returned, or a writer turn ended) are in the file, whole; only the rows still
    queued, the last writer turn's, can be lost."""
    import subprocess
    import sys

    path = tmp_path / "l.sqlite"
    code = ("import os, signal\n"
            "from hera_core.routing.ledger import Ledger, LedgerRow\n"
            f"led = Ledger({str(path)!r})\n"
            "row = lambda i: LedgerRow('r', 's', i, 'cloud', 'm', 1, 1, 0, 0.1, 0.0, 0.0, None, None, 'x')\n"
            "for i in range(100):\n"
            "    led.record(row(i), [('ok', 0.1)])\n"
            "led.flush()\n"
            "for i in range(100, 300):\n"
            "    led.record(row(i))\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -9
    other = sqlite3.connect(path)  # reopening replays the WAL
    assert other.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    steps = [r[0] for r in other.execute("SELECT step FROM subtasks ORDER BY id")]
    assert steps[:100] == list(range(100)) and steps == list(range(len(steps)))  # a prefix, none skipped
    assert other.execute("SELECT COUNT(*) FROM cloud_attempts").fetchone()[0] == 100
    other.close()


def test_the_answered_steps_row_is_the_row_booker_write_makes(tmp_path):
    """Booker.answered books its row as values in COLUMNS order (the per-step fast path): the row is
    exactly the one Booker.write makes of the same step, in the SQLite ledger and through the
    protocol's default record_values (a LedgerRow, as PostgreSQL's ledger takes it)."""
    from hera_core.backends.base import Generation
    from hera_core.config import PriceSettings
    from hera_core.routing.booking import Booker
    from hera_core.routing.ledger import COLUMNS, CostLedger
    from hera_core.routing.policy import Decision, Route
    from hera_core.routing.step import StepRequest, StepRun

    class Rows(CostLedger):  # takes LedgerRows, as PgLedger does
        remote = False

        def __init__(self):
            self.booked = []

        def record(self, row, attempts=None):
            self.booked.append((row, list(attempts or [])))
            return len(self.booked)

    assert COLUMNS == tuple(LedgerRow.__dataclass_fields__)
    gen = Generation(text="x", prompt_tokens=48, completion_tokens=12, latency_s=5.0, ttft_s=0.1,
                     finish_reason="stop", model="qwen", cached_tokens=16)
    st = StepRun(StepRequest([{"role": "user", "content": "hi"}], "s1", run="label"), max_tokens=64, toolset=None)
    st.decision = Decision(Route.CLOUD, "predictor", 0.42, 0.6)
    attempts = [("ok", 0.5)]

    def compare(ledger, read):
        booker = Booker(ledger, PriceSettings(), None, "default", lambda: "v1")
        booker.answered(st, gen, 0.003, 0.003, attempts)
        booker.write(st.where, st.decision, gen, attempts, latency_s=5.0, cost_usd=0.003, cloud_cost_usd=0.003)
        fast, slow = read(ledger)
        assert {k: v for k, v in fast.items() if k not in ("id", "ts")} == \
            {k: v for k, v in slow.items() if k not in ("id", "ts")}
        assert fast["ts"] > 0 and fast["route"] == "cloud" and fast["predictor_version"] == "v1"
        return fast

    sqlite_row = compare(Ledger(tmp_path / "l.sqlite"), lambda ledger: ledger.rows())
    assert len(Ledger(tmp_path / "l.sqlite").attempts()) == 2
    memory_row = compare(Rows(), lambda ledger: [{c: getattr(r, c) for c in COLUMNS} for r, _ in ledger.booked])
    assert {k: v for k, v in sqlite_row.items() if k not in ("id", "ts")} == \
        {k: v for k, v in memory_row.items() if k != "ts"}
