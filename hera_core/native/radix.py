"""Block-granular radix index over token ids: which KV slots hold which prompt prefixes.

The local engine keeps several sequences ("slots", llama.cpp sequence ids) in one unified KV
cache. This index maps every cached prefix, one block of `block_size` tokens per node, to the
slots whose KV holds it, so a new prompt finds the slot sharing its longest prefix, and a shared
prefix is stored once (llama.cpp's seq_cp on a unified cache tags cells, it copies nothing).

Invariants (checked by `check_invariants`, shared with the native twin in csrc/radix.cpp):
- the holders of a node are a subset of the holders of its parent (a slot holds a path from the root);
- a slot holds one path: at most one child of any node holds it (a KV sequence has one token per position);
- bytes_held = nodes * block_size * bytes_per_token <= byte_budget after every operation;
- a node with a positive reference count (in use by a running request) is never evicted, and never
  loses its last holder (`truncate` or `insert` that would do that raise ValueError);
- no two leaves share a `last_access` (an operation touches one root path, which ends in one leaf at
  most), so LRU order is total; the depth/key tie-break is defensive.

Token ids are a 1-D C-contiguous int32 numpy array or a sequence of Python ints in int32 range;
anything else is a ValueError (the native twin applies the same rule).

This is the pure-Python twin and the reference; `RadixIndex` below picks the native one unless
HERA_NATIVE=0.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np

Evicted = tuple[int, int, int]  # (slot, first token position dropped, tokens dropped)

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _token_list(tokens: object) -> list[int]:
    """Validated token ids as a list of ints (ValueError naming the problem)."""
    if isinstance(tokens, np.ndarray):
        if tokens.dtype != np.int32:
            raise ValueError(f"tokens must be an int32 array, got dtype {tokens.dtype}")
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got {tokens.ndim}-D")
        if not tokens.flags.c_contiguous:
            raise ValueError("tokens must be C-contiguous (use np.ascontiguousarray)")
        return tokens.tolist()
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise ValueError(f"tokens must be a 1-D int32 numpy array or a sequence of ints, "
                         f"got {type(tokens).__name__}")
    try:
        out = [operator.index(t) for t in tokens]
    except TypeError:
        raise ValueError("tokens must be integers") from None
    if out and not (_INT32_MIN <= min(out) and max(out) <= _INT32_MAX):
        raise ValueError("token ids must fit in int32")
    return out


class _Node:
    __slots__ = ("key", "parent", "children", "holders", "ref", "last_access", "depth")

    def __init__(self, key: tuple[int, ...], parent: "_Node | None", depth: int) -> None:
        self.key = key  # the block of token ids this node adds to its parent's prefix
        self.parent = parent
        self.children: dict[tuple[int, ...], _Node] = {}
        self.holders = 0  # bit i set: slot i's KV holds this block (at positions depth*block_size...)
        self.ref = 0  # running requests using this block; > 0 means never evict
        self.last_access = 0  # logical clock of the last match/insert/lock touching it (LRU)
        self.depth = depth  # block index: the node covers tokens [depth*bs, (depth+1)*bs)


class PyRadixIndex:
    def __init__(self, block_size: int, bytes_per_token: int, byte_budget: int, max_slots: int = 64) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if bytes_per_token < 1:
            raise ValueError(f"bytes_per_token must be >= 1, got {bytes_per_token}")
        if not 1 <= max_slots <= 64:
            raise ValueError(f"max_slots must be in 1..64, got {max_slots}")
        if byte_budget < block_size * bytes_per_token:
            raise ValueError(f"byte_budget {byte_budget} is smaller than one block "
                             f"({block_size} tokens x {bytes_per_token} bytes = {block_size * bytes_per_token})")
        self.block_size = block_size
        self.bytes_per_token = bytes_per_token
        self.byte_budget = byte_budget
        self.max_slots = max_slots
        self._root = _Node((), None, -1)
        self._clock = 0
        self.n_blocks = 0  # nodes below the root
        self.evictions = 0  # blocks evicted to stay under the budget
        self.matched_tokens = 0  # total tokens found by match(): the cache's hits

    # --- helpers ------------------------------------------------------------------------------
    @property
    def block_bytes(self) -> int:
        return self.block_size * self.bytes_per_token

    @property
    def bytes_held(self) -> int:
        return self.n_blocks * self.block_bytes

    def _blocks(self, tokens: object) -> list[tuple[int, ...]]:
        ids, bs = _token_list(tokens), self.block_size
        return [tuple(ids[i:i + bs]) for i in range(0, len(ids) - bs + 1, bs)]

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot must be in 0..{self.max_slots - 1}, got {slot}")

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _path(self, blocks: list[tuple[int, ...]]) -> list[_Node]:
        node, path = self._root, []
        for key in blocks:
            node = node.children.get(key)
            if node is None:
                break
            path.append(node)
        return path

    @staticmethod
    def _slot_child(node: _Node, bit: int) -> _Node | None:
        """The child of `node` on the slot's path (at most one holds it)."""
        return next((c for c in node.children.values() if c.holders & bit), None)

    # --- operations ---------------------------------------------------------------------------
    def match(self, tokens: Sequence[int]) -> tuple[int, int]:
        """Longest cached block-aligned prefix of `tokens`: (tokens matched, holder slot or -1).

        The holder is the lowest slot holding the deepest matched block. Touches the path (LRU).
        """
        path = self._path(self._blocks(tokens))
        now = self._tick()
        for node in path:
            node.last_access = now
        if not path:
            return 0, -1
        holders = path[-1].holders
        matched = len(path) * self.block_size
        self.matched_tokens += matched
        return matched, (holders & -holders).bit_length() - 1

    def insert(self, tokens: Sequence[int], slot: int) -> list[Evicted]:
        """Record that `slot` holds the full blocks of `tokens`, evicting LRU blocks to fit.

        The slot's sequence now starts with `tokens`: blocks it held that differ from `tokens` at
        the same position (and everything after them) are dropped from it first, as `truncate`
        would; blocks it held beyond the end of `tokens` on the same path are kept. Blocks of this
        path are protected while inserting; if the budget cannot fit them all, only the leading
        blocks that fit are recorded. Returns what was evicted (not what the slot dropped).
        """
        self._check_slot(slot)
        blocks = self._blocks(tokens)
        bit = 1 << slot
        # Where the slot's current path diverges from `tokens`, if it does.
        node, diverged = self._root, None
        for key in blocks:
            nxt = self._slot_child(node, bit)
            if nxt is None:
                break
            if nxt.key != key:
                diverged = nxt
                break
            node = nxt
        if diverged is not None:
            self._drop_holder(diverged, bit)
        now = self._tick()
        node, evicted = self._root, []
        for key in blocks:
            child = node.children.get(key)
            if child is None:
                if self.bytes_held + self.block_bytes > self.byte_budget:
                    node.ref += 1  # protect the path built so far
                    try:
                        evicted += self._evict_bytes(self.bytes_held + self.block_bytes - self.byte_budget)
                    finally:
                        node.ref -= 1
                    if self.bytes_held + self.block_bytes > self.byte_budget:
                        break
                child = _Node(key, node, node.depth + 1)
                node.children[key] = child
                self.n_blocks += 1
            child.holders |= bit
            child.last_access = now
            node = child
        return evicted

    def truncate(self, slot: int, n_tokens: int) -> None:
        """`slot` now holds only its first `n_tokens` tokens: it leaves every block beyond them.

        ValueError (and no change) if that would leave a locked block with no holder.
        """
        self._check_slot(slot)
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        bit = 1 << slot
        keep = n_tokens // self.block_size
        node = self._root
        while (nxt := self._slot_child(node, bit)) is not None:
            if nxt.depth >= keep:
                self._drop_holder(nxt, bit)
                break
            node = nxt

    def _drop_holder(self, node: _Node, bit: int) -> None:
        """Remove `bit` from `node` and its descendants on that slot's path; free empty nodes.

        Checks first, so a ValueError leaves the index unchanged.
        """
        order, n = [], node
        while n is not None:  # the slot's path below `node` is a chain
            order.append(n)
            n = self._slot_child(n, bit)
        if any(n.holders == bit and n.ref > 0 for n in order):
            raise ValueError(f"slot {bit.bit_length() - 1} is the last holder of a locked block; "
                             f"release it first")
        for n in order:
            n.holders &= ~bit
        for n in reversed(order):  # children before parents
            if n.holders == 0:
                assert not n.children and n.ref == 0, "an emptied block kept children or pins"
                del n.parent.children[n.key]
                self.n_blocks -= 1

    def lock(self, tokens: Sequence[int]) -> int:
        """Pin the cached blocks of `tokens` (a running request); returns how many were pinned."""
        path = self._path(self._blocks(tokens))
        now = self._tick()
        for node in path:
            node.ref += 1
            node.last_access = now
        return len(path)

    def release(self, tokens: Sequence[int], n_blocks: int) -> None:
        """Undo `lock`: unpin the first `n_blocks` blocks of `tokens`."""
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        path = self._path(self._blocks(tokens))
        if len(path) < n_blocks or any(n.ref <= 0 for n in path[:n_blocks]):
            raise ValueError("release of blocks that are not locked")
        for node in path[:n_blocks]:
            node.ref -= 1

    def evict(self, n_bytes: int) -> list[Evicted]:
        """Free at least `n_bytes` (or all that can be freed) from LRU unpinned leaves."""
        if n_bytes < 0:
            raise ValueError(f"n_bytes must be >= 0, got {n_bytes}")
        return self._evict_bytes(n_bytes)

    def _evict_bytes(self, n_bytes: int) -> list[Evicted]:
        freed, out = 0, []
        while freed < n_bytes:
            leaf = self._lru_leaf()
            if leaf is None:
                break
            start = leaf.depth * self.block_size
            out.extend((s, start, self.block_size) for s in range(self.max_slots) if leaf.holders >> s & 1)
            del leaf.parent.children[leaf.key]
            self.n_blocks -= 1
            self.evictions += 1
            freed += self.block_bytes
        return out

    def _lru_leaf(self) -> _Node | None:
        # Linear scan: the index holds at most a few thousand blocks; ties break on depth, then key
        # (they cannot happen: leaves have distinct last_access, see the module docstring).
        best = None
        stack = list(self._root.children.values())
        while stack:
            n = stack.pop()
            if n.children:
                stack.extend(n.children.values())
            elif n.ref == 0 and (best is None or (n.last_access, n.depth, n.key) < (best.last_access, best.depth, best.key)):
                best = n
        return best

    def slot_blocks(self, slot: int) -> int:
        """How many blocks `slot` holds (its path length)."""
        self._check_slot(slot)
        bit, node, n = 1 << slot, self._root, 0
        while (node := self._slot_child(node, bit)) is not None:
            n += 1
        return n

    def cached_blocks(self, tokens: Sequence[int]) -> int:
        """How many of `tokens`' full blocks the tree holds, from the start (no LRU touch)."""
        return len(self._path(self._blocks(tokens)))

    def check_invariants(self) -> None:
        """AssertionError naming the first invariant that does not hold."""
        assert self.bytes_held <= self.byte_budget, "bytes_held exceeds byte_budget"
        count, stack, leaf_clocks = 0, [self._root], set()
        while stack:
            n = stack.pop()
            seen = 0
            for key, c in n.children.items():
                count += 1
                assert c.key == key and c.parent is n, "child linked under the wrong key or parent"
                assert c.holders != 0, "a block has no holder"
                assert n is self._root or c.holders & ~n.holders == 0, "holders not a subset of the parent's"
                assert c.holders & seen == 0, "a slot holds two children of one block"
                assert c.ref >= 0 and c.last_access <= self._clock, "bad pin count or clock"
                assert c.depth == n.depth + 1 and len(c.key) == self.block_size, "bad depth or block length"
                assert c.holders >> self.max_slots == 0, "a holder bit beyond max_slots"
                seen |= c.holders
                if not c.children:
                    assert c.last_access not in leaf_clocks, "two leaves share a last_access"
                    leaf_clocks.add(c.last_access)
                stack.append(c)
        assert count == self.n_blocks, "n_blocks does not count the nodes"


def RadixIndex(block_size: int, bytes_per_token: int, byte_budget: int, max_slots: int = 64):
    """The native index when built and enabled, else the Python twin (same behaviour)."""
    from hera_core import native

    if native.native_enabled():
        try:
            mod = native.load()
        except ImportError:
            raise
        if hasattr(mod, "RadixIndex"):
            return mod.RadixIndex(block_size, bytes_per_token, byte_budget, max_slots)
    return PyRadixIndex(block_size, bytes_per_token, byte_budget, max_slots)


class HotPrefixTracker:
    """The radix index as a routing signal rather than storage: which prompt prefixes an engine
    that manages its own KV reuse (TensorRT-LLM block reuse) probably still holds on the device.

    Records the token ids of every request sent (`served`) under an LRU token budget sized like
    the device cache, and answers, before a request runs, how much of its prompt is hot (`hot`).
    It mirrors, not controls: the engine may have evicted a block the tracker still lists.
    Conversations are tracked as index slots: a prompt that extends a slot's whole sequence
    continues that slot, any other takes the least recently used one.
    """

    def __init__(self, block_size: int, budget_tokens: int, conversations: int = 64) -> None:
        if budget_tokens < block_size:
            raise ValueError(f"budget_tokens ({budget_tokens}) is smaller than one block ({block_size})")
        self.block_size = block_size
        self._index = RadixIndex(block_size, 1, budget_tokens, conversations)
        self._last_used = [0] * conversations
        self._clock = 0

    def hot(self, tokens: Sequence[int]) -> int:
        """Leading tokens of `tokens` in recently served prompts (block-aligned)."""
        return self._index.match(np.asarray(tokens, dtype=np.int32))[0]

    def served(self, tokens: Sequence[int]) -> None:
        key = np.asarray(tokens, dtype=np.int32)
        matched, holder = self._index.match(key)
        if holder < 0 or matched < self._index.slot_blocks(holder) * self.block_size:
            holder = min(range(len(self._last_used)), key=self._last_used.__getitem__)
            self._index.truncate(holder, 0)
        self._clock += 1
        self._last_used[holder] = self._clock
        self._index.insert(key, holder)
