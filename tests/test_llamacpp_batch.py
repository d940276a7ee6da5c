"""The owning llama_batch without a model: llama.cpp's own llama_batch_init / llama_batch_free, and
a fake llama_decode that records each call and answers logits that name their token, so every
test checks which row each span gets back."""

import ctypes

import llama_cpp
import numpy as np
import pytest

from hera_core.backends.llamacpp.batch import Batch, Span
from hera_core.errors import HeraError

VOCAB = 3  # a row of fake logits: (token, position, sequence)


class FakeLib:
    """llama_cpp's batch calls as they are; llama_decode and the logits played."""

    llama_batch_init = staticmethod(llama_cpp.llama_batch_init)
    llama_batch_free = staticmethod(llama_cpp.llama_batch_free)

    def __init__(self, statuses=()):
        self.calls = []  # per llama_decode: [(token, pos, seq, wants logits)]
        self.statuses = list(statuses)  # what the next calls return (then 0)
        self._rows = None

    def llama_decode(self, ctx, raw):
        n = raw.n_tokens
        entries = [(raw.token[j], raw.pos[j], raw.seq_id[j][0], bool(raw.logits[j])) for j in range(n)]
        assert all(raw.n_seq_id[j] == 1 for j in range(n))
        self.calls.append(entries)
        self._rows = (ctypes.c_float * (n * VOCAB))(*[float(x) for t, p, s, _ in entries for x in (t, p, s)])
        return self.statuses.pop(0) if self.statuses else 0

    def llama_get_logits_ith(self, ctx, j):
        assert self.calls[-1][j][3], "logits read for a token that did not ask for them"
        return ctypes.cast(ctypes.byref(self._rows, j * VOCAB * 4), ctypes.POINTER(ctypes.c_float))


@pytest.fixture
def made():
    lib = FakeLib()
    batch = Batch(lib, None, capacity=4, n_vocab=VOCAB, kv_cells=64)
    yield batch, lib
    batch.close()


def test_each_span_gets_the_logits_after_its_last_token(made):
    batch, lib = made
    rows = batch.decode([Span([10, 11, 12], seq=0, start=5), Span([20], seq=1, start=0), Span([30, 31], seq=2, start=7)])
    assert [tuple(r) for r in rows] == [(12, 7, 0), (20, 0, 1), (31, 8, 2)]
    assert [len(c) for c in lib.calls] == [4, 2]  # six tokens, packed four per call; the third span split
    assert [e[3] for c in lib.calls for e in c] == [False, False, True, True, False, True]


def test_every_row_gives_one_row_per_token(made):
    batch, lib = made
    rows = batch.decode([Span([1, 2, 3, 4, 5], seq=3, start=10)], every_row=True)[0]
    assert rows.shape == (5, VOCAB) and rows[:, 0].tolist() == [1, 2, 3, 4, 5] and rows[:, 1].tolist() == list(range(10, 15))


def test_a_full_cache_is_made_room_for_once():
    lib = FakeLib(statuses=[1])
    batch = Batch(lib, None, capacity=4, n_vocab=VOCAB, kv_cells=64)
    freed = []
    try:
        row = batch.decode([Span([7], seq=0, start=0)], on_full=lambda: freed.append(True))[0]
        assert freed == [True] and len(lib.calls) == 2 and tuple(row) == (7, 0, 0)
        lib.statuses = [1, 1]
        with pytest.raises(HeraError, match="status 1"):
            batch.decode([Span([7], seq=0, start=0)], on_full=lambda: None)
        lib.statuses = [1]
        with pytest.raises(HeraError, match="64 cells"):  # without on_full, no retry
            batch.decode([Span([7], seq=0, start=0)])
    finally:
        batch.close()


def test_a_closed_batch_refuses_work(made):
    batch, _ = made
    batch.close()
    batch.close()  # idempotent
    with pytest.raises(HeraError, match="closed"):
        batch.decode([Span([1], seq=0, start=0)])


def test_empty_spans_get_no_row(made):
    batch, lib = made
    rows = batch.decode([Span([], seq=0, start=0), Span([4], seq=1, start=2)])
    assert rows[0] is None and tuple(rows[1]) == (4, 2, 1)
    assert np.asarray([e[0] for e in lib.calls[0]]).tolist() == [4]
