"""`POST /v1/audio/transcriptions` and `/v1/audio/translations`, as the OpenAI API has them."""

import asyncio
import contextlib
import dataclasses
import json
import math
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator

import numpy as np
from fastapi import APIRouter, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from service.api import render
from service.api.deps import EnginesDep
from service.api.gate import DecodeGate
from service.api.observe import RequestFacts, facts
from service.api.requests import (
    ChunkingStrategy,
    TranscriptionForm,
    TranscriptionRequest,
    TranslationForm,
    check_model,
    request_body_schema,
)
from service.api.schemas import (
    ERROR_RESPONSES,
    TRANSCRIPT_EVENT,
    TranscriptionJSON,
    TranscriptionVerbose,
)
from service.audio import decode_audio
from service.audio.cost import DecodeEstimate, estimate_decode
from service.audio.windows import Window, has_speech, plan_windows
from service.engine.budget import Reservation
from service.engine.engine import ClientGone, Engine
from service.engine.registry import Engines
from service.engine.types import GenerationParams, Job, Transcript
from service.errors import (
    BadAudio,
    DeadlineExceeded,
    InvalidRequest,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
    error_event,
)
from service.settings import Settings
from service.streaming.detok import IncrementalDetokenizer
from service.streaming.vad import plan_speech_windows

router = APIRouter(tags=["audio"], responses=ERROR_RESPONSES)

# Below this a sampling temperature or a repetition penalty divides the logits into infinities
# (1e-45 is 0 in float32, 1e-9 turns a logit of 40 into 4e10 and the softmax into NaN); vLLM
# draws its line for temperature at the same 0.01. Refused with a 400, never sent to the model.
MIN_TEMPERATURE = 0.01
MIN_REPETITION_PENALTY = 0.01
# Uploads up to this size have their header read on the event loop (Starlette spools them in
# memory up to 1 MB; a thread hop costs more there, under load, than the read itself).
INLINE_ESTIMATE_BYTES = 1024 * 1024

_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "description": "The transcript in the requested `response_format`",
        "content": {
            "application/json": {
                "schema": {
                    "anyOf": [
                        {"$ref": "#/components/schemas/TranscriptionJSON"},
                        {"$ref": "#/components/schemas/TranscriptionVerbose"},
                    ]
                }
            },
            "text/plain": {"schema": {"type": "string"}},
            "text/event-stream": {"schema": TRANSCRIPT_EVENT},
        },
    }
}


async def _disconnected(request: Request) -> None:
    """Resolves when the client closes the connection (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _decode(
    engine: Engine, settings: Settings, file: UploadFile, deadline: float
) -> np.ndarray:
    """Decode off the event loop; at the deadline decoding is stopped (within one block)."""
    stop = threading.Event()
    decoding = asyncio.ensure_future(
        asyncio.to_thread(
            decode_audio,
            file.file,  # the upload as spooled (to disk when large): never all in memory
            sample_rate=engine.info.sampling_rate,
            max_seconds=settings.max_audio_seconds,
            max_channels=settings.max_channels,
            stop=stop,
        )
    )
    try:
        return await asyncio.wait_for(
            asyncio.shield(decoding), max(0.0, deadline - time.monotonic())
        )
    except (TimeoutError, asyncio.CancelledError) as exc:
        stop.set()
        with contextlib.suppress(Exception):
            await decoding  # the slot is held until the thread has really stopped
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise DeadlineExceeded("decoding did not finish within the request's deadline") from None


def _plan(
    audio: np.ndarray,
    rate: int,
    max_window: float,
    chunking: ChunkingStrategy | None,
    settings: Settings,
) -> list[Window] | None:
    """Where to cut the audio: `None` for one block, else windows at pauses (none: silence).

    Without `chunking_strategy`, only audio longer than the window limit is cut (at the speech
    `STT_LONG_AUDIO_VAD`'s detector finds). With it, the
    audio is always cut at pauses: `auto` with the defaults, `server_vad` with its knobs
    (`silence_duration_ms`: the pause that ends a window; `prefix_padding_ms`: audio kept
    before the speech; `threshold` 0..1: how far above the recording's noise floor a frame
    must be to count as speech, 0 to 24 dB).
    """
    if chunking is None and len(audio) <= max_window * rate:
        return None
    if chunking is None or chunking.type == "auto":
        vad = settings.long_audio_vad
        return plan_speech_windows(audio, rate, max_window=max_window, vad=vad)
    return plan_windows(
        audio,
        rate,
        max_window=max_window,
        min_pause=chunking.silence_duration_ms / 1000,
        pad_before=chunking.prefix_padding_ms / 1000,
        margin_db=24.0 * chunking.threshold,
    )


async def _handle(
    request: Request, engine: Engine, settings: Settings, body: TranscriptionRequest
) -> Response:
    params = body.to_params(settings, engine.adapter.default_max_new_tokens)
    if 0 < body.temperature < MIN_TEMPERATURE:
        raise InvalidRequest(
            f"temperature is {body.temperature:g}: use 0 (greedy) or {MIN_TEMPERATURE} to 2",
            param="temperature",
        )
    if body.repetition_penalty < MIN_REPETITION_PENALTY:
        raise InvalidRequest(
            f"repetition_penalty is {body.repetition_penalty:g}; the least is "
            f"{MIN_REPETITION_PENALTY}",
            param="repetition_penalty",
        )
    check_model(engine, settings, body.model, body.language, body.prompt)
    if body.words:
        params = dataclasses.replace(params, words=True)
    if body.segment_timestamps and engine.info.architecture == "whisper":
        params = dataclasses.replace(params, timestamps=True)  # segments from its tokens
    record = facts(request.scope)
    record.response_format = body.response_format
    engine.adapter.validate(params)
    # One deadline from here on: waiting for a decode slot, decoding and the engine count.
    deadline = engine.deadline(body.timeout)
    # refuse overload before paying for decoding (which would slow the workers further);
    # `EarlyAdmission` did the same before the body was parsed, with the default deadline
    engine.scheduler.admit(deadline)
    file = body.file
    if (file.size or 0) <= INLINE_ESTIMATE_BYTES:  # a header read in memory: no thread hop
        estimate = estimate_decode(file.file, settings.max_audio_seconds)
    else:
        estimate = await asyncio.to_thread(estimate_decode, file.file, settings.max_audio_seconds)
    reservation = engine.audio_budget.reserve(estimate.seconds, deadline)
    try:
        response = await _decode_and_transcribe(
            request, engine, settings, body, params, deadline, estimate, reservation
        )
    except BaseException:
        reservation.release()
        raise
    if isinstance(response, StreamingResponse):  # the reservation lasts as long as the stream
        response.body_iterator = _releasing(response.body_iterator, reservation)
    else:
        reservation.release()
    return response


async def _releasing(
    events: AsyncIterable[str | bytes | memoryview], reservation: Reservation
) -> AsyncIterator[str | bytes | memoryview]:
    try:
        async for event in events:
            yield event
    finally:
        reservation.release()


async def _decode_and_transcribe(
    request: Request,
    engine: Engine,
    settings: Settings,
    body: TranscriptionRequest,
    params: GenerationParams,
    deadline: float,
    estimate: DecodeEstimate,
    reservation: Reservation,
) -> Response:
    record = facts(request.scope)
    gate: DecodeGate = request.app.state.decode_gate
    try:
        async with gate.slot(estimate, deadline):
            started = time.perf_counter()
            audio = await _decode(engine, settings, body.file, deadline)
            gate.record(estimate, time.perf_counter() - started)
    except (BadAudio, UnsupportedMediaType, PayloadTooLarge) as exc:
        exc.param = exc.param or "file"
        raise
    except DeadlineExceeded:
        engine.metrics.cancellations.labels(reason="deadline").inc()
        raise
    engine.metrics.observe_stage("decode", time.perf_counter() - started)
    arrived_at = request.scope.get("state", {}).get("arrived_at")
    if isinstance(arrived_at, float):
        gate.record_pre_queue(time.monotonic() - arrived_at)
    rate = engine.info.sampling_rate
    duration = len(audio) / rate
    reservation.resize(duration)
    record.audio_seconds = duration
    max_window = min(settings.max_window_seconds, engine.info.max_input_seconds or math.inf)
    windows = await asyncio.to_thread(
        _plan, audio, rate, max_window, body.chunking_strategy, settings
    )
    if windows is None:  # one piece: too short a clip is refused before the no-speech gate
        engine.check_length(len(audio))
    if windows is None and not has_speech(audio, rate):
        windows = []  # silence, hiss or a steady tone: no words, and no model call
    reply = _Reply(engine, settings, body, params, duration, record)
    if windows is not None:
        results = engine.transcribe_pieces(
            [audio[w.start : w.end] for w in windows],
            params,
            deadline=deadline,
            client_gone=None if body.stream else lambda: _disconnected(request),
        )
        spans = [(w.speech_start / rate, w.speech_end / rate) for w in windows]
        offsets = [w.start / rate for w in windows]
        if body.stream:
            return _event_stream(_segment_events(reply, results, spans))
        pieces: list[render.Piece] = []
        try:
            async for result in results:
                index = len(pieces)
                pieces.append(render.Piece(*spans[index], result, offsets[index]))
        except ClientGone:
            return Response(status_code=499)
    elif body.stream:
        tokens: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
        job = engine.submit(audio, params, deadline=deadline, tokens=tokens)  # 429/503 JSON
        return _event_stream(_token_events(reply, job, tokens))
    else:
        try:
            job = engine.submit(audio, params, deadline=deadline)
            result = await engine.result(job, client_gone=lambda: _disconnected(request))
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; ends the request cleanly
        pieces = [render.Piece(0.0, duration, result, 0.0)]
    _record(record, [p.transcript for p in pieces])
    response = reply.render(pieces)
    # Where the time went, for clients and benchmarks (https://www.w3.org/TR/server-timing/).
    response.headers["Server-Timing"] = (
        f"queue;dur={(record.queue_seconds or 0) * 1000:.1f}, "
        f"compute;dur={(record.compute_seconds or 0) * 1000:.1f}"
    )
    response.headers["X-Batch-Size"] = str(record.batch_size or 0)
    return response


class _Reply:
    """What the response needs besides the transcripts: the request and the audio's length."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        body: TranscriptionRequest,
        params: GenerationParams,
        duration: float,
        record: RequestFacts,
    ) -> None:
        self.engine = engine
        self.body = body
        self.duration = duration
        self.record = record
        self.temperature = params.temperature if params.do_sample else 0.0
        self.language = params.language or settings.language
        self.tokenizer = engine.adapter.tokenizer

    def language_used(self, pieces: list[render.Piece]) -> str:
        """The language the model used: as detected or forced (engine), else asked, else the
        model's own."""
        found = next((p.transcript.language for p in pieces if p.transcript.language), None)
        return found or self.language

    def logprobs(self, results: list[Transcript]) -> list[render.TokenLogprob] | None:
        if not self.body.logprobs:
            return None
        return [
            item
            for result in results
            for item in render.token_logprobs(self.tokenizer, result.tokens, result.logprobs)
        ]

    def usage(self, results: list[Transcript]) -> render.TokenUsage:
        audio_tokens = self.engine.adapter.encoder_frames(
            round(self.duration * self.engine.info.sampling_rate)
        )
        output = sum(len(r.tokens) for r in results)
        return render.token_usage(audio_tokens, output)

    def render(self, pieces: list[render.Piece]) -> Response:
        fmt = self.body.response_format
        if fmt == "text":
            return PlainTextResponse(render.joined_text(pieces))
        logprobs = self.logprobs([p.transcript for p in pieces])
        if fmt == "json":
            return JSONResponse(
                render.as_json(pieces, self.duration, logprobs).model_dump(exclude_none=True)
            )
        verbose = render.as_verbose(
            pieces,
            self.duration,
            self.body.task,
            self.language_used(pieces),
            self.temperature,
            words=self.body.words,
            logprobs=logprobs,
        )
        if fmt == "verbose_json":
            return JSONResponse(verbose.model_dump(exclude_none=True))
        if fmt == "srt":
            return PlainTextResponse(render.as_srt(verbose.segments))
        return PlainTextResponse(render.as_vtt(verbose.segments), media_type="text/vtt")


def _record(record: RequestFacts, results: list[Transcript]) -> None:
    """The request log's figures: first window's queue wait, summed compute, largest batch."""
    if not results:
        return
    record.queue_seconds = results[0].queue_seconds
    record.compute_seconds = sum(r.compute_seconds for r in results)
    record.batch_size = max(r.batch_size for r in results)
    record.text = " ".join(r.text for r in results if r.text)


def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _sse(event: dict[str, object]) -> str:
    return f"data: {json.dumps(event)}\n\n"


def _error_event(exc: ServiceError, record: RequestFacts) -> str:
    record.error_code = exc.code
    return _sse(error_event(exc, record.request_id))


def _delta(text: str, logprobs: list[render.TokenLogprob] | None) -> str:
    event: dict[str, object] = {"type": "transcript.text.delta", "delta": text}
    if logprobs is not None:
        event["logprobs"] = [lp.model_dump() for lp in logprobs]
    return _sse(event)


def _done(reply: _Reply, text: str, results: list[Transcript]) -> str:
    """`transcript.text.done`: the whole text, the token usage, and the logprobs if asked."""
    event: dict[str, object] = {
        "type": "transcript.text.done",
        "text": text,
        "usage": reply.usage(results).model_dump(),
    }
    logprobs = reply.logprobs(results)
    if logprobs is not None:
        event["logprobs"] = [lp.model_dump() for lp in logprobs]
    return _sse(event)


async def _segment_events(
    reply: _Reply,
    results: AsyncIterator[Transcript],
    spans: list[tuple[float, float]],
) -> AsyncIterator[str]:
    """Windowed audio: each window's segment as soon as it (and those before it) are done.

    Per window: a `transcript.text.segment` event (id, start, end, text) and a
    `transcript.text.delta` with its text (and its tokens' logprobs when asked), so a client
    that only joins deltas gets the whole text; then `transcript.text.done`. Leaving early
    cancels the windows not yet done.
    """
    done: list[Transcript] = []
    try:
        async for result in results:
            index = len(done)
            done.append(result)
            if not result.text:
                continue
            piece = render.Piece(*spans[index], result)
            segment = render.segment(index, piece, reply.temperature)
            yield _sse(
                {
                    "type": "transcript.text.segment",
                    "id": str(segment.id),
                    "start": segment.start,
                    "end": segment.end,
                    "text": segment.text,
                }
            )
            prefix = " " if any(r.text for r in done[:-1]) else ""
            yield _delta(prefix + result.text, reply.logprobs([result]))
    except ServiceError as exc:
        yield _error_event(exc, reply.record)
        return
    _record(reply.record, done)
    yield _done(reply, reply.record.text or "", done)


async def _token_events(
    reply: _Reply, job: Job, tokens: "asyncio.Queue[tuple[int, float]]"
) -> AsyncIterator[str]:
    """OpenAI's transcription stream: text deltas as tokens arrive, then the whole text.

    With `include[]=logprobs`, each delta carries the log-probabilities of the tokens whose
    text it holds. Leaving early (the client disconnects: the response task is cancelled)
    cancels the job. A failure after the stream has begun is sent as an `error` event.
    """
    engine, record = reply.engine, reply.record
    detok = IncrementalDetokenizer(engine.adapter.tokenizer)
    waiter = asyncio.ensure_future(engine.result(job))
    streamed: list[str] = []
    held: list[tuple[int, float]] = []  # tokens whose text no delta has carried yet
    carried: list[int] = []  # tokens whose text deltas have carried

    def delta(text: str) -> str:
        logprobs = None
        if reply.body.logprobs:
            ids = [t for t, _ in held]
            logprobs = render.token_logprobs(
                reply.tokenizer, ids, [lp for _, lp in held], context=carried
            )
            carried.extend(ids)
        held.clear()
        streamed.append(text)
        return _delta(text, logprobs)

    try:
        while not waiter.done():
            getter = asyncio.ensure_future(tokens.get())
            await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            held.append(getter.result())
            if text := detok.push(held[-1][0]):
                yield delta(text)
        while not tokens.empty():  # tokens that arrived with the result
            held.append(tokens.get_nowait())
            if text := detok.push(held[-1][0]):
                yield delta(text)
        try:
            result = waiter.result()
        except ServiceError as exc:
            yield _error_event(exc, record)
            return
        if not streamed:  # beam search streams no tokens: the whole result is one delta
            held[:] = list(zip(result.tokens, result.logprobs, strict=True))
            rest = result.text
        else:
            rest = detok.finish()
        if rest:
            yield delta(rest)
        _record(record, [result])
        yield _done(reply, result.text, [result])
    finally:
        waiter.cancel()


def _engine_for(request: Request, engines: Engines, body: TranscriptionRequest) -> Engine:
    """The engine of the model the request names (none: the default), looked up once; its
    settings (`Engine.settings`: that model's name, aliases and language) go with it. An
    unknown name is 404 `model_not_found`."""
    engine = engines.get(body.model)
    facts(request.scope).model = engine.settings.served_name
    return engine


@router.post(
    "/v1/audio/transcriptions",
    responses=_RESPONSES,
    response_model=None,
    summary="Transcribe an audio file",
    openapi_extra=request_body_schema("transcribe"),
)
async def transcriptions(
    request: Request, engines: EnginesDep, body: TranscriptionForm
) -> Response:
    engine = _engine_for(request, engines, body)
    return await _handle(request, engine, engine.settings, body)


@router.post(
    "/v1/audio/translations",
    responses=_RESPONSES,
    response_model=None,
    summary="Translate an audio file (into English, or `language` where supported)",
    openapi_extra=request_body_schema("translate"),
)
async def translations(request: Request, engines: EnginesDep, body: TranslationForm) -> Response:
    engine = _engine_for(request, engines, body)
    return await _handle(request, engine, engine.settings, body)


__all__ = ["TranscriptionJSON", "TranscriptionVerbose", "router"]
