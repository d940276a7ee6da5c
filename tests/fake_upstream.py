"""A scripted OpenAI-compatible upstream on 127.0.0.1, for fault injection only.

Each request pops the next mode from `script` (then `default`): ok, slow, drip, reset, 429,
500, 502, 503, badjson, nochoices, cut (stream cut mid-way), hang. Every request body and its
headers are kept in `seen`, so tests can prove what did (and did not) reach the cloud.
"""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web


class FakeUpstream:
    def __init__(self, default: str = "ok", delay_s: float = 0.0) -> None:
        self.script: list[str] = []
        self.default = default
        self.delay_s = delay_s  # latency added to every request
        self.seen: list[dict] = []  # {"headers": ..., "body": ...} of every request

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        return app

    def _reply(self, body: dict) -> dict:
        text = "ok from upstream"
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "fake"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw)
        self.seen.append({"headers": dict(request.headers), "body": body, "raw": raw.decode()})
        mode = self.script.pop(0) if self.script else self.default
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if mode in ("429", "500", "502", "503"):
            headers = {"Retry-After": "0.05"} if mode == "429" else {}
            return web.json_response({"error": {"message": f"scripted {mode}"}}, status=int(mode), headers=headers)
        if mode == "reset":
            request.transport.close()
            return web.Response()
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "badjson":
            return web.Response(text='{"choices": [', content_type="application/json")
        if mode == "nochoices":
            return web.json_response({"id": "x"})
        if mode == "slow":
            await asyncio.sleep(0.3)
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                      {"choices": [{"index": 0, "delta": {"content": "ok from "}}]},
                      {"choices": [{"index": 0, "delta": {"content": "upstream"}}]},
                      {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 11, "completion_tokens": 4}}]
            for i, chunk in enumerate(chunks):
                if mode == "cut" and i == 2:
                    request.transport.close()
                    return resp
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            return resp
        if mode == "drip":  # a slow-drip body: one byte at a time
            payload = json.dumps(self._reply(body)).encode()
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            for b in payload:
                await resp.write(bytes([b]))
                await asyncio.sleep(0.05)
            return resp
        return web.json_response(self._reply(body))


def main() -> None:
    """`python -m tests.fake_upstream --port P`: serve it in a process of its own (benchmarks)."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    fake = FakeUpstream()
    fake.seen = _Discard()  # a long benchmark must not grow memory
    web.run_app(fake.app(), host="127.0.0.1", port=args.port, print=None, access_log=None)


class _Discard(list):
    def append(self, item) -> None:
        return None


if __name__ == "__main__":
    main()
