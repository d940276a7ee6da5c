"""Radix index: the native RadixIndex against its pure-Python twin PyRadixIndex (the reference).

A hypothesis state machine applies random operations (small vocabulary, so prefixes collide;
block sizes 1-4; budgets of a few blocks; up to 8 slots) to both and requires identical results,
identical exceptions and identical counters after every step, plus the invariants: the budget is
never exceeded, a pinned block is never evicted, check_invariants() holds on both. With
HERA_NATIVE=0 the machine runs the twin against a second twin, so the invariants are still checked.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hera_core import native
from hera_core.native.radix import PyRadixIndex, RadixIndex

VOCAB = 3  # token ids 0..2: blocks of one to four tokens collide often


def native_cls() -> Any:
    """The native class, or None with HERA_NATIVE=0 (a stale or missing build fails loudly)."""
    if not native.native_enabled():
        return None
    return native.load().RadixIndex


BACKENDS = [pytest.param("native", id="native"), pytest.param("python", id="python")]


def make_index(backend: str, block_size: int = 2, bytes_per_token: int = 1, budget_blocks: int = 8,
               max_slots: int = 8) -> Any:
    """An index of `budget_blocks` blocks; skips the native backend when HERA_NATIVE=0."""
    if backend == "native":
        cls = native_cls()
        if cls is None:
            pytest.skip("HERA_NATIVE=0")
    else:
        cls = PyRadixIndex
    return cls(block_size, bytes_per_token, budget_blocks * block_size * bytes_per_token, max_slots)


def toks(*ids: int) -> np.ndarray:
    return np.array(ids, dtype=np.int32)


def outcome(fn, *args) -> tuple[str, Any]:
    """("ok", result) or ("error", exception type): both sides must give the same."""
    try:
        return "ok", fn(*args)
    except ValueError as exc:  # caller mistakes only: an AssertionError is a bug and propagates
        return "error", type(exc)


# ---------------------------------------------------------------------------------------------
# The state machine


class RadixParity(RuleBasedStateMachine):
    """`ref` is the twin; `impl` is the native index (or a second twin with HERA_NATIVE=0)."""

    @initialize(
        block_size=st.integers(1, 4),
        bytes_per_token=st.integers(1, 3),
        budget_blocks=st.integers(1, 12),
        slack=st.integers(0, 5),
        max_slots=st.integers(1, 8),
    )
    def setup(self, block_size: int, bytes_per_token: int, budget_blocks: int, slack: int, max_slots: int) -> None:
        block_bytes = block_size * bytes_per_token
        budget = budget_blocks * block_bytes + slack % block_bytes  # budgets off a block boundary too
        self.ref = PyRadixIndex(block_size, bytes_per_token, budget, max_slots)
        cls = native_cls() or PyRadixIndex
        self.impl = cls(block_size, bytes_per_token, budget, max_slots)
        self.max_slots = max_slots
        self.bs = block_size
        self.seen: list[tuple[int, ...]] = [()]  # prompts inserted so far: new ones extend them
        self.pins: Counter[tuple[int, ...]] = Counter()  # pinned prefix (whole blocks) -> pins

    # --- inputs -------------------------------------------------------------------------------
    def tokens(self, data: st.DataObject) -> tuple[int, ...]:
        """Most of an inserted prompt plus a few new tokens (agent steps share prefixes)."""
        base = data.draw(st.sampled_from(self.seen), label="base")
        cut = max(0, len(base) - data.draw(st.integers(0, 2 * self.bs), label="cut"))
        tail = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=3 * self.bs), label="tail")
        return base[:cut] + tuple(tail)

    def remember(self, seq: tuple[int, ...]) -> None:
        """Later prompts extend the ones inserted so far."""
        if seq not in self.seen and len(self.seen) < 40:
            self.seen.append(seq)

    def as_arg(self, seq: tuple[int, ...], data: st.DataObject) -> Any:
        """int32 array mostly; a list sometimes (both backends take a sequence of ints too)."""
        return list(seq) if data.draw(st.booleans(), label="as list") else np.array(seq, dtype=np.int32)

    def both(self, name: str, *args: Any) -> tuple[str, Any]:
        got_ref = outcome(getattr(self.ref, name), *args)
        got_impl = outcome(getattr(self.impl, name), *args)
        assert got_impl == got_ref, f"{name}{args}: {type(self.impl).__module__} {got_impl} != twin {got_ref}"
        return got_ref

    def slot(self, data: st.DataObject) -> int:
        """A valid slot mostly; -1 or max_slots (invalid) one time in eight."""
        if data.draw(st.integers(0, 7), label="invalid slot") == 0:
            return data.draw(st.sampled_from([-1, self.max_slots]), label="slot")
        return data.draw(st.integers(0, self.max_slots - 1), label="slot")

    def prefixes(self, seq: tuple[int, ...], n_blocks: int) -> list[tuple[int, ...]]:
        return [seq[:(k + 1) * self.bs] for k in range(n_blocks)]

    # --- rules ---------------------------------------------------------------------------------
    @rule(data=st.data())
    def match(self, data: st.DataObject) -> None:
        seq = self.tokens(data)
        kind, got = self.both("match", self.as_arg(seq, data))
        assert kind == "ok"
        event(f"match: {'hit' if got[0] else 'miss'}")
        matched, holder = got
        assert matched % self.bs == 0 and matched <= len(seq)
        assert (holder == -1) == (matched == 0) and holder < self.max_slots

    @rule(data=st.data())
    def insert(self, data: st.DataObject) -> None:
        seq, slot = self.tokens(data), self.slot(data)
        self.remember(seq)
        kind, got = self.both("insert", self.as_arg(seq, data), slot)
        assert kind == "ok" or not 0 <= slot < self.max_slots or self.pins
        event(f"insert: {kind}, {'evicted' if kind == 'ok' and got else 'nothing evicted'}")
        if kind == "ok":
            self.check_evicted(got)

    @rule(data=st.data())
    def agent_step(self, data: st.DataObject) -> None:
        """What the engine does per prompt: match, then record the prompt in a slot."""
        seq = self.tokens(data)
        assert self.both("match", self.as_arg(seq, data))[0] == "ok"
        slot = data.draw(st.integers(0, self.max_slots - 1), label="slot")
        self.remember(seq)
        kind, got = self.both("insert", self.as_arg(seq, data), slot)
        if kind == "ok":
            self.check_evicted(got)

    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        slot = self.slot(data)
        n_tokens = data.draw(st.integers(0, 4 * self.bs), label="n_tokens")
        if data.draw(st.integers(0, 7), label="negative") == 0:
            n_tokens = -1
        kind, _ = self.both("truncate", slot, n_tokens)
        event(f"truncate: {kind}")
        assert kind == "ok" or not 0 <= slot < self.max_slots or n_tokens < 0 or self.pins

    @rule(data=st.data())
    def lock(self, data: st.DataObject) -> None:
        seq = self.tokens(data)
        kind, n = self.both("lock", self.as_arg(seq, data))
        assert kind == "ok" and 0 <= n <= len(seq) // self.bs
        self.pins.update(self.prefixes(seq, n))

    def releasable(self) -> list[tuple[int, ...]]:
        """Pinned prefixes whose every block is pinned (a partial release can unpin ancestors)."""
        return sorted(p for p in +self.pins if all(self.pins[q] for q in self.prefixes(p, len(p) // self.bs)))

    @precondition(lambda self: self.releasable())
    @rule(data=st.data())
    def release_pinned(self, data: st.DataObject) -> None:
        """Releasing what is pinned always works: so no pinned block was ever evicted or dropped."""
        longest = data.draw(st.sampled_from(self.releasable()), label="pinned")
        n = data.draw(st.integers(1, len(longest) // self.bs), label="n_blocks")
        kind, _ = self.both("release", np.array(longest, dtype=np.int32), n)
        assert kind == "ok", "a pinned block went missing"
        self.pins.subtract(self.prefixes(longest, n))

    @rule(data=st.data())
    def release_any(self, data: st.DataObject) -> None:
        """Arbitrary releases: both raise, or both unpin the same blocks."""
        seq = self.tokens(data)
        n = data.draw(st.integers(-1, len(seq) // self.bs + 1), label="n_blocks")
        kind, _ = self.both("release", self.as_arg(seq, data), n)
        if kind == "ok":
            self.pins.subtract(self.prefixes(seq, n))
            assert all(v >= 0 for v in self.pins.values())

    @rule(data=st.data())
    def evict(self, data: st.DataObject) -> None:
        n_bytes = data.draw(st.integers(-1, 2 * self.ref.block_bytes), label="n_bytes")
        kind, got = self.both("evict", n_bytes)
        if kind == "ok":
            self.check_evicted(got)

    @rule()
    def probe_pins(self) -> None:
        """Every pinned prefix is still cached whole: lock() finds all its blocks (then undo)."""
        for p in sorted(+self.pins):
            kind, n = self.both("lock", np.array(p, dtype=np.int32))
            assert kind == "ok" and n == len(p) // self.bs, f"pinned {p} lost blocks"
            assert self.both("release", np.array(p, dtype=np.int32), n)[0] == "ok"

    def check_evicted(self, evicted: list[tuple[int, int, int]]) -> None:
        for slot, start, n in evicted:
            assert 0 <= slot < self.max_slots and start % self.bs == 0 and n == self.bs

    # --- after every step ----------------------------------------------------------------------
    @invariant()
    def same_state(self) -> None:
        for name in ("bytes_held", "n_blocks", "evictions", "matched_tokens", "block_bytes", "byte_budget"):
            assert getattr(self.impl, name) == getattr(self.ref, name), name
        for s in range(self.max_slots):
            assert self.impl.slot_blocks(s) == self.ref.slot_blocks(s)
        assert self.ref.bytes_held <= self.ref.byte_budget

    @invariant()
    def invariants_hold(self) -> None:
        self.ref.check_invariants()
        self.impl.check_invariants()
        # On the twin (no side effects): every pinned prefix is in the tree.
        for p in +self.pins:
            assert self.ref.cached_blocks(p) == len(p) // self.bs


RadixParity.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_radix_parity = RadixParity.TestCase


# ---------------------------------------------------------------------------------------------
# Behaviour, on both backends


@pytest.mark.parametrize("backend", BACKENDS)
def test_match_prefers_the_deepest_block_and_its_lowest_slot(backend: str) -> None:
    idx = make_index(backend, block_size=2)
    assert idx.insert(toks(1, 2, 3, 4, 5), 3) == []  # the odd token is not a full block
    assert idx.insert(toks(1, 2), 1) == []
    assert idx.insert(toks(1, 2, 3, 4), 5) == []
    assert idx.match(toks(1, 2, 3, 4, 9, 9)) == (4, 3)  # deepest block held by 3 and 5
    assert idx.match(toks(1, 2, 7, 7)) == (2, 1)
    assert idx.match(toks(7, 7)) == (0, -1)
    assert idx.match(toks(1)) == (0, -1)
    assert idx.matched_tokens == 6
    assert (idx.n_blocks, idx.bytes_held, idx.slot_blocks(3), idx.slot_blocks(1)) == (2, 4, 2, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_insert_evicts_lru_leaves_and_reports_every_holder(backend: str) -> None:
    idx = make_index(backend, block_size=2, budget_blocks=4)
    idx.insert(toks(1, 1, 2, 2), 0)
    idx.insert(toks(1, 1, 2, 2), 2)
    idx.insert(toks(3, 3, 4, 4), 1)
    idx.match(toks(3, 3, 4, 4))  # session 1 is now more recent than sessions 0 and 2
    evicted = idx.insert(toks(5, 5, 6, 6), 4)
    assert evicted == [(0, 2, 2), (2, 2, 2), (0, 0, 2), (2, 0, 2)]  # leaf [2 2], then [1 1]
    assert idx.evictions == 2 and idx.slot_blocks(0) == 0 and idx.slot_blocks(4) == 2
    idx.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_pinned_blocks_survive_and_insert_keeps_only_what_fits(backend: str) -> None:
    idx = make_index(backend, block_size=1, budget_blocks=3)
    idx.insert(toks(1, 2), 0)
    assert idx.lock(toks(1, 2, 9)) == 2
    assert idx.insert(toks(5, 6, 7), 1) == []  # one free block: only [5] fits
    assert idx.slot_blocks(1) == 1 and idx.bytes_held == 3
    assert idx.insert(toks(8), 2) == [(1, 0, 1)]  # [5] is the only unpinned leaf
    assert idx.evict(100) == [(2, 0, 1)]  # the pinned path stays
    idx.release(toks(1, 2), 2)
    assert idx.evict(1) == [(0, 1, 1)]
    assert idx.n_blocks == 1
    idx.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_insert_protects_its_own_path(backend: str) -> None:
    idx = make_index(backend, block_size=1, budget_blocks=2)
    idx.insert(toks(1), 0)
    assert idx.insert(toks(1, 2, 3), 0) == []  # [1] and [2] fill the budget; [1] is not evicted
    assert idx.slot_blocks(0) == 2 and idx.match(toks(1, 2, 3)) == (2, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncate_and_diverging_insert(backend: str) -> None:
    idx = make_index(backend, block_size=2)
    idx.insert(toks(1, 1, 2, 2, 3, 3), 0)
    idx.insert(toks(1, 1, 2, 2), 1)
    idx.truncate(0, 3)  # keeps the first whole block only
    assert (idx.slot_blocks(0), idx.n_blocks) == (1, 2)
    idx.insert(toks(1, 1, 4, 4), 1)  # slot 1 now holds [1 1][4 4]: it leaves [2 2]
    assert (idx.slot_blocks(1), idx.n_blocks, idx.match(toks(1, 1, 2, 2))) == (2, 2, (2, 0))
    idx.insert(toks(1, 1), 1)  # a shorter prefix of what it holds changes nothing
    assert idx.slot_blocks(1) == 2
    idx.truncate(1, 0)
    idx.truncate(0, 0)
    assert idx.n_blocks == 0 and idx.evictions == 0
    idx.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropping_the_last_holder_of_a_locked_block_is_refused(backend: str) -> None:
    idx = make_index(backend, block_size=2)
    idx.insert(toks(1, 1, 2, 2), 0)
    idx.lock(toks(1, 1, 2, 2))
    with pytest.raises(ValueError, match="locked"):
        idx.truncate(0, 2)
    with pytest.raises(ValueError, match="locked"):
        idx.insert(toks(1, 1, 3, 3), 0)
    assert (idx.slot_blocks(0), idx.n_blocks) == (2, 2)  # nothing changed
    idx.insert(toks(1, 1, 2, 2), 1)  # a second holder: now slot 0 may leave
    idx.truncate(0, 0)
    assert (idx.slot_blocks(0), idx.slot_blocks(1), idx.n_blocks) == (0, 2, 2)
    idx.check_invariants()


def test_factory_follows_hera_native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERA_NATIVE", "0")
    assert isinstance(RadixIndex(16, 2, 1024), PyRadixIndex)
    monkeypatch.delenv("HERA_NATIVE")
    cls = native_cls()
    if cls is None:
        pytest.skip("HERA_NATIVE=0")
    idx = RadixIndex(16, 2, 1024, 4)
    assert isinstance(idx, cls)
    assert (idx.block_size, idx.bytes_per_token, idx.byte_budget, idx.max_slots, idx.block_bytes) == (16, 2, 1024, 4, 32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_invariants_passes_on_a_busy_index(backend: str) -> None:
    idx = make_index(backend, block_size=4, budget_blocks=16)
    rng = np.random.default_rng(0)
    for step in range(200):
        seq = rng.integers(0, 3, size=rng.integers(0, 40)).astype(np.int32)
        idx.insert(seq, step % 8)
        idx.match(seq[: len(seq) // 2])
        if step % 7 == 0:
            idx.truncate(step % 8, int(rng.integers(0, 20)))
    idx.check_invariants()
    assert idx.bytes_held <= idx.byte_budget and idx.evictions > 0


def test_twin_check_invariants_detects_corruption() -> None:
    idx = PyRadixIndex(2, 1, 16)
    idx.insert(toks(1, 1, 2, 2), 0)
    idx.n_blocks += 1
    with pytest.raises(AssertionError, match="n_blocks"):
        idx.check_invariants()


def test_native_releases_the_gil_safely() -> None:
    """Two threads on one index: calls are serialized, nothing breaks."""
    cls = native_cls()
    if cls is None:
        pytest.skip("HERA_NATIVE=0")
    idx = cls(16, 8, 16 * 8 * 64, 8)
    prompts = [np.arange(s * 1000, s * 1000 + 600, dtype=np.int32) for s in range(8)]

    def work(offset: int) -> None:
        for k in range(300):
            s = (k + offset) % 8
            idx.match(prompts[s])
            idx.insert(prompts[s][: 100 + k % 500], s)

    threads = [threading.Thread(target=work, args=(o,)) for o in (0, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    idx.check_invariants()
    assert idx.bytes_held <= idx.byte_budget


# ---------------------------------------------------------------------------------------------
# Caller mistakes: ValueError with the reason, on both backends


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("args", "reason"), [
    ((4, 2, 7, 8), "smaller than one block"),
    ((0, 2, 64, 8), "block_size"),
    ((4, 0, 64, 8), "bytes_per_token"),
    ((4, 2, 64, 0), "max_slots"),
    ((4, 2, 64, 65), "max_slots"),
])
def test_bad_construction(backend: str, args: tuple[int, ...], reason: str) -> None:
    cls = PyRadixIndex if backend == "python" else native_cls()
    if cls is None:
        pytest.skip("HERA_NATIVE=0")
    with pytest.raises(ValueError, match=reason):
        cls(*args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("slot", [-1, 4])
def test_bad_slot(backend: str, slot: int) -> None:
    idx = make_index(backend, max_slots=4)
    for call in (lambda: idx.insert(toks(1, 2), slot), lambda: idx.truncate(slot, 0),
                 lambda: idx.slot_blocks(slot)):
        with pytest.raises(ValueError, match="slot must be in 0..3"):
            call()
    assert idx.n_blocks == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_release_without_lock(backend: str) -> None:
    idx = make_index(backend)
    idx.insert(toks(1, 1, 2, 2), 0)
    with pytest.raises(ValueError, match="not locked"):
        idx.release(toks(1, 1, 2, 2), 1)
    assert idx.lock(toks(1, 1)) == 1
    with pytest.raises(ValueError, match="not locked"):
        idx.release(toks(1, 1, 2, 2), 2)  # the second block is not pinned
    with pytest.raises(ValueError, match="not locked"):
        idx.release(toks(1, 1, 2, 2, 3, 3), 3)  # nor cached
    with pytest.raises(ValueError, match="n_blocks"):
        idx.release(toks(1, 1), -1)
    idx.release(toks(1, 1), 1)
    with pytest.raises(ValueError, match="not locked"):
        idx.release(toks(1, 1), 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_counts(backend: str) -> None:
    idx = make_index(backend)
    with pytest.raises(ValueError, match="n_tokens"):
        idx.truncate(0, -1)
    with pytest.raises(ValueError, match="n_bytes"):
        idx.evict(-1)


BAD_TOKENS = {
    "int64": (np.arange(4, dtype=np.int64), "int32"),
    "float32": (np.arange(4, dtype=np.float32), "int32"),
    "uint32": (np.arange(4, dtype=np.uint32), "int32"),
    "big-endian": (np.arange(4, dtype=">i4"), "int32"),
    "2-D": (np.zeros((2, 2), dtype=np.int32), "1-D"),
    "0-D": (np.array(3, dtype=np.int32), "1-D"),
    "strided": (np.arange(8, dtype=np.int32)[::2], "C-contiguous"),
    "str": ("abcd", "sequence of ints"),
    "floats": ([1.0, 2.0], "integers"),
    "int64 range": ([2**31], "int32"),
    "None": (None, "sequence of ints"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
def test_bad_tokens(backend: str, name: str) -> None:
    idx = make_index(backend)
    bad, reason = BAD_TOKENS[name]
    for call in (lambda: idx.match(bad), lambda: idx.insert(bad, 0), lambda: idx.lock(bad),
                 lambda: idx.release(bad, 0)):
        with pytest.raises(ValueError, match=reason):
            call()
    assert idx.n_blocks == 0 and idx.matched_tokens == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_inputs_agree(backend: str) -> None:
    """An int32 array, a list, a tuple and numpy integer scalars name the same blocks."""
    idx = make_index(backend)
    idx.insert(toks(1, 2, 3, 4), 0)
    assert idx.match([1, 2, 3, 4]) == idx.match((1, 2, 3, 4)) == idx.match([np.int64(1), 2, 3, 4]) == (4, 0)
    assert idx.match(np.array([], dtype=np.int32)) == (0, -1) == idx.match([])


def test_hot_prefix_tracker_mirrors_served_prompts_under_its_budget():
    from hera_core.native.radix import HotPrefixTracker

    t = HotPrefixTracker(block_size=4, budget_tokens=64, conversations=2)
    a = list(range(100, 120))
    b = list(range(100, 108)) + list(range(300, 312))  # shares a's first two blocks
    assert t.hot(a) == 0
    t.served(a)
    assert t.hot(a) == 20 and t.hot(a + [1, 2, 3, 4]) == 20 and t.hot(b) == 8
    t.served(b)  # a second conversation: a stays hot
    assert t.hot(a) == 20 and t.hot(b) == 20
    t.served(a + [7, 7, 7, 7])  # the next step of a continues its conversation
    assert t.hot(a + [7, 7, 7, 7]) == 24
    c = list(range(500, 540))
    t.served(c)  # past two conversations: the least recently used (b) goes, its shared prefix stays
    assert t.hot(c) == 40 and t.hot(a) == 20 and t.hot(b) == 8
    with pytest.raises(ValueError, match="smaller than one block"):
        HotPrefixTracker(block_size=16, budget_tokens=8)
