"""Content-addressed cache of greedy completions: (model, request) -> Generation.

With greedy decoding a completion is a function of the model and the request, so evaluating
many routing policies costs little more than running each model's trajectory once. Stored in
SQLite; the key is sha256 over the canonical JSON of the model name and the request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from hera_core.backends.base import Engine, Generation
from hera_core.errors import CacheMissError


def cache_key(model: str, request: dict[str, Any]) -> str:
    canon = json.dumps({"model": model, "request": request}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


class CompletionCache:
    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only  # a miss in read-only mode is an error for offline replays
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, model TEXT, value TEXT)")
        # SLM prefill features per prompt: the router's inputs, so evaluations replay without a model.
        self._db.execute("CREATE TABLE IF NOT EXISTS features (key TEXT PRIMARY KEY, model TEXT, value TEXT)")
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, model: str, request: dict[str, Any]) -> Generation | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM completions WHERE key=?",
                                   (cache_key(model, request),)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return Generation(**json.loads(row[0]))

    def put(self, model: str, request: dict[str, Any], gen: Generation) -> None:
        if self.read_only:
            return
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO completions VALUES (?,?,?)",
                             (cache_key(model, request), model, json.dumps(dataclasses.asdict(gen))))

    def get_features(self, model: str, messages: list) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM features WHERE key=?",
                                   (cache_key(model, {"messages": messages}),)).fetchone()
        return None if row is None else json.loads(row[0])

    def put_features(self, model: str, messages: list, value: dict[str, Any]) -> None:
        if self.read_only:
            return
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO features VALUES (?,?,?)",
                             (cache_key(model, {"messages": messages}), model, json.dumps(value)))

    def close(self) -> None:
        self._db.close()


class CachingEngine(Engine):
    """Wraps an engine so greedy `generate` calls are answered from the cache when seen before.

    `prefill` always runs live: its logits feed the router and are never cached.
    """

    def __init__(self, inner: Engine, cache: CompletionCache) -> None:
        self.inner = inner
        self.cache = cache
        self.name = inner.name
        self.is_local = inner.is_local

    async def generate(self, messages, *, max_tokens: int = 256, stop=None, on_text=None, toolset=None,
                       **kwargs) -> Generation:
        request = {"messages": messages, "max_tokens": max_tokens, "stop": list(stop or []), **kwargs}
        if toolset is not None:  # (absent otherwise, so keys made before tools existed still match)
            request["tools"] = toolset.request_fields()
            kwargs["toolset"] = toolset
        hit = self.cache.get(self.name, request)
        if hit is not None:
            if on_text is not None and hit.text:
                on_text(hit.text)
            return hit
        if self.cache.read_only:
            raise CacheMissError(f"completion cache miss for {self.name} in offline mode")
        gen = await self.inner.generate(messages, max_tokens=max_tokens, stop=stop, on_text=on_text, **kwargs)
        self.cache.put(self.name, request, gen)
        return gen

    async def prefill(self, messages, **kwargs):
        return await self.inner.prefill(messages, **kwargs)

    async def generate_samples(self, messages, n, **kwargs):  # sampled: never cached here
        return await self.inner.generate_samples(messages, n, **kwargs)

    async def score_continuation(self, messages, text):
        return await self.inner.score_continuation(messages, text)

    def cache_stats(self):
        return self.inner.cache_stats()

    async def forward(self, payload):  # pass-through requests are never cached
        return await self.inner.forward(payload)

    def forward_stream(self, payload):
        return self.inner.forward_stream(payload)

    async def close(self) -> None:
        await self.inner.close()
