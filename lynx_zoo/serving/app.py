"""The HTTP application (FastAPI): the OpenAI endpoints, health and info, the chat page and its example scenes."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from lynx_zoo.fusion.base import LynxModel
from lynx_zoo.generation import generation_settings
from lynx_zoo.serving.engine import Delta, Engine, Failed, Finished, Job, Overloaded
from lynx_zoo.serving.examples import example_scenes
from lynx_zoo.serving.media import MediaPolicy, load_media, reads_quickly
from lynx_zoo.serving.metrics import ServeMetrics
from lynx_zoo.serving.protocol import (
    RequestError,
    chunk_body,
    completion_body,
    completion_id,
    error_body,
    generation_for,
    parse_chat_request,
    usage,
)
from lynx_zoo.serving.settings import ServeSettings

STATIC = Path(__file__).parent / "static"
#: what answers without an API key: the health check, and the chat page's own files (which ask for the key)
PUBLIC_PATHS = ("/health", "/")
PUBLIC_PREFIXES = ("/static/",)


def authorized(header: str | None, keys: frozenset[str]) -> bool:
    """Whether an ``Authorization`` header carries one of ``keys`` as a bearer token (compared in constant time)."""
    if not header or not header.startswith("Bearer "):
        return False
    token = header.removeprefix("Bearer ").strip().encode()
    return any(hmac.compare_digest(token, key.encode()) for key in keys)


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request body as JSON, at most ``max_bytes`` long."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise RequestError("body", f"{declared} bytes, over the limit of {max_bytes} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestError("body", f"over the limit of {max_bytes} bytes", 413)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError("body", f"malformed JSON: {err}") from err


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind), status_code=status, headers=headers)


async def _events(job: Job) -> AsyncIterator[Delta | Finished | Failed]:
    """A request's events until all of its choices finished or it failed; if the client goes away, the engine
    is told to drop the request."""
    remaining = job.request.n
    try:
        while remaining:
            event = await job.events.get()
            yield event
            if isinstance(event, Failed):
                return
            remaining -= isinstance(event, Finished)
    finally:
        if remaining:
            job.cancelled = True


async def _complete(job: Job, request_id: str, model: str) -> JSONResponse:
    finished: dict[int, Finished] = {}
    async for event in _events(job):
        if isinstance(event, Failed):
            return _error(500, event.message, "server_error")
        if isinstance(event, Finished):
            finished[event.index] = event
    choices = [(finished[i].text, finished[i].finish_reason) for i in range(job.request.n)]
    completion_tokens = sum(f.completion_tokens for f in finished.values())
    return JSONResponse(completion_body(request_id, model, choices, job.prompt_tokens, completion_tokens))


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _stream(job: Job, request_id: str, model: str) -> AsyncIterator[str]:
    """Server-sent events in the OpenAI chunk format, ending with ``data: [DONE]``."""
    for index in range(job.request.n):
        yield _sse(chunk_body(request_id, model, index, {"role": "assistant", "content": ""}))
    completion_tokens = 0
    async for event in _events(job):
        if isinstance(event, Failed):
            yield _sse(error_body(event.message, "server_error"))
            return
        if isinstance(event, Delta):
            yield _sse(chunk_body(request_id, model, event.index, {"content": event.text}))
        elif isinstance(event, Finished):
            completion_tokens += event.completion_tokens
            yield _sse(chunk_body(request_id, model, event.index, {}, event.finish_reason))
    if job.request.include_usage:
        yield _sse(chunk_body(request_id, model, None, usage_info=usage(job.prompt_tokens, completion_tokens)))
    yield "data: [DONE]\n\n"


async def _timed(chunks: AsyncIterator[str], metrics: ServeMetrics) -> AsyncIterator[str]:
    """A stream's chunks; its latency (to the last chunk) goes to the metrics."""
    started = time.monotonic()
    async for chunk in chunks:
        yield chunk
    metrics.latency.observe(time.monotonic() - started)


def create_app(model: LynxModel, settings: ServeSettings, served_name: str) -> FastAPI:
    """The server of ``model`` (in eval mode, on its device) under the id ``served_name``."""
    metrics = ServeMetrics(queued=lambda: engine.queued, running=lambda: engine.running)
    engine = Engine(model, settings.max_batch_size, settings.max_wait_ms / 1000, settings.max_queue, metrics)
    keys = settings.api_keys()
    policy = MediaPolicy.from_settings(settings, model.vision_config.num_frames)
    defaults = generation_settings(settings.preset, model.eval_generation, {})
    scenes = example_scenes(model.vision_config.image_size)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.close)

    app = FastAPI(title=f"lynx_zoo: {served_name}", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics

    @app.middleware("http")
    async def require_key(request: Request, call_next: Any) -> Response:
        path = request.url.path
        if keys and path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
            if not authorized(request.headers.get("authorization"), keys):
                message = (
                    "Incorrect API key provided."
                    if request.headers.get("authorization")
                    else "You didn't provide an API key: send it as `Authorization: Bearer KEY`."
                )
                response = _error(401, message, "invalid_request_error", {"WWW-Authenticate": "Bearer"})
                if path == "/v1/chat/completions":
                    metrics.requests.labels("401").inc()
                return response
        started = time.monotonic()
        response = await call_next(request)
        if path == "/v1/chat/completions":
            metrics.requests.labels(str(response.status_code)).inc()
            if response.status_code == 200 and not isinstance(response, StreamingResponse):
                metrics.latency.observe(time.monotonic() - started)
        return response

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, err: Overloaded) -> JSONResponse:
        return _error(503, str(err), "server_overloaded", {"Retry-After": str(err.retry_after)})

    def model_card() -> dict[str, Any]:
        return {"id": served_name, "object": "model", "created": created, "owned_by": "lynx_zoo"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != served_name:
            raise RequestError("model", f"model {model_id!r} is not served here", 404, "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json(request, settings.max_request_bytes)
        chat = parse_chat_request(body, served_name, settings)
        generation = generation_for(chat, defaults)
        engine.check_capacity()  # before reading any media
        media = None
        if chat.media is not None and reads_quickly(chat.media):
            media = load_media(chat.media, policy, model.processor.image_transform)
        elif chat.media is not None:
            media = await run_in_threadpool(load_media, chat.media, policy, model.processor.image_transform)
        job = Job(chat, media, generation, asyncio.get_running_loop())
        engine.submit(job)
        request_id = completion_id()
        if chat.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(
                _timed(_stream(job, request_id, served_name), metrics), media_type="text/event-stream", headers=headers
            )
        try:
            return await _complete(job, request_id, served_name)
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = engine.stats
        return {
            "status": "ok",
            "model": served_name,
            "queued": engine.queued,
            "requests": stats.requests,
            "running": engine.running,
            "steps": stats.steps,
            "mean_step_rows": round(stats.mean_step_rows, 3),
            "step_rows": {str(k): v for k, v in sorted(stats.step_rows.items())},
            "recent_step_seconds": round(stats.step_seconds, 5),
            "prefill_sizes": {str(k): v for k, v in sorted(stats.prefill_sizes.items())},
            "batches": stats.batches,
            "failed_batches": stats.failed_batches,
            "dropped_sequences": stats.dropped_sequences,
            "largest_batch": stats.largest_batch,
            "batch_sizes": {str(k): v for k, v in sorted(stats.batch_sizes.items())},
            "recent_batch_seconds": round(stats.batch_seconds, 4),
        }

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus' text format: requests, tokens, queue length, batch occupancy, latency histograms."""
        return Response(metrics.exposition(), media_type=metrics.content_type)

    @app.get("/info")
    async def info() -> dict[str, Any]:
        """What the chat page shows and offers."""
        return {
            "model": served_name,
            "fusion": type(model).__name__,
            "video": model.vision_config.num_frames > 0,
            "num_frames": model.vision_config.num_frames,
            "image_size": model.vision_config.image_size,
            "generation": {k: v for k, v in defaults.items() if isinstance(v, (int, float, str, bool))},
            "max_batch_size": settings.max_batch_size,
            "examples": [{"name": s.name, "url": f"/examples/{s.name}.png", "questions": s.questions} for s in scenes],
        }

    @app.get("/examples/{name}.png")
    async def example(name: str) -> Response:
        for scene in scenes:
            if scene.name == name:
                return Response(scene.png, media_type="image/png")
        return _error(404, f"no example scene {name!r}", "not_found")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
