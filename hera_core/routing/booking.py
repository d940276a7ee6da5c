"""Booking: every call the runtime makes becomes one ledger row, and cloud spend is held against the
budget until its row is written.

One `Booker` per runtime builds the rows (a routed step, a failure, a cancellation, a pass-through,
a learning-loop call) and runs ledger and budget calls where they belong: inline for the SQLite
ledger (microseconds), on a worker thread for a ledger over the network (PostgreSQL), so database
round trips, and an outage's connect timeouts, never hold up the event loop's other steps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from hera_core.backends.base import Generation
from hera_core.config import PriceSettings
from hera_core.errors import BudgetExceededError, CloudError
from hera_core.routing.budget import Budget
from hera_core.routing.ledger import Ledger, LedgerRow
from hera_core.routing.policy import Decision, Route
from hera_core.routing.step import StepRun


def budget_message(exceeded: str) -> str:
    if exceeded == "unchecked":
        return "the cloud budget cannot be checked (the shared ledger's database is unreachable)"
    return f"the {exceeded} cloud budget is spent"


class Booker:
    def __init__(self, ledger: Ledger, prices: PriceSettings, budget: Budget | None, run: str,
                 version: Callable[[], str]) -> None:
        self.ledger = ledger
        self.prices = prices
        self.budget = budget  # cloud spend caps; None = unlimited
        self.run = run  # ledger label of the runtime's rows
        self.version = version  # the name of the predictor deciding now
        # A database over the network (CostLedger.remote, PgLedger): bookings off the event loop. No
        # ledger: a runtime that only plans steps (tests/test_plan.py).
        self.remote = ledger is not None and ledger.remote

    async def io(self, fn, *args, **kwargs):
        """Run a booking or budget call inline (SQLite) or on a worker thread (a remote ledger)."""
        if self.remote:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    def write(self, where: tuple[str | None, str, int], decision: Decision | None, gen: Generation | None,
              attempts: list | tuple = (), *, latency_s: float = 0.0, cost_usd: float = 0.0,
              cloud_cost_usd: float = 0.0, **fields) -> int:
        """The one place a ledger row is built: at `where` (run, session, step), from the step's
        decision and answer (either may be None), `fields` overriding LedgerRow's own (status,
        route, model, ...)."""
        run, session, step = where
        if decision is not None:
            route, reason, version = decision.route.value, decision.reason, self.version()
            p_local, threshold = decision.p_local, decision.threshold
        else:
            route, p_local, threshold, reason, version = "cloud", None, None, "", None
        if gen is not None:
            model, prompt, completion, cached = gen.model, gen.prompt_tokens, gen.completion_tokens, gen.cached_tokens
        else:
            model, prompt, completion, cached = "", 0, 0, 0
        row = LedgerRow(run=run or self.run, session=session, step=step, route=route, model=model,
                        prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
                        latency_s=latency_s, cost_usd=cost_usd, cloud_cost_usd=cloud_cost_usd, p_local=p_local,
                        threshold=threshold, reason=reason, predictor_version=version)
        for name, value in fields.items():
            setattr(row, name, value)
        return self.ledger.record(row, attempts)

    # --- a routed step ------------------------------------------------------------------------------
    def answered(self, st: StepRun, gen: Generation, cost: float, cloud_cost: float, attempts) -> int:
        """The answered step's row, then its budget holds settled (after the row: a shared budget
        never sees spend that was neither held nor booked)."""
        # (the row as its values in COLUMNS order, which `write` would make of the same arguments:
        # the one booking every step makes, without the LedgerRow; tests/test_ledger.py checks they agree)
        req, d = st.req, st.decision
        row_id = self.ledger.record_values(
            (req.run or self.run, req.session, req.step, d.route.value, gen.model, gen.prompt_tokens,
             gen.completion_tokens, gen.cached_tokens, max(st.elapsed(), gen.latency_s), cost, cloud_cost,
             d.p_local, d.threshold, d.reason, "ok", time.time(), self.version()), attempts)
        for h in st.hold:
            self.budget.settle(st.session, h, cloud_cost if st.decision.route is Route.CLOUD else 0.0)
        return row_id

    def release(self, st: StepRun) -> None:
        """The step failed or was cancelled: nothing was spent on the cloud that the ledger knows of."""
        for h in st.hold:
            self.budget.settle(st.session, h, 0.0)

    def cancelled(self, st: StepRun, decision: Decision, model: str) -> None:
        """A subtask cancelled while generating (its client disconnected) is a row with status
        'cancelled': a local one costs the energy of the time it ran; a cloud one is booked at 0
        (what the provider bills for a request closed mid-answer is not known here)."""
        elapsed = st.elapsed()
        self.write(st.where, decision, None, model=model, latency_s=elapsed, status="cancelled",
                   cost_usd=self.prices.local_cost(elapsed) if decision.route is Route.LOCAL else 0.0)

    def failed(self, st: StepRun, exc: Exception, model: str, gen: Generation | None = None) -> None:
        """A failed call is a ledger row too (status = the error class): a cloud call's costs 0 (the
        attempts are kept); a local answer that may not be returned (a structured answer that does
        not validate) costs the device time it took."""
        elapsed = st.elapsed()
        if isinstance(exc, CloudError):
            self.write(st.where, st.decision, None, exc.attempts, model=model, latency_s=elapsed, route="cloud",
                       status=type(exc).__name__)
        else:
            self.write(st.where, st.decision, gen, model=model, latency_s=elapsed, status=type(exc).__name__,
                       cost_usd=self.prices.local_cost(elapsed))

    def reserve(self, st: StepRun) -> str | None:
        """Ask the budget for a cloud call of at most this step's price (its prompt, estimated at 4
        characters a token, and max_tokens): the cap that is spent, or None with the hold added."""
        chars = sum(len(m["content"]) for m in st.messages if isinstance(m.get("content"), str))
        exceeded, h = self.budget.reserve(st.session, self.prices.cloud_cost(chars // 4 + 1, st.max_tokens))
        if exceeded is None:
            st.hold.append(h)
        return exceeded

    # --- calls that are no client's routed step -----------------------------------------------------
    def learning_call(self, kind: str, session: str, step: int, gen: Generation, latency_s: float,
                      version: str | None = None) -> None:
        """The row of a learning-loop call (status 'shadow': the SLM's device time on a shadow
        draft; 'audit': the cloud call of an audited local step): real spend, never a client's step."""
        audit = kind == "audit"
        cost = self.prices.cloud_cost(gen.prompt_tokens, gen.completion_tokens) if audit else \
            self.prices.local_cost(latency_s)
        self.write((None, session, step), None, gen, latency_s=latency_s, cost_usd=cost,
                   cloud_cost_usd=cost if audit else 0.0, status=kind, reason=kind,
                   route=(Route.CLOUD if audit else Route.LOCAL).value, predictor_version=version)

    def check_passthrough(self, session: str) -> None:
        exceeded = self.budget.exceeded(session) if self.budget is not None else None
        if exceeded is not None:  # a named cloud model cannot move to the SLM: refused whatever the action
            raise BudgetExceededError(budget_message(exceeded) + "; the pass-through request was refused "
                                      "(raise the cap)")

    def passthrough(self, where: tuple[str | None, str, int], model: str, usage: dict[str, Any], elapsed: float,
                    attempts=(), status: str = "ok") -> float:
        """A pass-through request's row, its cost added to the budget: the cost."""
        pt, ct = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        cost = self.prices.cloud_cost(pt, ct)
        gen = Generation(text="", prompt_tokens=pt, completion_tokens=ct, latency_s=elapsed, ttft_s=elapsed,
                         finish_reason="stop", model=model)
        self.write(where, None, gen, attempts, latency_s=elapsed, cost_usd=cost, cloud_cost_usd=cost,
                   reason="passthrough", status=status)
        if self.budget is not None:
            self.budget.add(where[1], cost)
        return cost

