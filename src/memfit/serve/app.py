"""The OpenAI-compatible HTTP API (vLLM's conventions), on FastAPI: existing clients work unchanged.

    GET  /v1/models                 the base model and each adapter (an adapter names its `parent`)
    POST /v1/completions            {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stream"}
    POST /v1/chat/completions       {"model", "messages", ...}: the model's chat template
    POST /v1/load_lora_adapter      {"lora_name", "lora_path"}   } only with --allow-runtime-adapters
    POST /v1/unload_lora_adapter    {"lora_name"}                }
    GET  /health, GET /metrics      liveness and load; Prometheus text

`"model"` picks the base or an adapter per request; a name that is a subfolder of --adapter-dir loads on first use.
`"stream": true` answers with server-sent events (`data: {...}` lines, then `data: [DONE]`). Bad requests get a
4xx with an OpenAI-style error body ({"error": {"message", "type", "param", "code"}}), never a 5xx; a client that
goes away mid-stream frees its row and adapter slot at the next decode step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from memfit.errors import MemfitError
from memfit.serve.engine import Engine, SamplingParams
from memfit.serve.engine import Request as Generation
from memfit.serve.text import Decoder, chat_ids

MAX_TOKENS_DEFAULT = 16  # OpenAI's default for completions
CHAT_MAX_TOKENS = 256
IGNORED = {"user", "stream_options"}  # accepted and without effect on the result


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


def _error(e: BadRequest) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.status}}
    return JSONResponse(body, status_code=e.status)


@dataclass
class ServerState:
    engine: Engine
    tokenizer: Any
    base_name: str
    adapter_dir: Path | None = None
    allow_runtime_adapters: bool = False


# -- request fields ------------------------------------------------------------------------------------------------
def _number(body: dict, key: str, default: float, low: float | None = None, high: float | None = None,
            integer: bool = False) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise BadRequest(f"'{key}' must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}.", key)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise BadRequest(f"'{key}' must be {bounds}, got {value}.", key)
    return value


def _sampling(body: dict, max_key: str, default: int) -> SamplingParams:
    max_tokens = _number(body, max_key, default, low=1, integer=True)
    temperature = _number(body, "temperature", 1.0, low=0, high=2)
    top_p = _number(body, "top_p", 1.0, low=0, high=1)
    if top_p == 0:
        raise BadRequest("'top_p' must be above 0.", "top_p")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"'seed' must be an integer, got {json.dumps(seed)}.", "seed")
    return SamplingParams(max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), seed=seed)


def _check_fields(body: Any, allowed: set[str]) -> dict:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object.")
    unknown = sorted(set(body) - allowed - IGNORED)
    if unknown:
        raise BadRequest(f"unsupported parameter(s) {unknown}; this server takes {sorted(allowed)}.", unknown[0])
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported (one choice per request).", "n")
    for key in ("logprobs", "echo", "stop", "suffix", "logit_bias", "tools", "response_format"):
        if body.get(key) not in (None, False, [], {}):
            raise BadRequest(f"'{key}' is not supported by this server.", key)
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise BadRequest(f"'{key}' is not supported by this server (only 0).", key)
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest(f"'stream' must be true or false, got {json.dumps(body.get('stream'))}.", "stream")
    return body


COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stream", "n", "logprobs", "stop",
          "presence_penalty", "frequency_penalty", "logit_bias"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "tools", "response_format"}


def _prompt_text(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string (or a list of one string).", "prompt")
    if not prompt.strip():
        raise BadRequest("'prompt' is empty; send some text.", "prompt")
    return prompt


def _chat_ids(tokenizer: Any, body: dict) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {\"role\", \"content\"} objects.", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(
                m.get("content"), str):
            raise BadRequest(f"messages[{i}] must be {{\"role\": \"system\"|\"user\"|\"assistant\", \"content\": "
                             "string}.", "messages")
    try:
        return chat_ids(tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages])
    except MemfitError as e:
        raise BadRequest(str(e), "messages") from None


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="memfit", docs_url=None, redoc_url=None)
    engine, metrics = state.engine, state.engine.metrics

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, e: BadRequest) -> JSONResponse:
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(BadRequest(f"{request.method} {request.url.path}: {e.detail}", status=e.status_code,
                                 kind="not_found_error" if e.status_code == 404 else "invalid_request_error"))

    async def body_of(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON ({e}).") from None

    first_use = asyncio.Lock()  # two first requests for one --adapter-dir adapter load it once

    async def resolve_model(name: Any) -> str | None:
        """The adapter a request names (None: the base model); loads --adapter-dir subfolders on first use."""
        if not isinstance(name, str):
            raise BadRequest("'model' must be the name of the base model or of an adapter.", "model")
        if name == state.base_name:
            return None
        adapters = engine.adapters
        if adapters is not None and name in adapters.sources:
            return name
        folder = state.adapter_dir / name if state.adapter_dir is not None else None
        if adapters is not None and folder is not None and "/" not in name and name not in (".", "..") \
                and folder.is_dir():
            async with first_use:
                if name not in adapters.sources:
                    try:  # reading the adapter is file work: off the event loop
                        await asyncio.to_thread(adapters.add, name, folder)
                    except MemfitError as e:
                        raise BadRequest(str(e), "model") from None
            return name
        raise BadRequest(f"the model {name!r} does not exist; GET /v1/models lists what this server runs.", "model",
                         status=404, kind="not_found_error")

    async def run(ids: list[int], adapter: str | None, params: SamplingParams) -> tuple[Generation, asyncio.Queue]:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        generation = Generation(ids, params, adapter,
                                on_token=lambda t: loop.call_soon_threadsafe(queue.put_nowait, ("token", t)),
                                on_done=lambda r: loop.call_soon_threadsafe(queue.put_nowait, ("done", r)))
        try:
            engine.submit(generation)
        except MemfitError as e:
            raise BadRequest(str(e), "prompt" if "prompt" in str(e) else None) from None
        return generation, queue

    async def respond(body: dict, ids: list[int], chat: bool, max_key: str) -> Response:
        adapter = await resolve_model(body.get("model"))
        room = min(x for x in (engine.context, engine.kv_budget) if x is not None) - len(ids)
        # completions default to OpenAI's 16 tokens; a chat answer may run to what the context leaves (at most 256)
        params = _sampling(body, max_key, MAX_TOKENS_DEFAULT if not chat else max(1, min(CHAT_MAX_TOKENS, room)))
        generation, queue = await run(ids, adapter, params)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created, model = int(time.time()), body["model"]
        decoder = Decoder(state.tokenizer)
        usage = lambda n: {"prompt_tokens": len(ids), "completion_tokens": n,  # noqa: E731
                           "total_tokens": len(ids) + n}

        def chunk(text: str, finish: str | None) -> dict:
            choice = ({"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": finish} if chat
                      else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
            return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                    "model": model, "choices": [choice]}

        if body.get("stream"):
            async def events() -> AsyncIterator[str]:
                try:
                    while True:
                        kind, value = await queue.get()
                        if kind == "token":
                            text = decoder.push(value)
                            if text:
                                yield f"data: {json.dumps(chunk(text, None))}\n\n"
                        else:
                            if value.startswith("error"):
                                yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
                            else:
                                yield f"data: {json.dumps(chunk('', value))}\n\n"
                            yield "data: [DONE]\n\n"
                            return
                finally:
                    if generation.finish_reason is None:
                        engine.cancel(generation)  # the client went away: free its row and slot

            return StreamingResponse(events(), media_type="text/event-stream")
        try:
            while True:
                kind, value = await queue.get()
                if kind == "token":
                    decoder.push(value)
                else:
                    break
        except asyncio.CancelledError:
            engine.cancel(generation)
            raise
        if value.startswith("error"):
            raise BadRequest(value.removeprefix("error: "), "model")
        text = decoder.text
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": value} if chat
                  else {"index": 0, "text": text, "finish_reason": value, "logprobs": None})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": model, "choices": [choice],
                             "usage": usage(len(generation.generated))})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = _check_fields(await body_of(request), COMPLETION_FIELDS)
        ids = state.tokenizer(_prompt_text(body))["input_ids"]
        return await respond(body, list(ids), chat=False, max_key="max_tokens")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = _check_fields(await body_of(request), CHAT_FIELDS)
        max_key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        return await respond(body, _chat_ids(state.tokenizer, body), chat=True, max_key=max_key)

    @app.get("/v1/models")
    async def models() -> dict:
        created = int(time.time())
        data = [{"id": state.base_name, "object": "model", "created": created, "owned_by": "memfit",
                 "root": state.base_name, "parent": None}]
        adapters = engine.adapters
        for name in adapters.names() if adapters is not None else []:
            data.append({"id": name, "object": "model", "created": created, "owned_by": "memfit",
                         "root": str(adapters.sources[name]), "parent": state.base_name})
        return {"object": "list", "data": data}

    def runtime_adapters() -> None:
        if not state.allow_runtime_adapters or engine.adapters is None:
            raise BadRequest("loading adapters at run time is off; start the server with --allow-runtime-adapters.",
                             status=404, kind="not_found_error")

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request) -> PlainTextResponse:
        runtime_adapters()
        body = _check_fields(await body_of(request), {"lora_name", "lora_path"})
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str) or name == state.base_name:
            raise BadRequest("give 'lora_name' (a new name) and 'lora_path' (an adapter directory) as strings.")
        try:
            await asyncio.to_thread(engine.adapters.add, name, path)
        except MemfitError as e:
            raise BadRequest(str(e), "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request) -> PlainTextResponse:
        runtime_adapters()
        body = _check_fields(await body_of(request), {"lora_name", "lora_int_id"})
        try:
            engine.adapters.remove(body.get("lora_name"))
        except MemfitError as e:
            raise BadRequest(str(e), "lora_name", status=404, kind="not_found_error") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.get('lora_name')}' removed successfully.")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "running": len(engine.running), "waiting": len(engine.waiting)}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    return app
