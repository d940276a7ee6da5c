"""`hera serve`: an OpenAI-compatible hybrid endpoint. Point any agent framework's base URL here.

Model `hera` (or `hera:<threshold>`) is routed per step between the local SLM and the cloud;
any other model name passes straight through to the cloud. Each routed response says what
happened: headers `x-hera-route`, `x-hera-cost-usd`, `x-hera-p-local`.

Built by `create_app(settings)`: the runtime (engines, ledger, HTTP client) is opened by the
app's cleanup context when the server starts and closed when it stops; nothing runs at import.
All errors leave as OpenAI-shaped JSON (`{"error": {message, type, param, code}}`), translated in
one middleware (`hera_core.serving.http`, with the auth and limits ones); a client's mistake is a
4xx, never a 500.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from hera_core.config import HeraSettings
from hera_core import wirejson
from hera_core.errors import FieldError, HeraError, InvalidRequestError
from hera_core.serving.http import (METRICS, RUNTIME, SETTINGS, STATE, LocalQueueFull, StreamEnded, auth_middleware,
                                    error_middleware, limits_middleware, stream_end_middleware)
from hera_core.serving.metrics import Metrics
from hera_core.serving.openai_api import (FIELDS, ChatCompletionRequest, Handling, answer_choice, completion_response,
                                          error_from_exception, parse_request, tool_call_deltas)
from hera_core.routing.policy import Decision, Override, Route
from hera_core.routing.runtime import Runtime
from hera_core.routing.step import ResponseFormat, StepRequest, SubtaskResult, ToolSet, step_index

log = logging.getLogger(__name__)

# --- request helpers -------------------------------------------------------------------------------
def _session_of(request: web.Request, messages: list[dict[str, Any]]) -> str:
    """X-Hera-Session, else a hash of the conversation's opening (system + first user turn)."""
    explicit = request.headers.get("X-Hera-Session")
    if explicit:
        if len(explicit) > 200:
            raise InvalidRequestError("X-Hera-Session must be at most 200 characters")
        return explicit
    opening = []
    for m in messages:
        opening.append({"role": m.get("role"), "content": m.get("content")})
        if m.get("role") == "user":
            break
    return "auto-" + hashlib.sha256(wirejson.dumps(opening, sort_keys=True)).hexdigest()[:16]


def _override_of(request: web.Request) -> Override:
    value = request.headers.get("X-Hera-Policy", "auto").strip().lower()
    try:
        return Override(value)
    except ValueError:
        raise InvalidRequestError(f"X-Hera-Policy must be one of {', '.join(o.value for o in Override)}, "
                                  f"got {value!r}") from None


def _trace_of(request: web.Request) -> bool:
    """X-Hera-Trace: off keeps a request out of the learning loop (no shadow draft, audit or trace)."""
    value = request.headers.get("X-Hera-Trace", "on").strip().lower()
    if value not in ("on", "off"):
        raise InvalidRequestError(f"X-Hera-Trace must be 'on' or 'off', got {value!r}")
    return value == "on"


def _routed_threshold(model: str) -> tuple[bool, float | None]:
    """('hera' -> routed by the predictor's threshold); ('hera:0.7' -> routed, fixed 0.7); other -> pass-through."""
    if model == "hera":
        return True, None
    if model.startswith("hera:"):
        try:
            t = float(model[5:])
        except ValueError:
            t = -1.0
        if not 0.0 <= t <= 1.0:
            raise InvalidRequestError(f"model {model!r}: the threshold after 'hera:' must be a number in [0, 1]")
        return True, t
    return False, None


def _text_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages with list-of-parts text content flattened to strings (the SLM's chat template wants text)."""
    out = []
    for m in req.plain_messages():
        if isinstance(m.get("content"), list):
            m = {**m, "content": "".join(p.get("text", "") for p in m["content"] if p.get("type") == "text")}
        out.append(m)
    return out


def _decision_headers(decision: Decision) -> dict[str, str]:
    h = {"x-hera-route": decision.route.value, "x-hera-reason": decision.reason}
    if decision.p_local is not None:
        h["x-hera-p-local"] = f"{decision.p_local:.4f}"
    return h


# --- handlers ----------------------------------------------------------------------------------------
@dataclass
class RoutedCall:
    """A validated request to model `hera`, ready for the runtime (chat completions and the
    Responses API both end here)."""

    req: ChatCompletionRequest
    step: StepRequest  # what the runtime is asked (its messages: text only)
    needs_slm: bool  # the step may use the SLM (it takes a place in the local queue)

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.step.messages

    @property
    def session(self) -> str:
        return self.step.session


def _decoded_json(raw: bytes) -> Any:
    try:
        return wirejson.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequestError("request body is not valid JSON") from None


def prepare_routed(request: web.Request, payload: dict[str, Any], req: ChatCompletionRequest,
                   fixed_threshold: float | None) -> RoutedCall:
    """A routed request's fields, as the field table (openai_api.FIELDS) says, turned into the
    runtime's step request: honoured fields become parameters, cloud-only ones send the step to the
    cloud (the first one named as the reason), forwarded ones travel with a cloud step."""
    settings = request.app[SETTINGS]
    max_tokens = req.token_limit(settings.max_tokens)
    if max_tokens > settings.server.max_tokens_cap:
        raise FieldError(f"max_tokens {max_tokens} exceeds this server's cap of {settings.server.max_tokens_cap}",
                         "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
    fmt = ResponseFormat.parse(req.response_format)
    if req.n > 1 and (req.stream or req.tools):  # never fewer choices than asked for, silently
        raise FieldError(f"n = {req.n}: model 'hera' samples several choices without streaming and "
                         "without tools; send stream = false and no tools, or n = 1", "n")
    if req.n > 1 and (fmt is not None or req.logprobs):
        raise FieldError(f"n = {req.n}: model 'hera' answers response_format and logprobs with one choice; "
                         "send n = 1", "n")
    if req.top_logprobs and not req.logprobs:
        raise FieldError("top_logprobs needs logprobs: true", "top_logprobs")
    messages = _text_messages(req)
    try:
        toolset = ToolSet.parse(req.tools, req.tool_choice, req.parallel_tool_calls)
    except FieldError:
        raise
    except InvalidRequestError as exc:
        raise FieldError(str(exc), "tools") from None
    local_can_serve = not req.has_non_text_content()
    cloud_extra = {k: v for k, v in payload.items()
                   if FIELDS[k].handling in (Handling.CLOUD, Handling.FORWARDED) and v is not None}
    cloud_only = req.cloud_only_fields()
    override = _override_of(request)
    sampling = req.sampling() if req.n > 1 or req.sampled() else None
    if req.n == 1 and sampling is not None:  # one sampled answer: the cloud gets its parameters, the SLM samples
        cloud_extra.update({k: v for k, v in sampling.items() if v is not None})
    if req.logprobs:  # honoured on both routes: the cloud is asked for them too
        cloud_extra.update({"logprobs": True, **({"top_logprobs": req.top_logprobs} if req.top_logprobs else {})})
    step = StepRequest(messages, _session_of(request, messages), max_tokens=max_tokens, stop=req.stop_list(),
                       override=override, local_can_serve=local_can_serve, threshold=fixed_threshold,
                       toolset=toolset, trace=_trace_of(request), response_format=fmt,
                       logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                       cloud_reason=cloud_only[0] if cloud_only else None, cloud_extra=cloud_extra or None,
                       samples=req.n, sampling=sampling)  # n > 1: n choices on the route taken, the prompt paid once
    needs_slm = override is not Override.CLOUD_ONLY and local_can_serve and not cloud_only
    return RoutedCall(req, step, needs_slm)


async def run_routed(request: web.Request, call: RoutedCall, **callbacks) -> "SubtaskResult":
    """Runtime.complete for a prepared call, with the local queue's bound and the metrics;
    `callbacks`: on_text, on_decision (a streamed answer)."""
    settings, rt, state = request.app[SETTINGS], request.app[RUNTIME], request.app[STATE]
    if call.needs_slm and state["slm_waiting"] >= settings.server.max_local_queue:
        raise LocalQueueFull(f"the local SLM queue is full ({settings.server.max_local_queue} waiting); retry shortly")
    metrics = request.app[METRICS]
    t0 = time.perf_counter()
    if call.needs_slm:
        state["slm_waiting"] += 1
    try:
        result = await rt.run_step(dataclasses.replace(call.step, **callbacks) if callbacks else call.step)
    finally:
        if call.needs_slm:
            state["slm_waiting"] -= 1
    gen = result.generation
    metrics.observe_step(result.route.value, time.perf_counter() - t0, gen.prompt_tokens, gen.completion_tokens,
                         result.cost_usd, result.cloud_cost_usd)
    return result


def hera_fields(rt: Runtime, result: "SubtaskResult", session: str) -> dict[str, Any]:
    """The `hera` object of a routed response: how the step was routed and what it cost."""
    return {"route": result.route.value, "reason": result.decision.reason, "p_local": result.decision.p_local,
            "threshold": result.decision.threshold, "step": result.step, "session": session,
            "cost_usd": result.cost_usd, "cloud_cost_usd": result.cloud_cost_usd,
            "predictor_version": rt.predictor_version}


def routed_headers(result: "SubtaskResult", session: str) -> dict[str, str]:
    headers = _decision_headers(result.decision)
    headers["x-hera-cost-usd"] = f"{result.cost_usd:.8f}"
    headers["x-hera-session"] = session
    return headers


async def chat_completions(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    payload = _decoded_json(await request.read())
    if not isinstance(payload, dict):
        raise InvalidRequestError("request body must be a JSON object")
    model = payload.get("model")
    routed, fixed_threshold = _routed_threshold(model) if isinstance(model, str) else (True, None)
    req = parse_request(payload, routed=routed)
    if not routed:
        max_tokens = req.token_limit(request.app[SETTINGS].max_tokens)
        if max_tokens > request.app[SETTINGS].server.max_tokens_cap:
            raise InvalidRequestError(f"max_tokens {max_tokens} exceeds this server's cap of "
                                      f"{request.app[SETTINGS].server.max_tokens_cap}")
        return await _passthrough(request, payload, req)
    call = prepare_routed(request, payload, req, fixed_threshold)
    if req.stream:
        return await _stream_routed(request, rt, call)
    result = await run_routed(request, call)
    gen, session = result.generation, call.session
    message_fields = {k: v for k, v in (gen.extra.get("message") or {}).items()
                      if k not in ("role", "content", "tool_calls")}
    choice = answer_choice(gen.text, gen.finish_reason, tool_calls=gen.tool_calls, message_fields=message_fields,
                           logprobs=gen.extra.get("logprobs") if req.logprobs else None)
    body = completion_response(gen.model, choice, (gen.prompt_tokens, gen.completion_tokens),
                               more_choices=[(g.text, g.finish_reason) for g in result.samples[1:]],
                               id=f"chatcmpl-hera-{result.ledger_id}", extra={"hera": hera_fields(rt, result, session)})
    return web.Response(body=wirejson.dumps(body), content_type="application/json",
                        headers=routed_headers(result, session))


async def stream_while_routed(response: web.StreamResponse, start: Callable[[Callable[[str], None]], Awaitable[Any]],
                              write_delta: Callable[[str], Awaitable[None]],
                              write_error: Callable[[HeraError], Awaitable[None]]) -> Any:
    """Run a routed step (`start(on_text)`) while its text deltas stream to the client in order
    (`write_delta`), and return its result once every delta is written. A failed write means the
    client left: the step is stopped (a local one at its next chunk; the runtime books it as
    cancelled). A HeraError after the headers went out is reported in the stream (`write_error`)."""
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def writer() -> None:
        while (delta := await queue.get()) is not None:
            await write_delta(delta)

    writer_task = asyncio.create_task(writer())
    work = asyncio.create_task(start(queue.put_nowait))

    def client_gone(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            work.cancel()

    writer_task.add_done_callback(client_gone)
    try:
        result = await work
    except asyncio.CancelledError:
        client_left = work.cancelled() and writer_task.done() and not writer_task.cancelled()
        writer_task.cancel()
        if client_left:
            raise StreamEnded(response) from None  # nobody to answer
        raise
    except HeraError as exc:
        writer_task.cancel()
        if not response.prepared:
            raise
        await write_error(exc)
        raise StreamEnded(response) from None
    queue.put_nowait(None)
    await writer_task
    return result


async def _stream_routed(request: web.Request, rt: Runtime, call: RoutedCall) -> web.StreamResponse:
    """Server-sent events in OpenAI's chunk format; headers go out once the route is decided.
    Logprobs (a cloud answer's) follow the text in one chunk; stream_options.include_usage adds
    OpenAI's last chunk with empty choices and the usage."""
    cid, created = f"chatcmpl-hera-{time.time_ns()}", int(time.time())
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    model_name = {"name": ""}
    session = call.session

    def chunk(delta: dict, finish: str | None = None, logprobs: Any = None, **extra) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = logprobs
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name["name"],
                "choices": [choice], **extra}
        return f"data: {json.dumps(body)}\n\n".encode()

    async def on_decision(decision: Decision) -> None:
        model_name["name"] = rt.model_name(decision.route)
        response.headers.update(_decision_headers(decision))
        response.headers["x-hera-session"] = session
        await response.prepare(request)
        await response.write(chunk({"role": "assistant", "content": ""}))

    async def write_error(exc: HeraError) -> None:  # headers are gone: report in the stream
        status, body = error_from_exception(exc)
        await response.write(f"data: {json.dumps(body)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")

    result = await stream_while_routed(
        response, lambda on_text: run_routed(request, call, on_text=on_text, on_decision=on_decision),
        write_delta=lambda delta: response.write(chunk({"content": delta})), write_error=write_error)
    gen = result.generation
    if call.req.logprobs and gen.extra.get("logprobs"):
        await response.write(chunk({}, logprobs=gen.extra["logprobs"]))
    for delta in tool_call_deltas(gen.tool_calls):
        await response.write(chunk(delta))
    usage = {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
             "total_tokens": gen.prompt_tokens + gen.completion_tokens}
    await response.write(chunk({}, "tool_calls" if gen.tool_calls else gen.finish_reason, usage=usage,
                               hera={"route": result.route.value, "cost_usd": result.cost_usd,
                                     "p_local": result.decision.p_local}))
    if call.req.stream_options is not None and call.req.stream_options.include_usage:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name["name"],
                "choices": [], "usage": usage}
        await response.write(f"data: {json.dumps(body)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _passthrough(request: web.Request, payload: dict[str, Any], req: ChatCompletionRequest):
    """Any model other than hera*: forwarded as is to the cloud by the runtime, which budgets and
    books it like any cloud step."""
    rt = request.app[RUNTIME]
    messages = req.plain_messages()
    where = dict(session=_session_of(request, messages), step=step_index(messages))
    metrics = request.app[METRICS]
    headers = {"x-hera-route": "cloud", "x-hera-reason": "passthrough"}
    if req.stream:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               **headers})
        async for chunk in rt.passthrough_stream(payload, **where):
            if not response.prepared:
                await response.prepare(request)
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if not response.prepared:
            await response.prepare(request)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        metrics.requests.labels("cloud", "ok").inc()
        return response
    data, cost = await rt.passthrough(payload, **where)
    metrics.requests.labels("cloud", "ok").inc()
    return web.json_response(data, headers={**headers, "x-hera-cost-usd": f"{cost:.8f}"})


async def list_models(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    ids = ["hera", rt.model_name(Route.CLOUD), rt.model_name(Route.LOCAL)]
    return web.json_response({"object": "list", "data": [{"id": i, "object": "model", "owned_by": "hera"} for i in ids]})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics_endpoint(request: web.Request) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    rt = request.app[RUNTIME]
    request.app[METRICS].observe_cache(rt.cache_stats())  # read when scraped, not per request
    if rt.learning is not None:
        request.app[METRICS].observe_learning(rt.learning.status())
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def learning_endpoint(request: web.Request) -> web.Response:
    """The learning loop (docs/learning.md): versions, labels, audited agreement, events; what
    `hera learn status` prints for a folder."""
    rt = request.app[RUNTIME]
    if rt.learning is None:
        return web.json_response({"enabled": False, "predictor_version": rt.predictor_version,
                                  "hint": "set learning.shadow = true (or HERA_LEARNING_SHADOW=true) to learn from traffic"})
    return web.json_response({"enabled": True, "predictor_version": rt.predictor_version,
                              **await asyncio.to_thread(rt.learning.status)})


async def ledger_endpoint(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    run = request.query.get("run", rt.run)
    totals = rt.ledger.totals(run)
    return web.json_response({"run": run, "totals": totals, "nodes": rt.ledger.per_node(run),
                              "sessions": rt.ledger.sessions(run)[-200:],
                              "saving_vs_all_cloud": (totals["saving_usd"] / totals["all_cloud_cost_usd"])
                              if totals["all_cloud_cost_usd"] else 0.0})


def create_app(settings: HeraSettings, *, runtime: Runtime | None = None) -> web.Application:
    """The HERA server. Without `runtime`, one is opened from `settings` when the app starts."""
    keys = [k.get_secret_value().encode() for k in settings.server.api_keys]
    app = web.Application(client_max_size=settings.server.max_body_bytes, middlewares=[
        error_middleware, stream_end_middleware, auth_middleware(keys),
        limits_middleware(settings.server.max_body_bytes, settings.server.max_concurrency)])
    app[SETTINGS] = settings
    app[STATE] = {"in_flight": 0, "slm_waiting": 0}
    app[METRICS] = Metrics()
    if runtime is not None:
        app[RUNTIME] = runtime
    else:
        app.cleanup_ctx.append(_runtime_context)
    app.router.add_post("/v1/chat/completions", chat_completions)
    from hera_core.serving import responses  # (it builds on this module's handlers)

    responses.add_routes(app)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", health)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/v1/hera/ledger", ledger_endpoint)
    app.router.add_get("/v1/hera/learning", learning_endpoint)
    return app


async def _runtime_context(app: web.Application):
    from hera_core.serving.assembly import open_runtime

    async with open_runtime(app[SETTINGS], run="serve") as rt:
        app[RUNTIME] = rt
        yield
