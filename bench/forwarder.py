"""The least a Python proxy can add: a bare aiohttp forwarder (bench/test_proxy.py's floor).

It reads the request body, POSTs it to the upstream over one kept-alive client session and returns
the upstream's body: no parsing, no routing, no ledger, no metrics. What `hera serve` adds beyond
what this adds is HERA's own work; what this adds is the price of the HTTP hop itself (two more
socket writes and reads, an event-loop turn each) on the machine it runs on.

    python -m bench.forwarder --port 8001 --upstream http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web


def app(upstream: str) -> web.Application:
    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        async with request.app["http"].post(upstream + request.path, data=body,
                                            headers={"Content-Type": "application/json"}) as r:
            return web.Response(body=await r.read(), status=r.status, content_type="application/json")

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def session(a: web.Application):
        a["http"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await a["http"].close()

    a = web.Application()
    a.router.add_post("/v1/chat/completions", forward)
    a.router.add_get("/healthz", health)
    a.cleanup_ctx.append(session)
    return a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="the upstream's base URL (no /v1)")
    args = ap.parse_args()
    web.run_app(app(args.upstream.rstrip("/")), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
