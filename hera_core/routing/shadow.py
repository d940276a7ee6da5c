"""The learning loop beside a running Runtime: shadow drafts of cloud-routed steps and audits of
steps kept local (docs/learning.md).

- Shadow draft: when a step is routed to the cloud, the SLM drafts the same step on the device,
  beside the cloud call, whenever no client step is using the SLM (one shadow decodes at a time,
  at most `max_pending` wait); a client step that needs the SLM cancels the decoding shadow first
  (a shadow never keeps a client waiting longer than the engine's current decode chunk), which
  starts over once the SLM is idle again. Once both answers are in, the pair goes to the trace
  store and is labelled, on a worker thread.
- Audit: a step kept local by a learned predictor is, with probability `audit_share`, also sent to
  the cloud after it was answered; the pair is labelled and counts for (or against) the version
  that kept it local. The cloud call is booked in the ledger (status 'audit').
- Whatever a label triggers (a retrained version, a rollback) is swapped into the runtime by
  `on_swap`, on the event loop, between requests.

No client request ever waits for any of this: every task runs in the background, and its failure
is logged and counted, never raised to a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any


from hera_core.backends.base import Engine, Generation
from hera_core.routing.learning import LearnEvent, LiveLearner, trace_row
from hera_core.routing.predictor import Predictor
from hera_core.routing.step import StepRun

log = logging.getLogger(__name__)
IDLE_POLL_S = 0.01  # how often a waiting shadow looks whether the SLM is idle


class TrafficLearning:
    def __init__(self, learner: LiveLearner, local: Engine, cloud: Engine,
                 on_swap: Callable[[Predictor, str], None], *, max_pending: int = 8, retries: int = 2,
                 book: Callable[..., Any] | None = None) -> None:
        self.learner = learner
        self.local, self.cloud = local, cloud
        self.on_swap = on_swap  # (predictor, why) -> None: the runtime starts using it
        # (kind, session, step, generation, latency_s, version) -> None: the ledger row of a shadow
        # draft's device time (kind "shadow") or of an audit's cloud call ("audit"), naming the version
        # that routed the step
        self.book = book
        self.max_pending = max_pending  # shadows waiting or decoding; past it a cloud step gets none
        self.retries = retries  # times a shadow cancelled by a client step starts over once the SLM is idle
        self._shadows: set[asyncio.Task] = set()  # shadows not finished (waiting for the SLM, or decoding)
        self._decoding: set[asyncio.Task] = set()  # the SLM generation of the one shadow decoding now
        self._background: set[asyncio.Task] = set()  # labelling and audit tasks
        self._clients = 0  # client steps using the SLM now
        self.stats: Counter[str] = Counter()

    # -- client steps on the SLM come first ----------------------------------------------------

    @contextlib.contextmanager
    def client_on_slm(self):
        """Around a client step's use of the SLM (its prefill, draft or answer): a shadow decoding
        now is cancelled (it starts over once the SLM is idle again), and none starts until the
        client step is done."""
        self._clients += 1
        for task in list(self._decoding):
            if task.cancel():
                self.stats["shadow_cancelled"] += 1
        try:
            yield
        finally:
            self._clients -= 1

    # -- shadow drafts -------------------------------------------------------------------------

    def start_shadow(self, messages: list[dict[str, Any]], *, max_tokens: int, stop: list[str] | None,
                     toolset: Any = None) -> asyncio.Task | None:
        """The SLM's draft of a cloud-routed step: decoded as soon as no client step uses the SLM
        (one shadow at a time); None when `max_pending` shadows are already waiting."""
        if len(self._shadows) >= self.max_pending:
            self.stats["shadow_skipped_busy"] += 1
            return None
        kwargs = {"toolset": toolset} if toolset is not None else {}
        task = asyncio.create_task(self._shadow(messages, max_tokens, stop, kwargs))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)
        self.stats["shadow_started"] += 1
        return task

    async def _shadow(self, messages, max_tokens, stop, kwargs) -> Generation | None:
        """Wait until the SLM is idle, decode; when a client step cancels the decode, wait and start
        over (at most `retries` times). None: given up."""
        for _ in range(1 + self.retries):
            while self._clients or self._decoding:
                await asyncio.sleep(IDLE_POLL_S)
            decode = asyncio.create_task(self.local.generate(messages, max_tokens=max_tokens, stop=stop, **kwargs))
            self._decoding.add(decode)
            decode.add_done_callback(self._decoding.discard)
            self.stats["shadow_decodes"] += 1
            try:
                return await decode
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # this shadow itself is cancelled (shutdown)
                    decode.cancel()
                    raise
        self.stats["shadow_given_up"] += 1
        return None

    def finish_shadow(self, shadow: asyncio.Future, st: StepRun, *, version: str, cloud: Generation) -> None:
        """The cloud answered step `st`: once the shadow is done too, trace and label the pair
        (background). `shadow` is a task of `start_shadow` (its device time is booked here) or a
        finished future holding a draft the step already made and booked (drafted, then escalated)."""
        self._spawn(self._shadow_pair(shadow, st, version, cloud))

    async def _shadow_pair(self, shadow, st: StepRun, version: str, cloud: Generation) -> None:
        try:
            draft: Generation | None = await shadow
        except asyncio.CancelledError:
            if not shadow.cancelled():  # this task itself is being cancelled (shutdown)
                raise
            return
        if draft is None:
            return
        if isinstance(shadow, asyncio.Task) and self.book is not None:
            self.book("shadow", st.session, st.step, draft, draft.latency_s, version)
        row = trace_row("shadow", session=st.session, step=st.step, messages=st.messages, features=st.features,
                        version=version, cloud=(cloud.text, cloud.tool_calls or None),
                        draft=(draft.text, draft.tool_calls or None))
        self.stats["shadow_done"] += 1
        await self._add(row)

    # -- audits --------------------------------------------------------------------------------

    def maybe_audit(self, st: StepRun, *, version: str, local: Generation, toolset: Any = None) -> bool:
        """After step `st`, which a learned predictor kept local (answer `local`): with the audit
        share, ask the cloud too (with `toolset`, the tools the client offered)."""
        if not self.learner.should_audit():
            return False
        self.stats["audits_started"] += 1
        self._spawn(self._audit(st, version, local, toolset))
        return True

    async def _audit(self, st: StepRun, version: str, local: Generation, toolset) -> None:
        kwargs = {"toolset": toolset} if toolset is not None else {}
        t0 = time.perf_counter()
        cloud = await self.cloud.generate(st.messages, max_tokens=st.max_tokens, stop=st.req.stop, **kwargs)
        if self.book is not None:
            self.book("audit", st.session, st.step, cloud, time.perf_counter() - t0, version)
        row = trace_row("audit", session=st.session, step=st.step, messages=st.messages, features=st.features,
                        version=version, cloud=(cloud.text, cloud.tool_calls or None),
                        draft=(local.text, local.tool_calls or None))
        self.stats["audits_done"] += 1
        await self._add(row)

    # -- labels and what they trigger ------------------------------------------------------------

    async def _add(self, row) -> None:
        event: LearnEvent | None = await asyncio.to_thread(self.learner.add, row)
        self.stats["labelled"] += 1
        if event is not None:
            log.warning("learning: now using predictor %s (%s)", event.version, event.reason)
            self.stats["swaps"] += 1
            self.on_swap(event.predictor, event.reason)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.stats["errors"] += 1
            log.error("learning: a background task failed: %r", task.exception())

    async def drain(self) -> None:
        """Wait for every pending shadow pair and audit (tests, shutdown that keeps the labels)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._shadows) + list(self._background):
            task.cancel()
        await asyncio.gather(*self._shadows, *self._background, return_exceptions=True)
        self.learner.close()

    def status(self) -> dict[str, Any]:
        return {**self.learner.status(), "stats": dict(self.stats)}
