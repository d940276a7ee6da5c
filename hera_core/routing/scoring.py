"""Score batching: the features and the predictor over the prefills that come back together.

Steps whose prefills the engine evaluated in one batch resume in the same event-loop turn; their
logits rows are scored together at the next turn: their logit features, feature rows and the
predictor in one call (`Predictor.score_logits`: one native call, the rows read where they lie,
never copied into one batch).

A step that finds no batch open and nothing else ready to run in this loop turn is scored in place:
no step could join its batch, so waiting a turn would only add the turn (two event-loop iterations
and a future, ~10 us at one client). Whether anything else is ready is read from the loop's ready
queue (asyncio's `_ready`); a loop without one (uvloop) always batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

RowsScorer = Callable[[list[np.ndarray], list[list[float]]], tuple[np.ndarray, np.ndarray]]


class ScoreBatcher:
    """P(local) and the feature row of each step, computed in batches (see the module doc)."""

    def __init__(self, score_rows: RowsScorer) -> None:
        # (logits rows [vocab] each, structure features per step) -> (P(local) [n], feature rows [n, k]):
        # `Predictor.score_logits`, which computes the logit features of each row (one native call).
        self.score_rows = score_rows
        # Steps waiting for the next flush, per event loop: (logits row [vocab], structure features, future).
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[np.ndarray, list[float], asyncio.Future]]] = {}
        self._stats = {"batches": 0, "rows": 0}  # flushes that scored something, and the steps they scored

    @property
    def stats(self) -> dict[str, int]:
        """A copy of {"batches": flushes that scored steps, "rows": steps scored}."""
        return dict(self._stats)

    async def score(self, logits: np.ndarray, structure: list[float]) -> tuple[float, np.ndarray]:
        """(P(local), the feature row [1, n]) of one step."""
        scored = self.now(logits, structure)
        return scored if scored is not None else await self.join(logits, structure)

    def join(self, logits: np.ndarray, structure: list[float]) -> "asyncio.Future[tuple[float, np.ndarray]]":
        """The step's place in the batch of this loop turn (for a step `now` did not score): await it."""
        loop = asyncio.get_running_loop()
        pending = self._pending.get(loop)
        fut = loop.create_future()
        if pending is None:
            pending = self._pending[loop] = []
            loop.call_soon(self._flush, loop)
        pending.append((logits, structure, fut))
        return fut

    def now(self, logits: np.ndarray, structure: list[float]) -> tuple[float, np.ndarray] | None:
        """`score` in place, for a step that is alone (no batch open, nothing else ready to run in
        this loop turn); None: other steps may join its batch (then await `join`)."""
        loop = asyncio.get_running_loop()
        if loop in self._pending or getattr(loop, "_ready", True):
            return None
        P, X = self._score_rows([logits], [structure])
        return float(P[0]), X

    def _score_rows(self, rows: list[np.ndarray], structure: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
        P, X = self.score_rows(rows, structure)
        self._stats["batches"] += 1
        self._stats["rows"] += len(structure)
        return P, X

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._pending.pop(loop, [])
        live = [b for b in batch if not b[2].done()]  # a cancelled step needs no score
        if not live:
            return
        try:
            P, X = self._score_rows([lg for lg, _, _ in live], [st for _, st, _ in live])
        except Exception as exc:  # noqa: BLE001 - every step of the batch hears why
            for _, _, fut in live:
                fut.set_exception(exc)
            return
        for i, (_, _, fut) in enumerate(live):
            fut.set_result((float(P[i]), X[i:i + 1]))
