"""The app factory: `create_app(settings)` wires settings, engine, routes and error handlers."""

import asyncio
import collections
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.api import errors
from service.api.auth import ApiKeyAuth
from service.api.gate import DecodeGate, EarlyAdmission
from service.api.limits import BodySizeLimit
from service.api.observe import RequestObserver
from service.api.routes import health, metrics, models, page, realtime, stream, transcriptions
from service.engine.registry import Engines
from service.errors import StartupError
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


def _document_errors_as_served(app: FastAPI) -> None:
    """Drop FastAPI's default 422 from the OpenAPI document: validation errors are 400s here,
    in the one error shape, and are documented as such on every route."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


class StartupAborted(RuntimeError):
    """The app could not start; the reason has been logged in one line (`startup_problem`)."""


def startup_problem(exc: BaseException, settings: Settings) -> str:
    """One line for a person: what failed, why, and what to do about it."""
    if isinstance(exc, StartupError):  # its message already names the missing piece and the fix
        return str(exc)
    source = ", ".join(e.model for e in settings.models) if settings.models else settings.model_dir
    if isinstance(exc, MemoryError):
        return (
            f"loading {source} ran out of memory; fewer workers (--cpu-workers 1) "
            "or a smaller model"
        )
    return (
        f"loading {source} failed with {type(exc).__name__}: {exc}; check that the "
        "folder holds a complete checkpoint (--model-dir / STT_MODEL_DIR); run with "
        "--log-level debug for the traceback"
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. The model loads in the lifespan; `/ready` is 503 until it has warmed up."""
    settings = settings or Settings()
    # several models: every metric labelled by model; what belongs to none has model=""
    app_metrics = Metrics(by_model=bool(settings.models)).for_model("")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app_metrics.bind_loop(asyncio.get_running_loop())
        try:
            engines = await asyncio.to_thread(Engines.load, settings, app_metrics)
        except Exception as exc:
            log.critical("cannot start: %s", startup_problem(exc, settings))
            log.debug("start-up failed", exc_info=True)
            raise StartupAborted(str(exc)) from exc
        engines.start()
        app.state.engines = engines
        app.state.engine = engines.default
        for engine in engines:
            log.info(
                "ready: serving %s on %d worker(s)",
                engine.settings.served_name,
                len(engine.pool.workers),
            )
        try:
            yield
        finally:
            await asyncio.to_thread(engines.stop)

    app = FastAPI(
        title="speech-serve",
        summary="OpenAI-compatible speech-to-text for speech encoder-decoder models",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = None  # the default model's engine (`engines.default`)
    app.state.engines = None  # every model's engine, by served name (service/engine/registry.py)
    app.state.metrics = app_metrics
    app.state.streams = 0  # open websocket sessions
    app.state.streams_by_client = collections.Counter()  # the same, per client (stream.client_of)
    cores = os.cpu_count() or 1
    app.state.decode_gate = DecodeGate(
        slots=cores,
        # uploads waiting for a decode slot: two batches' worth keep the decoders and the
        # batches full; more would only be decoded after their deadline's share is spent
        # (measured: under a 4x burst, an unbounded wait let the decoders spend more than the
        # workers on uploads that then missed their deadline: 504s, goodput 25% of capacity)
        waiting=min(settings.max_queue_size, max(2 * settings.max_batch_size, 16)),
        large_slots=max(1, cores // 2),  # slow files: at most half the cores
        metrics=app_metrics,
    )
    errors.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(EarlyAdmission)  # overload refused before the body is read
    # keys are checked before the body is read (an unauthenticated upload costs nothing)
    app.add_middleware(ApiKeyAuth, keys=settings.keys(), public_metrics=settings.public_metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "X-Request-ID", "Content-Type"],
            expose_headers=["X-Request-ID", "Retry-After", "Server-Timing"],
        )
    # outermost: sees every answer, the body-size limit's 413 included
    app.add_middleware(
        RequestObserver,
        metrics=app_metrics,
        paths=lambda: app.openapi()["paths"],
        log_transcripts=settings.log_transcripts,
    )
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(models.router)
    app.include_router(transcriptions.router)
    app.include_router(stream.router)
    app.include_router(realtime.router)
    app.include_router(page.router)  # GET /: the browser page (service/api/static)
    _document_errors_as_served(app)
    return app
