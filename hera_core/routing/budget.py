"""Cloud spend caps per session and per UTC day.

Spend is kept in memory for the hot path and seeded from the ledger at start, so a restart does
not reset a day's cap. A cap applies once the spend has reached it: the step that crosses it still
completes (its cost is only known afterwards). The day is the UTC day of `clock` (unix seconds;
tests pass a fake one to cross midnight without waiting).
"""

from __future__ import annotations

import calendar
import threading
import time
from collections.abc import Callable
from typing import Literal

from hera_core.routing.ledger import CostLedger


def _utc_day(ts: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


class Budget:
    def __init__(self, *, per_session_usd: float | None = None, per_day_usd: float | None = None,
                 action: Literal["local", "refuse"] = "local", ledger: CostLedger | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if action not in ("local", "refuse"):
            raise ValueError(f"budget action must be 'local' or 'refuse', got {action!r}")
        self.per_session_usd = per_session_usd
        self.per_day_usd = per_day_usd
        self.action = action  # past a cap: run the step on the SLM, or refuse it (HTTP 429)
        self._lock = threading.Lock()
        self._clock = clock
        self._day = _utc_day(clock())
        self._day_spend = 0.0  # USD spent on the cloud today (UTC)
        self._session_spend: dict[str, float] = {}  # USD spent on the cloud per session, all time
        if ledger is not None:
            self._seed(ledger)

    def _seed(self, ledger: CostLedger) -> None:
        day_start = calendar.timegm(time.strptime(self._day, "%Y-%m-%d"))
        for session, total, today in ledger.cloud_spend(since=day_start):
            self._session_spend[session] = total
            self._day_spend += today

    def exceeded(self, session: str) -> str | None:
        """'session' or 'daily' when that cap is spent, else None."""
        with self._lock:
            self._roll()
            if self.per_day_usd is not None and self._day_spend >= self.per_day_usd:
                return "daily"
            if self.per_session_usd is not None and self._session_spend.get(session, 0.0) >= self.per_session_usd:
                return "session"
            return None

    def reserve(self, session: str, usd: float) -> tuple[str | None, object]:
        """Before a cloud call of at most `usd`: (the cap that is spent, or None; a hold to settle).
        Per node, nothing needs holding: the check is the cap."""
        return self.exceeded(session), None

    def settle(self, session: str, hold: object, usd: float) -> None:
        """After the call: what it cost (0 when it did not happen)."""
        if usd:
            self.add(session, usd)

    def add(self, session: str, usd: float) -> None:
        with self._lock:
            self._roll()
            self._day_spend += usd
            self._session_spend[session] = self._session_spend.get(session, 0.0) + usd

    def _roll(self) -> None:
        day = _utc_day(self._clock())
        if day != self._day:
            self._day, self._day_spend = day, 0.0
