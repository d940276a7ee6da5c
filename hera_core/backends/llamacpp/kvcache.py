"""The slots of the KV cache: which tokens each llama.cpp sequence holds, where a new prompt goes,
and what is evicted to stay in the byte budget. The KV calls themselves (`seq_rm`, `seq_cp`)
are passed in, so the cache runs without a model (tests/test_llamacpp_kvcache.py drives it with a
fake that records them).

A radix index (hera_core.native.radix) maps cached prompt prefixes, block by block, to the slots
that hold them. A new prompt goes to the slot sharing its longest prefix and only the new tokens
are evaluated:

- the next step of the same conversation continues its slot in place (the slot's last prompt is
  a prefix of the new one; only the reply and the new user turn are evaluated);
- a prompt that shares only part of a slot (a common system prompt, a branch) gets a free or
  least-recently-used slot and the shared prefix is linked into it with `seq_cp`;
- least-recently-used unpinned blocks are evicted (`seq_rm`) to stay in the budget.

A slot that is generating (`busy`) or whose prompt awaits its evaluation (`placing`) is never
recycled, continued or evicted by another request; `NoFreeSlot` says every slot is taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from hera_core.backends.base import check_context
from hera_core.native.radix import RadixIndex


class KvCalls(Protocol):
    """What the cache asks of the model's KV memory (hera_core.backends.llamacpp.model.LoadedModel)."""

    def seq_rm(self, seq: int, start: int) -> None:
        """Drop sequence `seq`'s KV from position `start` on."""

    def seq_cp(self, src: int, dst: int, end: int) -> None:
        """Give `dst` the KV of `src`'s positions 0..end (-1: the whole of `src`)."""


class NoFreeSlot(Exception):
    """Every slot is generating or being filled; the request waits for one (engine-internal)."""


@dataclass
class Slot:
    tokens: list[int] = field(default_factory=list)  # token ids whose KV this sequence holds (positions 0..)
    prompt_len: int = 0  # length of the last prompt evaluated here; a continuation must match it whole
    logits: np.ndarray | None = None  # logits after tokens[-1], kept only right after an evaluation
    last_used: int = 0  # logical clock, for choosing a slot to recycle
    busy: bool = False  # a generation is decoding here: not to be recycled, continued or evicted
    placing: bool = False  # a prompt placed here awaits its evaluation (a batch of prefills): likewise


@dataclass
class Placed:
    """A prompt given its slot, its cached prefix in place, the rest not yet evaluated."""

    slot: int
    tokens: list[int]  # the whole prompt
    reused: int  # tokens of the prompt already in the slot's KV
    now: int  # the logical clock when it was placed
    logits: np.ndarray | None  # set for an exact repeat (nothing to evaluate), else once evaluated
    exact: bool = False
    pinned: int = 0  # index blocks of the prefix locked until it is settled


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if diff.size else n


def _key(tokens: list[int]) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int32)


class SlotCache:
    """`n_slots` sequences of up to `n_ctx` tokens each, indexed by a radix index of `block_size`
    token blocks whose cached bytes stay under `budget_bytes` (default: every slot's cells, less
    each slot's partial last block, which the block-granular index does not count). `unified`:
    one KV pool for all slots (a linked prefix is tagged, not copied)."""

    def __init__(self, kv: KvCalls, n_slots: int, n_ctx: int, block_size: int, kv_bytes_per_token: int,
                 budget_bytes: int | None = None, unified: bool = False) -> None:
        self._kv = kv
        self.n_ctx = n_ctx  # tokens of prompt + completion one slot holds
        self.block_size = block_size  # tokens per block of the radix index
        self.unified = unified
        self.kv_bytes_per_token = kv_bytes_per_token  # bytes of K and V of one token, all layers
        cap = (n_slots * n_ctx - n_slots * block_size) * kv_bytes_per_token
        budget = min(budget_bytes, cap) if budget_bytes is not None else cap
        self._index = RadixIndex(block_size, kv_bytes_per_token, budget, n_slots)
        self._slots = [Slot() for _ in range(n_slots)]
        self._clock = 0  # logical time of the last placement, for least-recently-used choices
        # counters: prompt tokens evaluated, prompt tokens found cached, prefixes copied between slots
        self.counts = {"prefill_tokens": 0, "reused_tokens": 0, "seq_copies": 0}

    # --- views ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._slots)

    def slot(self, i: int) -> Slot:
        return self._slots[i]

    @property
    def slots(self) -> tuple[Slot, ...]:
        return tuple(self._slots)

    @property
    def bytes_held(self) -> int:
        return self._index.bytes_held

    @property
    def evictions(self) -> int:
        return self._index.evictions

    def check_invariants(self) -> None:
        """The index's own invariants, and each slot's indexed blocks within the tokens it holds."""
        self._index.check_invariants()
        for i, s in enumerate(self._slots):
            assert self._index.slot_blocks(i) * self.block_size <= len(s.tokens), (i, len(s.tokens))
            assert s.prompt_len <= len(s.tokens) or not s.tokens, (i, s.prompt_len, len(s.tokens))

    # --- bookkeeping ----------------------------------------------------------------------------
    def tick(self) -> int:
        self._clock += 1
        return self._clock

    def seq_rm(self, slot: int, start: int) -> None:
        """Cut `slot` to its first `start` tokens."""
        self._kv.seq_rm(slot, start)
        s = self._slots[slot]
        if start < len(s.tokens):
            s.tokens = s.tokens[:start]
            s.logits = None
        s.prompt_len = min(s.prompt_len, start)

    def _apply(self, evicted) -> None:
        for slot, start, _n in evicted:
            self.seq_rm(slot, start)

    def evict_all(self) -> None:
        """Drop every unpinned block (the KV memory is full)."""
        self._apply(self._index.evict(self._index.bytes_held))

    def index(self, slot: int) -> None:
        """Index what `slot` now holds (after tokens were appended to it)."""
        self._apply(self._index.insert(_key(self._slots[slot].tokens), slot))

    def recycle(self, exclude: int) -> int:
        """An empty slot, else the least recently used idle one (emptied); NoFreeSlot if none."""
        idle = [i for i, s in enumerate(self._slots) if not (s.busy or s.placing) and i != exclude]
        if not idle:
            raise NoFreeSlot
        free = [i for i in idle if not self._slots[i].tokens]
        slot = free[0] if free else min(idle, key=lambda i: self._slots[i].last_used)
        self._index.truncate(slot, 0)
        self.seq_rm(slot, 0)
        return slot

    # --- a prompt's way in: place, (evaluate elsewhere), settle or unplace ------------------------
    def _holder(self, tokens: list[int]) -> tuple[int, int, bool]:
        """The slot sharing the longest prefix with `tokens`: (slot or -1, tokens shared, exact repeat)."""
        holder, m, exact = -1, 0, False
        for i, s in enumerate(self._slots):  # a handful of slots: an exact scan is cheap
            if not s.tokens:
                continue
            mi = common_prefix(s.tokens, tokens)
            ex = mi == len(tokens) == len(s.tokens) and s.logits is not None and not s.busy and not s.placing
            if (ex, mi, s.last_used) > (exact, m, self._slots[holder].last_used if holder >= 0 else -1):
                holder, m, exact = i, mi, ex
        return holder, m, exact

    def place(self, tokens: list[int], reserve: int = 0) -> Placed:
        """Choose the slot for `tokens` and bring it to their longest cached prefix (linked from
        another slot if need be), with room made for the rest and `reserve` more (the completion);
        nothing is evaluated. The prefix is locked against eviction until `settle`. An exact
        repeat of a slot's last prompt comes back with its logits."""
        check_context(len(tokens), self.n_ctx)
        now = self.tick()
        self._index.match(_key(tokens))  # marks the cached path recently used
        holder, m, exact = self._holder(tokens)
        if exact:
            self._slots[holder].last_used = now
            return Placed(holder, tokens, m, now, self._slots[holder].logits, exact=True)  # just evaluated here
        if holder >= 0 and m > 0:
            m = min(m, len(tokens) - 1)  # evaluate at least one token, to get its logits
            held = self._slots[holder]
            if not (held.busy or held.placing) and (m + 1 >= held.prompt_len or len(self._slots) == 1):
                slot = holder  # the same conversation one step on (or a retry), or nowhere else to go: in place
            else:  # a shared prefix of another conversation: link it into a slot of its own
                slot = self._link(holder, tokens[:m])
        else:
            m = 0
            slot = self.recycle(exclude=-1)
        self._index.truncate(slot, m)
        self.seq_rm(slot, m)
        pinned = self._make_room(tokens, m, reserve)
        s = self._slots[slot]
        s.last_used, s.logits = now, None
        s.placing = True  # until settled: another prompt of the same batch must not take this slot
        return Placed(slot, tokens, m, now, None, pinned=pinned)

    def _link(self, holder: int, prefix: list[int]) -> int:
        slot = self.recycle(exclude=holder)
        # unified: tag the shared cells with the new sequence id; across streams llama.cpp copies the
        # whole source stream (the caller cuts it at the prefix)
        self._kv.seq_cp(holder, slot, len(prefix) if self.unified else -1)
        self._slots[slot].tokens = list(prefix)
        self._index.insert(_key(prefix), slot)
        self.counts["seq_copies"] += 1
        return slot

    def _make_room(self, tokens: list[int], m: int, reserve: int) -> int:
        """Lock the prefix tokens[:m], then evict to fit the rest and `reserve`; the blocks locked."""
        key = _key(tokens[:m])
        pinned = self._index.lock(key)
        over = self._index.bytes_held + (len(tokens) - m + reserve) * self.kv_bytes_per_token - self._index.byte_budget
        if over > 0:
            try:
                self._apply(self._index.evict(over))
            except BaseException:
                self._index.release(key, pinned)
                raise
        return pinned

    def settle(self, placed: Placed) -> None:
        """The slot now holds the placed prompt (evaluated, `placed.logits` set): record it, index
        it, unlock the prefix."""
        if placed.exact:
            self.counts["reused_tokens"] += placed.reused
            return
        tokens = placed.tokens
        s = self._slots[placed.slot]
        s.tokens, s.prompt_len, s.logits, s.last_used = list(tokens), len(tokens), placed.logits, placed.now
        s.placing = False
        self._index.release(_key(tokens[:placed.reused]), placed.pinned)
        self._apply(self._index.insert(_key(tokens), placed.slot))
        self.counts["prefill_tokens"] += len(tokens) - placed.reused
        self.counts["reused_tokens"] += placed.reused

    def unplace(self, placed: Placed) -> None:
        """A placed prompt that will not be evaluated: the slot keeps its prefix."""
        if not placed.exact:
            self._slots[placed.slot].placing = False
            self._index.release(_key(placed.tokens[:placed.reused]), placed.pinned)

    def abandon(self, placed: Placed) -> None:
        """A placed prompt partly evaluated, then given up: the slot keeps the cached prefix only."""
        self.unplace(placed)
        self.seq_rm(placed.slot, placed.reused)

    # --- generations: claim a settled prompt's slot, copy it for samples, release ---------------
    def claim(self, slot: int) -> int:
        """`slot` (its prompt settled) decodes now: busy, its prompt locked; the blocks locked."""
        s = self._slots[slot]
        s.busy = True
        return self._index.lock(_key(s.tokens))

    def copy(self, src: int) -> tuple[int, int]:
        """Another slot holding what `src` holds (its KV copied, no recomputation), claimed for a
        generation: (slot, blocks locked). NoFreeSlot if every other slot is taken."""
        slot = self.recycle(exclude=src)
        self._kv.seq_cp(src, slot, -1)
        a, s = self._slots[src], self._slots[slot]
        s.tokens, s.prompt_len, s.logits, s.busy = list(a.tokens), a.prompt_len, a.logits, True
        s.last_used = self.tick()
        self.index(slot)
        self.counts["seq_copies"] += 1
        return slot, self._index.lock(_key(s.tokens))

    def release(self, slot: int, prompt_tokens: int, pinned: int) -> None:
        """A generation in `slot` ended: unlock its prompt, free the slot, index all it holds."""
        s = self._slots[slot]
        s.busy = False
        self._index.release(_key(s.tokens[:prompt_tokens]), pinned)
        self.index(slot)

    def append(self, slot: int, tokens: list[int], logits: np.ndarray | None) -> None:
        """`tokens` were evaluated after what `slot` holds; `logits` follow the last of them."""
        s = self._slots[slot]
        s.tokens.extend(tokens)
        s.logits = logits
