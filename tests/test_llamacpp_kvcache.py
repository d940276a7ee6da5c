"""The llama.cpp engine's slot cache without a model: the KV calls go to a fake that keeps each
sequence's tokens, so every test checks that what the cache believes a slot holds is what the
KV memory holds."""

import numpy as np
import pytest

from hera_core.backends.llamacpp.kvcache import NoFreeSlot, SlotCache, common_prefix
from hera_core.errors import ContextOverflowError

BYTES = 10  # KV bytes per token of the fake model


class FakeKv:
    """Sequences of tokens standing for llama.cpp's KV memory; `evaluate` plays llama_decode."""

    def __init__(self, n_slots: int) -> None:
        self.seqs = [[] for _ in range(n_slots)]
        self.calls = []

    def seq_rm(self, seq, start):
        self.calls.append(("rm", seq, start))
        del self.seqs[seq][start:]

    def seq_cp(self, src, dst, end):
        self.calls.append(("cp", src, dst, end))
        self.seqs[dst] = list(self.seqs[src] if end < 0 else self.seqs[src][:end])

    def evaluate(self, placed):
        """The placed prompt's new tokens go into its sequence; its logits come back."""
        assert self.seqs[placed.slot] == placed.tokens[:placed.reused]
        self.seqs[placed.slot] = list(placed.tokens)
        placed.logits = np.full(4, float(len(placed.tokens)), np.float32)


def make(n_slots=2, n_ctx=64, block=4, budget_bytes=None, unified=False):
    kv = FakeKv(n_slots)
    return SlotCache(kv, n_slots, n_ctx, block, BYTES, budget_bytes, unified), kv


def run_prompt(cache, kv, tokens, reserve=0):
    placed = cache.place(tokens, reserve)
    if placed.logits is None:
        kv.evaluate(placed)
    cache.settle(placed)
    return placed


def assert_consistent(cache, kv):
    cache.check_invariants()
    for i in range(len(cache)):
        assert kv.seqs[i] == cache.slot(i).tokens, i


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


def test_the_next_step_of_a_conversation_continues_its_slot_in_place():
    cache, kv = make()
    first = run_prompt(cache, kv, list(range(10)))
    assert first.reused == 0
    step = run_prompt(cache, kv, list(range(16)))
    assert step.slot == first.slot and step.reused == 10
    assert cache.counts == {"prefill_tokens": 16, "reused_tokens": 10, "seq_copies": 0}
    assert_consistent(cache, kv)


def test_an_exact_repeat_evaluates_nothing_and_gets_the_kept_logits():
    cache, kv = make()
    first = run_prompt(cache, kv, list(range(10)))
    placed = cache.place(list(range(10)))
    assert placed.exact and placed.slot == first.slot and placed.logits is first.logits
    cache.settle(placed)
    assert cache.counts["reused_tokens"] == 10 and cache.counts["prefill_tokens"] == 10
    assert_consistent(cache, kv)


def test_the_whole_prompt_cached_still_evaluates_its_last_token():
    cache, kv = make()
    run_prompt(cache, kv, list(range(10)))
    cache.append(0, [10, 11], None)  # a generation decoded on; the logits are gone
    kv.seqs[0] += [10, 11]
    placed = run_prompt(cache, kv, list(range(10)))
    assert not placed.exact and placed.reused == 9  # the last token again, for its logits
    assert_consistent(cache, kv)


@pytest.mark.parametrize("unified", [False, True])
def test_a_prefix_shared_with_a_busy_slot_is_linked_into_another(unified):
    cache, kv = make(unified=unified)
    system = list(range(100, 112))
    a = run_prompt(cache, kv, system + [1, 2, 3])
    cache.claim(a.slot)  # A generates: its slot may lend its prefix, never be taken over
    b = run_prompt(cache, kv, system + [7, 8])
    assert b.slot != a.slot and b.reused == len(system)
    copy = [c for c in kv.calls if c[0] == "cp"]
    assert copy == [("cp", a.slot, b.slot, len(system) if unified else -1)]
    assert cache.counts["seq_copies"] == 1
    assert_consistent(cache, kv)


def test_every_slot_busy_or_placing_means_no_free_slot():
    cache, kv = make(n_slots=2)
    a = run_prompt(cache, kv, [1, 2, 3])
    cache.claim(a.slot)
    waiting = cache.place([4, 5, 6])  # placed, not yet evaluated: its slot is taken too
    with pytest.raises(NoFreeSlot):
        cache.place([7, 8, 9])
    cache.unplace(waiting)
    cache.place([7, 8, 9])  # the unplaced slot is free again


def test_a_release_frees_the_slot_and_indexes_what_was_decoded():
    cache, kv = make(n_slots=1)
    prompt = list(range(8))
    a = run_prompt(cache, kv, prompt, reserve=8)
    pinned = cache.claim(a.slot)
    cache.append(a.slot, [50, 51, 52, 53], None)
    kv.seqs[a.slot] += [50, 51, 52, 53]
    cache.release(a.slot, len(prompt), pinned)
    assert not cache.slot(a.slot).busy
    follow = run_prompt(cache, kv, prompt + [50, 51, 52, 53, 60])
    assert follow.slot == a.slot and follow.reused == 12
    assert_consistent(cache, kv)


def test_eviction_keeps_the_budget_and_cuts_the_evicted_slots():
    budget = 24 * BYTES  # six blocks of four tokens
    cache, kv = make(n_slots=3, block=4, budget_bytes=budget)
    for start in (0, 100, 200, 300):  # four unrelated prompts of twelve tokens: more than fits
        run_prompt(cache, kv, list(range(start, start + 12)))
        assert cache.bytes_held <= budget
        assert_consistent(cache, kv)
    assert cache.evictions > 0


def test_a_prompt_longer_than_the_context_is_refused_before_any_kv_call():
    cache, kv = make(n_ctx=16)
    with pytest.raises(ContextOverflowError):
        cache.place(list(range(16)))
    assert kv.calls == []


def test_copies_for_samples_hold_the_same_tokens_and_are_claimed():
    cache, kv = make(n_slots=3)
    a = run_prompt(cache, kv, list(range(9)))
    cache.claim(a.slot)
    slot, _ = cache.copy(a.slot)
    assert slot != a.slot and cache.slot(slot).busy and cache.slot(slot).tokens == list(range(9))
    assert_consistent(cache, kv)
    cache.copy(a.slot)
    with pytest.raises(NoFreeSlot):  # all three generate
        cache.copy(a.slot)
