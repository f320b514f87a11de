"""`/v1/audio/stream`: live transcription over a websocket (protocol in the README).

The route owns the connection: limits (sessions, frame size, idle time, session length), the
configuration handshake, and turning bad client messages into `error` events. The session
(`service.streaming.session`) owns the audio and the transcripts.
"""

import asyncio
import collections
import contextlib
import json
import logging
import time
import uuid
from typing import Any

from fastapi import APIRouter, WebSocket
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from service.api.observe import facts
from service.api.requests import check_caps, check_model
from service.engine.engine import Engine
from service.engine.registry import Engines
from service.engine.types import GenerationParams
from service.errors import InvalidRequest, ServiceError, error_event
from service.metrics import Metrics
from service.settings import Settings
from service.streaming.pcm import BadFrame
from service.streaming.session import StreamConfig, StreamSession, utterance_seconds
from service.streaming.vad import make_endpointer

router = APIRouter()
log = logging.getLogger("service.stream")

TRY_AGAIN_LATER = 1013  # RFC 6455 close codes
POLICY = 1008
TOO_BIG = 1009


class _Close(Exception):
    """End the session with this close code and reason (after flushing finals if asked)."""

    def __init__(self, code: int, reason: str, flush: bool = True) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.flush = flush


class _Connection:
    """One websocket: sends serialised (the session sends from its own task)."""

    def __init__(self, websocket: WebSocket, request_id: str) -> None:
        self.websocket = websocket
        self.request_id = request_id
        self.lock = asyncio.Lock()

    async def error(self, code: str, message: str, param: str | None = None) -> None:
        """An `error` event for a bad client message; the session goes on."""
        await self.send(
            error_event(InvalidRequest(message, code=code, param=param), self.request_id)
        )

    async def send(self, event: dict[str, object]) -> None:
        async with self.lock:
            await self.websocket.send_text(json.dumps(event))

    async def close(self, code: int, reason: str) -> None:
        if self.websocket.client_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.websocket.close(code, reason)


def client_of(websocket: WebSocket) -> str:
    """Who opened the session, for the per-client limit: the API key it presented (as a digest,
    set by `ApiKeyAuth`), else its address."""
    client_id = websocket.scope.get("state", {}).get("client_id")
    if isinstance(client_id, str):
        return client_id
    address = websocket.scope.get("client")
    return f"addr:{address[0] if address else 'unknown'}"


def _query_config(websocket: WebSocket) -> dict[str, object] | None:
    """Configuration from the query string, or None when the client will send a config message."""
    query: dict[str, object] = {
        k: v for k, v in websocket.query_params.items() if k in StreamConfig.model_fields
    }
    return query or None


def _params(config: StreamConfig, engine: Engine, settings: Settings) -> GenerationParams:
    """The session's decoding parameters, checked by the same code and caps as an upload's."""
    check_caps(settings, num_beams=config.num_beams, max_new_tokens=config.max_new_tokens)
    check_model(engine, settings, config.model, config.language, None)
    if config.max_utterance_seconds > settings.max_audio_seconds:
        raise InvalidRequest(
            f"max_utterance_seconds is {config.max_utterance_seconds:g}; the limit is "
            f"{settings.max_audio_seconds:g}",
            param="max_utterance_seconds",
        )
    params = GenerationParams(
        task=config.task,
        language=config.language,
        num_beams=config.num_beams,
        max_new_tokens=config.max_new_tokens
        or min(settings.max_new_tokens, engine.adapter.default_max_new_tokens),
    )
    engine.adapter.validate(params)
    return params


def release_slot(app: Any, metrics: Metrics, client: str, reason: str) -> None:
    """Give back a session's slot (both websocket routes): the total, the client's share, and
    the gauges."""
    app.state.streams -= 1
    per_client: collections.Counter[str] = app.state.streams_by_client
    per_client[client] -= 1
    if per_client[client] <= 0:
        del per_client[client]
    metrics.streams_active.dec()
    metrics.streams_closed.labels(reason=reason).inc()


@router.websocket("/v1/audio/stream")
async def stream(websocket: WebSocket) -> None:
    app = websocket.app
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    engines: Engines | None = app.state.engines
    request_id = facts(websocket.scope).request_id
    connection = _Connection(websocket, request_id)
    await websocket.accept(headers=[(b"x-request-id", request_id.encode())])
    if engines is None or not engines.ready:
        metrics.rejections.labels(reason="unavailable").inc()
        await connection.close(TRY_AGAIN_LATER, "the model is not ready")
        return
    if app.state.streams >= settings.max_streams:
        metrics.rejections.labels(reason="too_many_streams").inc()
        await connection.close(TRY_AGAIN_LATER, f"at most {settings.max_streams} streams")
        return
    client = client_of(websocket)
    per_client: collections.Counter[str] = app.state.streams_by_client
    if per_client[client] >= settings.max_streams_per_client:
        metrics.rejections.labels(reason="too_many_streams_per_client").inc()
        with contextlib.suppress(Exception):
            await connection.error(
                "too_many_streams", f"at most {settings.max_streams_per_client} streams per client"
            )
        await connection.close(
            TRY_AGAIN_LATER, f"at most {settings.max_streams_per_client} streams per client"
        )
        return
    app.state.streams += 1
    per_client[client] += 1
    metrics.streams_active.inc()
    metrics.streams_opened.inc()
    started = time.monotonic()
    reason = "error"
    session: StreamSession | None = None
    try:
        query = _query_config(websocket)
        if query is not None:
            session = await _configure(query, engines, settings, metrics, connection)
        reason = await _serve(websocket, connection, session, engines, settings, metrics, started)
    finally:
        release_slot(app, metrics, client, reason)
        log.info(
            "stream closed",
            extra={
                "fields": {
                    "request_id": request_id,
                    "reason": reason,
                    "duration_s": round(time.monotonic() - started, 2),
                }
            },
        )


async def _configure(
    raw: dict[str, object],
    engines: Engines,
    settings: Settings,
    metrics: Metrics,
    connection: _Connection,
) -> StreamSession | None:
    """A session from a config, or None after an `error` event naming what is wrong.

    The config's `model` picks the engine (none: the default), looked up once here: the session
    talks to that engine alone, with that model's settings. An unknown one is an
    `invalid_config` error event with `param: model` (as every refused config field is).
    """
    try:
        config = StreamConfig.model_validate(raw)
        engine = engines.get(config.model)
        settings = engine.settings
        metrics = engine.metrics  # this model's latencies (the same object with one model)
        params = _params(config, engine, settings)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        await connection.error("invalid_config", f"{where}: {first['msg']}", param=where)
        return None
    except ValueError as exc:
        await connection.error("invalid_config", str(exc))
        return None
    except ServiceError as exc:  # e.g. Unsupported: this model cannot translate
        await connection.error("invalid_config", exc.message, param=exc.param)
        return None
    vad = config.vad or settings.stream_vad
    endpointer = None
    if vad == "silero":  # loading a model may block: off the loop
        try:
            endpointer = await asyncio.to_thread(
                make_endpointer,
                "silero",
                engine.info.sampling_rate,
                threshold=config.vad_threshold,
                silence_ms=config.silence_duration_ms,
                max_utterance_seconds=utterance_seconds(config, engine),
            )
        except ValueError as exc:
            await connection.error("invalid_config", f"vad: {exc}", param="vad")
            return None
    session = StreamSession(
        engine,
        config,
        params,
        connection.send,
        metrics,
        request_id=connection.request_id,
        endpointer=endpointer,
    )
    effective = config.model_dump()
    effective["model"] = config.model or settings.served_name
    effective["vad"] = vad
    await connection.send(
        {"type": "session.created", "session_id": uuid.uuid4().hex, "config": effective}
    )
    return session


async def _serve(
    websocket: WebSocket,
    connection: _Connection,
    session: StreamSession | None,
    engines: Engines,
    settings: Settings,
    metrics: Metrics,
    started: float,
) -> str:
    """Read client messages until the stream ends; returns the reason it ended.

    Three clocks can end it: the session's length, the configuration time (a session must be
    configured within `stream_config_timeout_s`) and the idle time, which only audio (and the
    configuration itself) resets: a client sending bad messages holds no slot for long.
    """
    audio_started = False
    ends_at = started + settings.max_stream_seconds
    configure_by = started + settings.stream_config_timeout_s
    active_at = started
    try:
        while True:
            now = time.monotonic()
            if now >= ends_at:
                raise _Close(POLICY, "the session reached its maximum length")
            if session is None and now >= configure_by:
                raise _Close(
                    POLICY, f"no valid config within {settings.stream_config_timeout_s:g} s"
                )
            if now >= active_at + settings.stream_idle_timeout_s:
                raise _Close(POLICY, "idle timeout: no audio received")
            limit = min(ends_at, active_at + settings.stream_idle_timeout_s)
            if session is None:
                limit = min(limit, configure_by)
            try:
                message = await asyncio.wait_for(websocket.receive(), limit - now)
            except TimeoutError:
                continue  # the checks above name the clock that ran out
            if message["type"] == "websocket.disconnect":
                if session is not None:
                    await session.abort()
                return "client_gone"
            if session is not None and session.task.done():  # the session failed (send error)
                session.task.result()
            data = message.get("bytes")
            if data is not None:
                if len(data) > settings.max_frame_bytes:
                    raise _Close(TOO_BIG, f"frame over the {settings.max_frame_bytes}-byte limit")
                if session is None:
                    await connection.error("config_required", "send a config message before audio")
                    continue
                try:
                    await session.feed(data)
                    audio_started = True
                    active_at = time.monotonic()
                except BadFrame as exc:
                    await connection.error("bad_frame", str(exc))
                continue
            text = message.get("text") or ""
            if len(text) > settings.max_frame_bytes:
                raise _Close(TOO_BIG, f"message over the {settings.max_frame_bytes}-byte limit")
            try:
                event = json.loads(text)
            except (ValueError, RecursionError):  # deep nesting ("[" * 100_000) recurses
                event = None
            if not isinstance(event, dict):
                await connection.error("invalid_json", "messages must be JSON objects")
                continue
            kind = event.get("type")
            if kind == "end":
                if session is not None:
                    await session.finish()
                await connection.send({"type": "session.ended"})
                await connection.close(1000, "end of stream")
                return "end"
            if kind == "config":
                if audio_started:
                    await connection.error(
                        "already_configured", "config must come before any audio"
                    )
                    continue
                fresh = await _configure(event, engines, settings, metrics, connection)
                if fresh is not None:
                    if session is not None:
                        await session.abort()
                    else:  # configuring is activity once; configuring again is not
                        active_at = time.monotonic()
                    session = fresh
                continue
            await connection.error(
                "unknown_event", f"unknown event type {kind!r}: use config or end"
            )
    except _Close as close:
        if session is not None:
            if close.flush:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(session.finish(), settings.request_timeout_s)
            await session.abort()
        with contextlib.suppress(Exception):
            code = {POLICY: "policy", TOO_BIG: "too_large"}.get(close.code, "closed")
            await connection.error(code, close.reason)
        await connection.close(close.code, close.reason)
        return {TOO_BIG: "frame_too_large"}.get(close.code, "timeout")
    except WebSocketDisconnect:
        if session is not None:
            await session.abort()
        return "client_gone"
    except BaseException:
        if session is not None:
            await session.abort()
        raise
