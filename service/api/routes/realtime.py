"""`GET /v1/realtime?intent=transcription`: OpenAI Realtime transcription sessions (websocket).

A protocol adapter: it speaks the Realtime API's client and server events (GA names; the beta
`transcription_session.*` names accepted too, and used in replies to clients that send
`OpenAI-Beta: realtime=v1`), checks the session configuration, enforces the limits of every
streaming session (count, idle and total time, message size, bounded buffers), and hands audio
to `service.streaming.realtime.RealtimeTurns`, which does the work. Events of the client that
are wrong get an `error` event carrying the offending event's `event_id`; the session goes on.
Event reference: https://platform.openai.com/docs/api-reference/realtime-client-events
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import dataclasses
import json
import logging
import time
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, WebSocket
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from service.api.observe import facts
from service.api.routes.stream import client_of, release_slot
from service.engine.engine import Engine
from service.engine.registry import Engines
from service.engine.types import GenerationParams
from service.errors import ServiceError
from service.metrics import Metrics
from service.settings import Settings
from service.streaming.pcm import BadFrame, PcmEncoding
from service.streaming.realtime import (
    MIN_COMMIT_MS,
    Conversation,
    Event,
    RealtimeTurns,
    event,
    manual_endpointer,
)
from service.streaming.session import StreamConfig
from service.streaming.vad import SILERO_RATES, make_endpointer, silero_available

router = APIRouter()
log = logging.getLogger("service.realtime")

TRY_AGAIN_LATER: Final = 1013  # RFC 6455 close codes
POLICY: Final = 1008
TOO_BIG: Final = 1009

LOGPROBS: Final = "item.input_audio_transcription.logprobs"
OUTBOX_LIMIT: Final = 1024
"""Server events waiting for a client that does not read: beyond this the route stops reading
the client's events (TCP then slows the client) until the backlog halves."""
MAX_UTTERANCE_SECONDS: Final = 15.0
"""server_vad: a turn longer than this is cut into items, as the endpointer of
`/v1/audio/stream` cuts utterances (the model's window stays small)."""

_FORMATS: Final[dict[str, tuple[PcmEncoding, int]]] = {
    "audio/pcm": ("pcm_s16le", 24_000),
    "audio/pcmu": ("g711_ulaw", 8_000),
    "audio/pcma": ("g711_alaw", 8_000),
}
_BETA_FORMATS: Final = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
_UNION_TAGS: Final = {*_FORMATS, "server_vad", "semantic_vad"}
_CLIENT_EVENTS: Final = (
    "session.update",
    "transcription_session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
)


# --------------------------------------------------------------------- session configuration


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PcmFormat(_Strict):
    type: Literal["audio/pcm"]
    rate: Literal[24000] = 24000


class G711Format(_Strict):
    type: Literal["audio/pcmu", "audio/pcma"]


class Transcription(_Strict):
    model: str | None = None
    language: str | None = Field(None, max_length=32)
    prompt: str | None = None
    delay: str | None = None
    keywords: list[str] | None = None
    languages: list[str] | None = None


class ServerVad(_Strict):
    type: Literal["server_vad"]
    threshold: float = Field(0.5, ge=0, le=1)
    prefix_padding_ms: int = Field(300, ge=0, le=5000)
    silence_duration_ms: int = Field(500, ge=20, le=10_000)
    create_response: bool | None = None
    interrupt_response: bool | None = None
    idle_timeout_ms: int | None = None


class SemanticVad(_Strict):
    type: Literal["semantic_vad"]
    eagerness: str | None = None
    create_response: bool | None = None
    interrupt_response: bool | None = None


class NoiseReduction(_Strict):
    type: str | None = None
    strength: float | None = None


class AudioInput(_Strict):
    format: Annotated[PcmFormat | G711Format, Field(discriminator="type")] = PcmFormat(
        type="audio/pcm"
    )
    transcription: Transcription | None = Transcription()
    turn_detection: Annotated[ServerVad | SemanticVad, Field(discriminator="type")] | None = (
        ServerVad(type="server_vad")
    )
    noise_reduction: NoiseReduction | None = None


class Audio(_Strict):
    input: AudioInput = AudioInput()


class TranscriptionSession(_Strict):
    """The GA `session` object of a transcription session (what `session.update` carries)."""

    type: Literal["transcription"]
    object: Literal["realtime.transcription_session"] | None = None  # as sent back by clients
    audio: Audio = Audio()
    include: list[Literal["item.input_audio_transcription.logprobs"]] | None = None


class _ClientError(Exception):
    """A client event that cannot be honoured: rendered as an `error` event."""

    def __init__(
        self, message: str, *, code: str = "invalid_value", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


@dataclasses.dataclass(frozen=True)
class Effective:
    """A validated configuration: what the session runs with."""

    session: TranscriptionSession
    encoding: PcmEncoding
    rate: int
    params: GenerationParams
    model: str
    engine: Engine = dataclasses.field(compare=False)  # the model's, looked up once

    @property
    def turn(self) -> ServerVad | None:
        turn = self.session.audio.input.turn_detection
        return turn if isinstance(turn, ServerVad) else None

    @property
    def logprobs(self) -> bool:
        return LOGPROBS in (self.session.include or [])

    def audio_key(self) -> tuple[object, ...]:
        """What a running session cannot change: the audio format, turn detection and the
        engine (another model means new turns, as another format does)."""
        inp = self.session.audio.input
        return (self.encoding, self.rate, inp.turn_detection, id(self.engine))


def _merge(current: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """An update over the current session: `audio` and `audio.input` are merged field by
    field (only fields present change, as OpenAI documents), every other field replaced."""
    merged = {**current, **update}
    audio = update.get("audio")
    if isinstance(audio, dict) and isinstance(current.get("audio"), dict):
        merged["audio"] = {**current["audio"], **audio}
        inp = audio.get("input")
        if isinstance(inp, dict) and isinstance(current["audio"].get("input"), dict):
            merged["audio"]["input"] = {**current["audio"]["input"], **inp}
    return merged


def _from_beta(session: dict[str, Any]) -> dict[str, Any]:
    """A beta `transcription_session.update` session in the GA shape (unknown fields kept, so
    that validation names them)."""
    rest = dict(session)
    inp: dict[str, Any] = {}
    if "input_audio_format" in rest:
        name = rest.pop("input_audio_format")
        if name not in _BETA_FORMATS:
            raise _ClientError(
                f"input_audio_format must be one of {sorted(_BETA_FORMATS)}; got {name!r}",
                param="session.input_audio_format",
            )
        inp["format"] = {"type": _BETA_FORMATS[name]}
    for beta, ga in (
        ("input_audio_transcription", "transcription"),
        ("turn_detection", "turn_detection"),
        ("input_audio_noise_reduction", "noise_reduction"),
    ):
        if beta in rest:
            inp[ga] = rest.pop(beta)
    out: dict[str, Any] = {"type": "transcription", **rest}
    if inp:
        out["audio"] = {"input": inp}
    return out


class Configurator:
    """Validates session configurations against the served models and the settings."""

    def __init__(self, engines: Engines, settings: Settings, model: str | None = None) -> None:
        self.engines = engines
        self.settings = settings
        self.model = model  # the connection's `?model=`: the session's model until one is set

    def default(self) -> dict[str, Any]:
        raw = TranscriptionSession(type="transcription").model_dump(mode="json")
        if self.model:
            raw["audio"]["input"]["transcription"]["model"] = self.model
        return raw

    def check(self, raw: dict[str, Any]) -> Effective:
        """Raises `_ClientError` naming the first field that cannot be honoured."""
        try:
            session = TranscriptionSession.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            path = [str(p) for p in first["loc"] if str(p) not in _UNION_TAGS]
            param = ".".join(["session", *path])
            raise _ClientError(f"{param}: {first['msg']}", param=param) from None
        inp = session.audio.input
        where = "session.audio.input"
        if inp.transcription is None:
            raise _ClientError(
                "a transcription session needs audio.input.transcription; it cannot be null",
                param=f"{where}.transcription",
            )
        t = inp.transcription
        for name in ("delay", "keywords", "languages"):
            if getattr(t, name) is not None:
                raise _ClientError(
                    f"transcription.{name} is not supported by this server",
                    code="unsupported",
                    param=f"{where}.transcription.{name}",
                )
        if isinstance(inp.turn_detection, SemanticVad):
            raise _ClientError(
                "semantic_vad is not supported: use server_vad or null (manual commits)",
                code="unsupported",
                param=f"{where}.turn_detection.type",
            )
        if inp.turn_detection is not None and inp.turn_detection.idle_timeout_ms is not None:
            raise _ClientError(
                "turn_detection.idle_timeout_ms is not supported (a transcription session "
                "creates no responses)",
                code="unsupported",
                param=f"{where}.turn_detection.idle_timeout_ms",
            )
        if inp.noise_reduction is not None:
            raise _ClientError(
                "noise_reduction is not supported by this server: send null",
                code="unsupported",
                param=f"{where}.noise_reduction",
            )
        names = self.engines.names()
        model = t.model or self.settings.served_name
        if model not in names:
            raise _ClientError(
                f"model {model!r} is not served here; use one of {list(names)}",
                code="model_not_found",
                param=f"{where}.transcription.model",
            )
        engine = self.engines.get(model)
        if t.prompt is not None and len(t.prompt) > self.settings.max_prompt_chars:
            raise _ClientError(
                f"prompt has {len(t.prompt)} characters; the limit is "
                f"{self.settings.max_prompt_chars}",
                param=f"{where}.transcription.prompt",
            )
        params = GenerationParams(
            language=t.language,
            prompt=t.prompt or None,
            max_new_tokens=min(self.settings.max_new_tokens, engine.adapter.default_max_new_tokens),
        )
        try:
            engine.adapter.validate(params)
        except ServiceError as exc:
            raise _ClientError(
                exc.message, code=exc.code, param=f"{where}.transcription.{exc.param or 'language'}"
            ) from None
        encoding, rate = _FORMATS[inp.format.type]
        return Effective(session, encoding, rate, params, model, engine)


def render_session(effective: Effective, beta: bool) -> dict[str, Any]:
    """The session object of `session.created` / `session.updated` (or their beta names)."""
    inp = effective.session.audio.input
    transcription = {
        "model": effective.model,
        "language": inp.transcription.language if inp.transcription else None,
        "prompt": inp.transcription.prompt if inp.transcription else None,
    }
    turn = (
        None
        if effective.turn is None
        else effective.turn.model_dump(exclude_none=True, mode="json")
    )
    include = list(effective.session.include or [])
    if beta:
        beta_format = {v: k for k, v in _BETA_FORMATS.items()}[inp.format.type]
        return {
            "object": "realtime.transcription_session",
            "input_audio_format": beta_format,
            "input_audio_transcription": transcription,
            "turn_detection": turn,
            "input_audio_noise_reduction": None,
            "include": include,
        }
    return {
        "type": "transcription",
        "object": "realtime.transcription_session",
        "audio": {
            "input": {
                "format": inp.format.model_dump(mode="json"),
                "transcription": transcription,
                "turn_detection": turn,
                "noise_reduction": None,
            }
        },
        "include": include,
    }


# ------------------------------------------------------------------------------ connection


class _Close(Exception):
    def __init__(self, code: int, error_code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.error_code = error_code
        self.reason = reason


def error_event(
    message: str,
    *,
    code: str,
    param: str | None = None,
    client_event: str | None = None,
    kind: str = "invalid_request_error",
) -> Event:
    """OpenAI's `error` server event; `event_id` inside `error` names the client event."""
    return event(
        "error",
        error={
            "type": kind,
            "code": code,
            "message": message,
            "param": param,
            "event_id": client_event,
        },
    )


class Outbox:
    """Server events in order, sent by one task; bounded by slowing the reader (`room`)."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.room = asyncio.Event()
        self.room.set()
        self.broken = False
        self.task = asyncio.create_task(self._send())

    def post(self, ev: Event) -> None:
        self.queue.put_nowait(ev)
        if self.queue.qsize() >= OUTBOX_LIMIT:
            self.room.clear()

    async def _send(self) -> None:
        while True:
            ev = await self.queue.get()
            try:
                if not self.broken:
                    await self.websocket.send_text(json.dumps(ev))
            except Exception:  # the client is gone: drain without sending
                self.broken = True
            finally:
                self.queue.task_done()
                if self.queue.qsize() <= OUTBOX_LIMIT // 2:
                    self.room.set()

    async def drain(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queue.join(), timeout)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class RealtimeConnection:
    """One client: its configuration, its current `RealtimeTurns`, and sessions that a
    `session.update` replaced while their transcripts were still due."""

    def __init__(
        self,
        websocket: WebSocket,
        engines: Engines,
        settings: Settings,
        metrics: Metrics,
        beta: bool,
        model: str | None = None,
    ) -> None:
        self.websocket = websocket
        self.settings = settings
        self.metrics = metrics
        self.beta = beta
        self.outbox = Outbox(websocket)
        self.configurator = Configurator(engines, settings, model)
        self.raw = self.configurator.default()
        self.effective = self.configurator.check(self.raw)
        self.conversation = Conversation()
        self.turns: RealtimeTurns | None = None
        self.retired: list[RealtimeTurns] = []
        self.finishing: set[asyncio.Task[None]] = set()

    def post(self, ev: Event) -> None:
        self.outbox.post(ev)

    def session_event(self, created: bool) -> Event:
        name = ("transcription_session" if self.beta else "session") + (
            ".created" if created else ".updated"
        )
        return event(name, session=render_session(self.effective, self.beta))

    async def start_turns(self) -> None:
        """A `RealtimeTurns` for the effective configuration (loading a VAD model off-loop)."""
        eff = self.effective
        engine = eff.engine
        rate = engine.info.sampling_rate
        turn = eff.turn
        if turn is None:
            endpointer = manual_endpointer(rate, self.settings.realtime_max_buffer_seconds)
        else:
            kind = self.settings.realtime_vad
            if kind == "silero" and (rate not in SILERO_RATES or not silero_available()):
                kind = "energy"  # the fallback: Silero needs 8/16 kHz and its package
            endpointer = await asyncio.to_thread(
                make_endpointer,
                kind,
                rate,
                threshold=turn.threshold,
                threshold_db=-80.0 + 60.0 * turn.threshold,
                silence_ms=turn.silence_duration_ms,
                pre_roll_ms=turn.prefix_padding_ms,
                max_utterance_seconds=MAX_UTTERANCE_SECONDS,
            )
        config = StreamConfig(
            sample_rate=eff.rate,
            encoding=eff.encoding,
            max_utterance_seconds=MAX_UTTERANCE_SECONDS,
            partial_interval_ms=self.settings.realtime_partial_interval_ms,
        )
        self.turns = RealtimeTurns(
            engine,
            config,
            eff.params,
            self.post,
            engine.metrics,  # this model's latencies (the same object with one model)
            endpointer,
            conversation=self.conversation,
            vad=turn is not None,
            logprobs=eff.logprobs,
            prefix_ms=turn.prefix_padding_ms if turn is not None else 0,
            beta=self.beta,
        )

    # ------------------------------------------------------------------------ client events

    async def handle(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if kind in ("session.update", "transcription_session.update"):
            await self._update(ev, beta=kind == "transcription_session.update")
        elif kind == "input_audio_buffer.append":
            await self._append(ev)
        elif kind == "input_audio_buffer.commit":
            self._fields(ev, set())
            turns = self._turns()
            if not turns.commit():
                seconds = turns.buffered_seconds
                raise _ClientError(
                    "Error committing input audio buffer: "
                    + (
                        f"buffer too small. Expected at least {MIN_COMMIT_MS}ms of audio, but "
                        f"buffer only has {seconds * 1000:.2f}ms of audio."
                        if turns.vad is False
                        else "no speech has been detected since the last commit."
                    ),
                    code="input_audio_buffer_commit_empty",
                )
        elif kind == "input_audio_buffer.clear":
            self._fields(ev, set())
            self._turns().clear()
            self.post(event("input_audio_buffer.cleared"))
        else:
            raise _ClientError(
                f"Invalid value: {kind!r}. Supported values are: "
                + ", ".join(repr(k) for k in _CLIENT_EVENTS)
                + " (a transcription session has no responses or conversation items to create)",
                param="type",
            )

    def _turns(self) -> RealtimeTurns:
        assert self.turns is not None
        return self.turns

    @staticmethod
    def _fields(ev: dict[str, Any], allowed: set[str]) -> None:
        extra = sorted(set(ev) - allowed - {"type", "event_id"})
        if extra:
            raise _ClientError(f"Unknown parameter: {extra[0]!r}", param=extra[0])

    async def _update(self, ev: dict[str, Any], *, beta: bool) -> None:
        self._fields(ev, {"session"})
        session = ev.get("session")
        if not isinstance(session, dict):
            raise _ClientError("session must be an object", param="session")
        if beta:
            session = _from_beta(session)
        elif session.get("type") != "transcription":
            raise _ClientError(
                "session.type must be 'transcription' on /v1/realtime?intent=transcription "
                "(this server serves transcription sessions only)",
                param="session.type",
            )
        raw = _merge(self.raw, session)
        effective = self.configurator.check(raw)
        turns = self._turns()
        if effective.audio_key() != self.effective.audio_key():
            busy = turns.endpointer.in_speech or (turns.vad is False and turns.buffered_seconds)
            if busy:
                raise _ClientError(
                    "audio.input.format, turn_detection and the model cannot change while the "
                    "input audio buffer holds uncommitted audio: commit or clear it first",
                    code="invalid_state",
                    param="session.audio.input",
                )
            # the old turns finish their pending transcripts in the background
            self.conversation.offset_ms += turns.elapsed_ms()
            self.retired.append(turns)
            task = asyncio.create_task(turns.finish())
            self.finishing.add(task)
            task.add_done_callback(self.finishing.discard)
            self.raw, self.effective = raw, effective
            await self.start_turns()
        else:
            self.raw, self.effective = raw, effective
            turns.params = effective.params
            turns.logprobs = effective.logprobs
        self.post(self.session_event(created=False))

    async def _append(self, ev: dict[str, Any]) -> None:
        self._fields(ev, {"audio"})
        audio = ev.get("audio")
        if not isinstance(audio, str):
            raise _ClientError("audio must be a base64 string", param="audio")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise _ClientError("audio is not valid base64", param="audio") from None
        turns = self._turns()
        if turns.vad is False:
            width = 2 if self.effective.encoding == "pcm_s16le" else 1
            incoming = len(data) / width / self.effective.rate
            limit = self.settings.realtime_max_buffer_seconds
            if turns.buffered_seconds + incoming > limit:
                raise _ClientError(
                    f"the input audio buffer would hold {turns.buffered_seconds + incoming:.1f} s;"
                    f" the limit is {limit:g} s: commit (or clear) first",
                    code="input_audio_buffer_full",
                    param="audio",
                )
        try:
            await turns.feed(data)
        except BadFrame as exc:
            raise _ClientError(str(exc), param="audio") from None

    # ------------------------------------------------------------------------------- ending

    async def finish(self, timeout: float) -> None:
        """Pending transcripts are completed and sent (uncommitted audio is dropped)."""
        everything = [*self.retired, *([self.turns] if self.turns else [])]
        if self.turns is not None:
            self.turns.clear()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*(t.finish() for t in everything)), timeout)
        await self.abort()
        await self.outbox.drain(timeout)

    async def abort(self) -> None:
        """The client is gone: every request of this connection leaves the engine."""
        for turns in [*self.retired, *([self.turns] if self.turns else [])]:
            await turns.abort()


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket) -> None:
    app = websocket.app
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    engines: Engines | None = app.state.engines
    request_id = facts(websocket.scope).request_id
    offered = websocket.scope.get("subprotocols") or []
    await websocket.accept(
        subprotocol="realtime" if "realtime" in offered else None,
        headers=[(b"x-request-id", request_id.encode())],
    )
    beta = "realtime=v1" in websocket.headers.get("openai-beta", "").replace(" ", "")

    async def refuse(code: int, error_code: str, message: str, kind: str) -> None:
        with contextlib.suppress(Exception):
            await websocket.send_text(json.dumps(error_event(message, code=error_code, kind=kind)))
            await websocket.close(code, message[:120])

    problem = _query_problem(websocket, engines)
    if problem is not None:
        await refuse(POLICY, problem[0], problem[1], "invalid_request_error")
        return
    if engines is None or not engines.ready:
        metrics.rejections.labels(reason="unavailable").inc()
        await refuse(TRY_AGAIN_LATER, "unavailable", "the model is not ready", "server_error")
        return
    if app.state.streams >= settings.max_streams:
        metrics.rejections.labels(reason="too_many_streams").inc()
        await refuse(
            TRY_AGAIN_LATER,
            "session_limit",
            f"at most {settings.max_streams} streaming sessions",
            "rate_limit_error",
        )
        return
    client = client_of(websocket)  # the same per-client share as /v1/audio/stream
    per_client: collections.Counter[str] = app.state.streams_by_client
    if per_client[client] >= settings.max_streams_per_client:
        metrics.rejections.labels(reason="too_many_streams_per_client").inc()
        await refuse(
            TRY_AGAIN_LATER,
            "session_limit",
            f"at most {settings.max_streams_per_client} streaming sessions per client",
            "rate_limit_error",
        )
        return
    app.state.streams += 1
    per_client[client] += 1
    metrics.streams_active.inc()
    metrics.streams_opened.inc()
    started = time.monotonic()
    reason = "error"
    model = websocket.query_params.get("model") or None
    connection = RealtimeConnection(websocket, engines, settings, metrics, beta, model)
    try:
        await connection.start_turns()
        connection.post(connection.session_event(created=True))
        reason = await _serve(websocket, connection, settings, started)
    finally:
        await connection.outbox.stop()
        release_slot(app, metrics, client, reason)
        log.info(
            "realtime session closed",
            extra={
                "fields": {
                    "request_id": request_id,
                    "reason": reason,
                    "duration_s": round(time.monotonic() - started, 2),
                }
            },
        )


def _query_problem(websocket: WebSocket, engines: Engines | None) -> tuple[str, str] | None:
    """(code, message) when the query cannot be served: only transcription sessions are."""
    query = websocket.query_params
    unknown = sorted(set(query) - {"intent", "model", "api_key"})
    if unknown:
        return "invalid_value", f"unknown query parameter {unknown[0]!r}"
    if query.get("intent") != "transcription":
        return (
            "unsupported",
            "only transcription sessions are served: connect to /v1/realtime?intent=transcription",
        )
    model = query.get("model") or ""
    if model and engines is not None and model not in engines.names():
        return "model_not_found", f"model {model!r} is not served here"
    return None


async def _serve(
    websocket: WebSocket, connection: RealtimeConnection, settings: Settings, started: float
) -> str:
    """Read client events until the client leaves or a limit ends the session; the reason."""
    try:
        while True:
            remaining = settings.max_stream_seconds - (time.monotonic() - started)
            if remaining <= 0:
                raise _Close(POLICY, "policy", "the session reached its maximum length")
            try:
                message = await asyncio.wait_for(
                    websocket.receive(), min(remaining, settings.stream_idle_timeout_s)
                )
            except TimeoutError:
                if remaining <= settings.stream_idle_timeout_s:
                    raise _Close(
                        POLICY, "policy", "the session reached its maximum length"
                    ) from None
                raise _Close(POLICY, "policy", "idle timeout: no event received") from None
            if message["type"] == "websocket.disconnect":
                await connection.abort()
                return "client_gone"
            turns = connection.turns
            if turns is not None and turns.task.done():  # the session failed
                turns.task.result()
            text = message.get("text")
            if text is None:
                size = len(message.get("bytes") or b"")
                if size > settings.realtime_max_event_bytes:
                    raise _Close(TOO_BIG, "too_large", "message over the size limit")
                connection.post(
                    error_event(
                        "binary messages are not part of the Realtime protocol: send JSON "
                        "events (input_audio_buffer.append carries base64 audio)",
                        code="invalid_value",
                    )
                )
                continue
            if len(text) > settings.realtime_max_event_bytes:
                raise _Close(
                    TOO_BIG,
                    "too_large",
                    f"event over the {settings.realtime_max_event_bytes}-byte limit",
                )
            try:
                ev = json.loads(text)
            except (ValueError, RecursionError):
                ev = None
            if not isinstance(ev, dict):
                connection.post(error_event("events must be JSON objects", code="invalid_json"))
                continue
            client_event = ev.get("event_id") if isinstance(ev.get("event_id"), str) else None
            try:
                await connection.handle(ev)
            except _ClientError as exc:
                connection.post(
                    error_event(
                        exc.message, code=exc.code, param=exc.param, client_event=client_event
                    )
                )
            if not connection.outbox.room.is_set():  # the client does not read its events
                try:
                    await asyncio.wait_for(
                        connection.outbox.room.wait(), settings.stream_idle_timeout_s
                    )
                except TimeoutError:
                    raise _Close(
                        POLICY, "policy", "the client does not read the server's events"
                    ) from None
    except _Close as close:
        await connection.finish(settings.request_timeout_s)
        connection.post(error_event(close.reason, code=close.error_code))
        await connection.outbox.drain(5.0)
        if websocket.client_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await websocket.close(close.code, close.reason)
        return {TOO_BIG: "frame_too_large"}.get(close.code, "timeout")
    except WebSocketDisconnect:
        await connection.abort()
        return "client_gone"
    except BaseException:
        await connection.abort()
        raise
