"""`hera cloud-sim`: a GGUF model behind an OpenAI-compatible HTTP API on 127.0.0.1.

The stand-in for a cloud LLM in the demo, the tests and the offline benchmark: real model, real
HTTP. Point HERA_CLOUD_BASE_URL at a real provider and nothing else changes. Like a provider with
structured outputs, it answers a response_format (an object schema) under the schema's grammar.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web

from hera_core.backends.base import Engine
from hera_core.backends.structured import ResponseFormat, answer_from_call, answer_toolset
from hera_core.backends.tools import ToolSet
from hera_core.errors import HeraError, InvalidRequestError
from hera_core.serving.openai_api import (answer_choice, completion_chunks, completion_response, error_body,
                                          error_from_exception, parse_request)

log = logging.getLogger(__name__)
ENGINE_KEY = web.AppKey("engine", Engine)


async def _chat(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE_KEY]
    try:
        payload = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return web.json_response(error_body("body is not valid JSON", "invalid_request_error"), status=400)
    try:
        req = parse_request(payload)
        toolset = ToolSet.parse(payload.get("tools"), payload.get("tool_choice"), payload.get("parallel_tool_calls"))
        if req.n > 1:  # OpenAI's n: sampled choices, their prompt evaluated once
            if req.stream or toolset is not None:
                raise InvalidRequestError("n > 1 is answered without streaming and without tools")
            gens = await engine.generate_samples(req.plain_messages(), req.n, max_tokens=req.token_limit(512),
                                                 stop=req.stop_list(), **req.sampling())
            return web.json_response(completion_response(
                engine.name, answer_choice(gens[0].text, gens[0].finish_reason),
                (gens[0].prompt_tokens, sum(g.completion_tokens for g in gens)),
                more_choices=[(g.text, g.finish_reason) for g in gens[1:]]))
        fmt = ResponseFormat.parse(req.response_format)
        # A structured answer decodes as the forced call of its schema (an object schema, no tools
        # offered; otherwise unconstrained, as a provider without structured outputs would answer).
        answer_tools = answer_toolset(fmt) if fmt is not None and toolset is None else None
        tools = answer_tools or toolset
        asked = {"logprobs": (req.top_logprobs or 0)} if req.logprobs else {}  # an engine that reports them
        gen = await engine.generate(req.plain_messages(), max_tokens=req.token_limit(512), stop=req.stop_list(),
                                    **({"toolset": tools} if tools is not None else {}), **asked)
        if answer_tools is not None:
            gen = answer_from_call(gen)
    except HeraError as exc:
        status, body = error_from_exception(exc)
        return web.json_response(body, status=status)
    if req.stream:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in completion_chunks(model=engine.name, text=gen.text, finish_reason=gen.finish_reason,
                                       tool_calls=gen.tool_calls, logprobs=gen.extra.get("logprobs")):
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp
    return web.json_response(completion_response(
        engine.name, answer_choice(gen.text, gen.finish_reason, tool_calls=gen.tool_calls,
                                   logprobs=gen.extra.get("logprobs")),
        (gen.prompt_tokens, gen.completion_tokens)))


async def _models(request: web.Request) -> web.Response:
    name = request.app[ENGINE_KEY].name
    return web.json_response({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "hera-cloud-sim"}]})


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "model": request.app[ENGINE_KEY].name})


def create_app(engine: Engine) -> web.Application:
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app[ENGINE_KEY] = engine
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/healthz", _health)

    async def _close(app: web.Application) -> None:
        await app[ENGINE_KEY].close()

    app.on_cleanup.append(_close)
    return app
