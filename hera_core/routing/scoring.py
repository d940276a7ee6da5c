"""Score batching: the features and the predictor over the prefills that come back together.

Steps whose prefills the engine evaluated in one batch resume in the same event-loop turn; their
logits rows are scored at the next turn, their features row by row (each row viewed as [1, vocab]:
copying the rows into one batch costs more than it saves on a CPU) and the predictor in one call.

A step that finds no batch open and nothing else ready to run in this loop turn is scored in place:
no step could join its batch, so waiting a turn would only add the turn (two event-loop iterations
and a future, ~10 us at one client). Whether anything else is ready is read from the loop's ready
queue (asyncio's `_ready`); a loop without one (uvloop) always batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from hera_core.native.features import logit_features
from hera_core.routing.predictor import feature_matrix


class ScoreBatcher:
    """P(local) and the feature row of each step, computed in batches (see the module doc)."""

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray]) -> None:
        self.predict = predict  # feature rows [n, k] -> P(local) [n]
        # Steps waiting for the next flush, per event loop: (logits row [vocab], structure features, future).
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[np.ndarray, list[float], asyncio.Future]]] = {}
        self._stats = {"batches": 0, "rows": 0}  # flushes that scored something, and the steps they scored

    @property
    def stats(self) -> dict[str, int]:
        """A copy of {"batches": flushes that scored steps, "rows": steps scored}."""
        return dict(self._stats)

    async def score(self, logits: np.ndarray, structure: list[float]) -> tuple[float, np.ndarray]:
        """(P(local), the feature row [1, n]) of one step."""
        loop = asyncio.get_running_loop()
        pending = self._pending.get(loop)
        if pending is None and not getattr(loop, "_ready", True):  # alone: scored in place
            P, X = self._score_rows([logits], [structure])
            return float(P[0]), X
        fut = loop.create_future()
        if pending is None:
            pending = self._pending[loop] = []
            loop.call_soon(self._flush, loop)
        pending.append((logits, structure, fut))
        return await fut

    def _score_rows(self, rows: list[np.ndarray], structure: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
        # The features row by row, each logits row viewed as [1, vocab]: stacking the rows into one
        # batch would copy 594 KiB a row (a vocabulary of 151,936), more than one call a row costs.
        feats = [logit_features(lg.reshape(1, -1)) for lg in rows]
        X = feature_matrix(feats[0] if len(feats) == 1 else np.concatenate(feats), structure)
        P = self.predict(X)
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
