"""Drafting and voting: the SLM answers a step on the device, its draft is checked there and, where
the plan asks, voted on by samples; the plan's `decide_after_draft` then keeps it or escalates it.

A drafted step's checks (`hera_core.checks.drafts`): its program runs in the sandbox, its answer
parses, the prompt's examples pass. A vote: k samples (temperature 0.7, seeded by the prompt,
sharing its KV) answer the same step; FIRST_VOTES are drawn first, alongside the draft so that they
decode in the same batch (bench/test_votes.py measures it), the rest only if those disagree.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import zlib
from collections.abc import Callable

from hera_core.backends.base import Engine, Generation, Message
from hera_core.backends.structured import answer_from_call, is_answer_toolset
from hera_core.checks.drafts import FIRST_VOTES, DraftCheck, agreement, check_draft, votable, vote_key
from hera_core.errors import InvalidRequestError
from hera_core.routing.plan import Action, DraftOutcome, decide_after_draft, samples_wanted, vote_key_wanted
from hera_core.routing.policy import Decision
from hera_core.routing.predictor import Predictor
from hera_core.routing.step import StepRun, with_usage_of_all


def vote_seed(messages: list[Message]) -> int:
    return zlib.crc32(json.dumps(messages, sort_keys=True, default=str).encode())


class Drafter:
    def __init__(self, local: Engine, check_timeout_s: float = 5.0) -> None:
        self.local = local
        self.check_timeout_s = check_timeout_s  # limit for running a draft's program
        self.concurrently = True  # a vote step's draft and first samples decode together (False: in turn)

    async def answer(self, st: StepRun, on_text: Callable[[str], None] | None) -> Generation:
        """The SLM's one answer to the step. With tools offered, or a structured answer, it is not
        streamed while it decodes: one that turns out invalid must be escalable without the client
        having seen any of it. The engine is asked the step's extras (a response format's grammar,
        logprobs)."""
        if st.toolset is None:
            return await self.local.generate(st.messages, max_tokens=st.max_tokens, stop=st.req.stop,
                                             **st.engine_extra, on_text=None if st.structured_on_slm else on_text)
        gen = await self.local.generate(st.messages, max_tokens=st.max_tokens, stop=st.req.stop, toolset=st.toolset,
                                        **st.engine_extra)
        return answer_from_call(gen) if is_answer_toolset(st.toolset) else gen

    async def sampled(self, engine: Engine, st: StepRun) -> tuple[Generation, list[Generation]]:
        """The request's `samples` answers on `engine` with its `sampling`, and the first of them
        carrying the usage of all (what the ledger books)."""
        gens = await engine.generate_samples(st.messages, st.req.samples, max_tokens=st.max_tokens,
                                             stop=st.req.stop, **(st.req.sampling or {}))
        return with_usage_of_all(gens), gens

    async def draft(self, st: StepRun, predictor: Predictor) -> tuple[Generation, DraftCheck, Decision]:
        """Execute a DRAFT or VOTE plan: the SLM's draft of the step (decoding on from the prefill
        that scored it), its checks, the draft stage's verdict (`predictor`'s) or the samples' vote
        as the plan asks, and the decision (`decide_after_draft`): (the draft or the samples'
        majority answer, its checks, the decision)."""
        samples = None  # the vote's first samples, drawn alongside the draft
        if st.plan.action is Action.VOTE and st.toolset is None and self.concurrently:
            samples = asyncio.ensure_future(self._samples(st, min(FIRST_VOTES, st.plan.votes_k), 0))
            samples.add_done_callback(lambda t: t.cancelled() or t.exception())  # a failure is read, never left unread
        try:
            draft = await self.answer(st, None)
            return await self._check_and_vote(st, predictor, draft, samples)
        finally:
            if samples is not None and not samples.done():
                samples.cancel()  # not voted on (the draft failed, or is free text): not waited for

    async def _check_and_vote(self, st: StepRun, predictor: Predictor, draft: Generation,
                              samples: asyncio.Future | None) -> tuple[Generation, DraftCheck, Decision]:
        plan = st.plan
        check = await asyncio.to_thread(check_draft, st.messages, draft.text, completion_tokens=draft.completion_tokens,
                                        token_logprobs=draft.extra.get("token_logprobs"),
                                        timeout_s=self.check_timeout_s)
        row = st.features[None, :] if st.features is not None else None
        outcome = DraftOutcome(check.passed, tool_calls=bool(draft.tool_calls), tool_errors=bool(draft.tool_errors),
                               stage_keep=predictor.keep_draft(row, check, st.messages, st.req.toolset is not None)[0]
                               if plan.draft_stage_decides else None)
        draft_key = None
        if vote_key_wanted(plan, outcome):
            draft_key = await asyncio.to_thread(vote_key, draft.text, self.check_timeout_s)
            outcome = dataclasses.replace(outcome, votable=votable(draft_key))
        k = samples_wanted(plan, outcome)
        if k:
            first = await samples if samples is not None else None
            check.agreement, chosen = await self._vote(st, draft, k, draft_key, first)
            if check.agreement is not None:
                draft = chosen  # the majority answer (the draft itself unless others outvote it)
            outcome = dataclasses.replace(outcome, agreement=check.agreement)
        return draft, check, decide_after_draft(plan, outcome)

    async def _samples(self, st: StepRun, n: int, offset: int) -> list[Generation] | None:
        """n samples of the step (temperature 0.7, sharing the prompt's KV, seeded by the prompt and
        `offset`); None if the engine cannot sample (an engine without sampling, or fewer slots than
        n: the step is then decided without a vote, never failed for it)."""
        try:
            return await self.local.generate_samples(st.messages, n, max_tokens=st.max_tokens, stop=st.req.stop,
                                                     temperature=0.7, seed=vote_seed(st.messages) + offset)
        except InvalidRequestError:  # CannotServeLocallyError among them
            return None

    async def _vote(self, st: StepRun, draft: Generation, k: int, draft_key: str | None,
                    first: list[Generation] | None):
        """k samples vote on the draft's answer: FIRST_VOTES first (`first`: already drawn), the rest
        only if those do not all agree. (Agreement, the answer of the largest group); (None, draft)
        if the engine cannot sample."""
        key_of = functools.partial(vote_key, timeout_s=self.check_timeout_s)
        if draft_key is None:
            draft_key = await asyncio.to_thread(key_of, draft.text)
        gens: list[Generation] = []
        keys: list[str] = []
        for n in (min(FIRST_VOTES, k), k - min(FIRST_VOTES, k)):
            if n == 0 or (keys and all(key == draft_key for key in keys)):
                break  # the first samples agree: stop early
            more = first if first is not None and not gens else await self._samples(st, n, len(gens))
            if more is None:
                return None, draft
            gens += more
            keys += [await asyncio.to_thread(key_of, g.text) for g in more]
        vote = agreement(draft_key, keys)
        if vote.majority == 0 or keys[vote.majority - 1] == "out:(failed)":  # never swap in a failed program
            return vote, draft
        return vote, gens[vote.majority - 1]

