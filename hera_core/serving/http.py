"""The HTTP plumbing of `hera serve`, apart from its API: the app's keys, the middlewares (errors as
OpenAI-shaped JSON, bearer keys, body and concurrency limits, a stream that ended early) and the
runner's options.
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from aiohttp import web

from hera_core.config import HeraSettings
from hera_core.errors import HeraError
from hera_core.routing.runtime import Runtime
from hera_core.serving.openai_api import error_body, error_from_exception

log = logging.getLogger("hera_core.serving.server")

SETTINGS = web.AppKey("settings", HeraSettings)
RUNTIME = web.AppKey("runtime", Runtime)
STATE = web.AppKey("state", dict)
METRICS = web.AppKey("metrics", object)


class LocalQueueFull(HeraError):
    """More steps wait for the SLM than server.max_local_queue allows."""

    http_status = 429
    error_type = "rate_limit_error"


class StreamEnded(Exception):
    """A streamed answer that ended early (the client left, or an error was reported in the stream):
    its response, already sent, is the handler's result."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response


_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def json_error(status: int, message: str, type_: str | None = None, code: str | None = None,
                param: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(message, type_ or _STATUS_TYPES.get(status, "server_error"), code, param),
                             status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except HeraError as exc:
        status, body = error_from_exception(exc)
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        return web.json_response(body, status=status, headers=headers)
    except web.HTTPRequestEntityTooLarge as exc:
        return json_error(413, f"request body too large: {exc.text}", code="body_too_large")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_error(exc.status, exc.reason or exc.text or "error", code=f"http_{exc.status}")
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - the one place unexpected errors become a 500
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_error(500, "internal error; see the server log", "server_error")


def auth_middleware(keys: list[bytes]):
    @web.middleware
    async def auth(request: web.Request, handler):
        if keys and request.path != "/healthz":
            header = request.headers.get("Authorization", "")
            given = header[7:].encode() if header.startswith("Bearer ") else b""
            ok = False
            for key in keys:  # compare with every key, in constant time, so timing says nothing
                ok |= hmac.compare_digest(given, key)
            if not ok:
                return json_error(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                   code="invalid_api_key")
        return await handler(request)
    return auth


def limits_middleware(max_body: int, max_concurrency: int):
    @web.middleware
    async def limits(request: web.Request, handler):
        # Refuse an oversized body from its declared length, before reading any of it.
        if request.content_length is not None and request.content_length > max_body:
            return json_error(413, f"request body too large: {request.content_length} bytes, the limit is "
                                    f"{max_body} bytes", code="body_too_large")
        state = request.app[STATE]
        if state["in_flight"] >= max_concurrency:
            return json_error(429, f"server busy: {max_concurrency} requests in flight; retry shortly",
                               code="too_many_requests", headers={"Retry-After": "1"})
        state["in_flight"] += 1
        metrics = request.app[METRICS]
        metrics.in_flight.inc()
        try:
            return await handler(request)
        finally:
            state["in_flight"] -= 1
            metrics.in_flight.dec()
    return limits


@web.middleware
async def stream_end_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except StreamEnded as ended:
        return ended.response


def raise_open_files_limit(wanted: int) -> int:
    """Raise this process's soft limit on open files towards `wanted` (at most the hard limit, which
    an unprivileged user may reach): every connection in flight holds a socket to the client and one
    to the cloud, and distributions set the soft limit to 1024. Returns the soft limit now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


# aiohttp lets a handler run to its end after its client disconnected; with this a disconnect
# cancels the handler, so a local answer stops at its next chunk and the runtime books the step as
# cancelled. Pass to web.run_app / web.AppRunner.
RUNNER_OPTIONS = {"handler_cancellation": True}
