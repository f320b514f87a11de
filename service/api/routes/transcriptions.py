"""`POST /v1/audio/transcriptions` and `/v1/audio/translations`, as the OpenAI API has them."""

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from service.api import render
from service.api.deps import EngineDep, SettingsDep
from service.api.gate import DecodeGate
from service.api.observe import RequestFacts, facts
from service.api.schemas import (
    ERROR_RESPONSES,
    TRANSCRIPT_EVENT,
    TranscriptionJSON,
    TranscriptionVerbose,
)
from service.audio import decode_audio
from service.audio.cost import DecodeEstimate, estimate_decode
from service.engine.budget import Reservation
from service.engine.engine import ClientGone, Engine
from service.engine.types import GenerationParams, Job, Task, Transcript
from service.errors import (
    BadAudio,
    DeadlineExceeded,
    InvalidRequest,
    ModelNotFound,
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

FileField = Annotated[UploadFile, File(description="Audio: WAV, FLAC, OGG/Vorbis, Opus or MP3")]
ModelField = Annotated[str | None, Form(description="Model name (GET /v1/models); default: it")]
LanguageField = Annotated[str | None, Form(max_length=32, description="Language (ISO 639-1)")]
PromptField = Annotated[str | None, Form(description="Context for models that take a prompt")]
FormatField = Annotated[render.ResponseFormat, Form()]
TemperatureField = Annotated[
    float, Form(ge=0, le=2, description="0: greedy; 0.01-2: sampling at that temperature")
]
BeamsField = Annotated[int, Form(ge=1, description="Beam width (capped by settings)")]
SampleField = Annotated[bool, Form(description="Multinomial sampling")]
TopKField = Annotated[int | None, Form(ge=0, description="Sampling: keep the k best tokens")]
TopPField = Annotated[float | None, Form(gt=0, le=1, description="Sampling: nucleus mass")]
MaxTokensField = Annotated[int | None, Form(ge=1, description="Tokens to generate at most")]
PenaltyField = Annotated[float, Form(gt=0, le=10, description="Repetition penalty (0.01-10)")]
SeedField = Annotated[int | None, Form(ge=0, le=2**32 - 1, description="Sampling seed")]
TimeoutField = Annotated[float | None, Form(gt=0, description="Deadline in seconds (capped)")]
StreamField = Annotated[
    bool, Form(description="Server-Sent Events: text deltas as tokens are generated")
]


def _params(
    settings: Settings,
    default_max_new_tokens: int,
    task: Task,
    language: str | None,
    prompt: str | None,
    temperature: float,
    num_beams: int,
    do_sample: bool,
    top_k: int | None,
    top_p: float | None,
    max_new_tokens: int | None,
    repetition_penalty: float,
    seed: int | None,
) -> GenerationParams:
    if num_beams > settings.max_num_beams:
        raise InvalidRequest(
            f"num_beams is {num_beams}; the limit is {settings.max_num_beams}", param="num_beams"
        )
    if max_new_tokens is not None and max_new_tokens > settings.max_new_tokens:
        raise InvalidRequest(
            f"max_new_tokens is {max_new_tokens}; the limit is {settings.max_new_tokens}",
            param="max_new_tokens",
        )
    if 0 < temperature < MIN_TEMPERATURE:
        raise InvalidRequest(
            f"temperature is {temperature:g}: use 0 (greedy) or {MIN_TEMPERATURE} to 2",
            param="temperature",
        )
    if repetition_penalty < MIN_REPETITION_PENALTY:
        raise InvalidRequest(
            f"repetition_penalty is {repetition_penalty:g}; the least is {MIN_REPETITION_PENALTY}",
            param="repetition_penalty",
        )
    if prompt is not None and len(prompt) > settings.max_prompt_chars:
        raise InvalidRequest(
            f"prompt is {len(prompt)} characters; the limit is {settings.max_prompt_chars}",
            param="prompt",
        )
    sample = do_sample or temperature > 0
    return GenerationParams(
        task=task,
        language=language or None,
        num_beams=num_beams,
        do_sample=sample,
        temperature=temperature if temperature > 0 else 1.0,
        top_k=top_k if sample else None,
        top_p=top_p if sample else None,
        max_new_tokens=max_new_tokens or min(settings.max_new_tokens, default_max_new_tokens),
        repetition_penalty=repetition_penalty,
        seed=seed if sample else None,
        prompt=prompt or None,
    )


async def _disconnected(request: Request) -> None:
    """Resolves when the client closes the connection (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _handle(
    request: Request,
    engine: Engine,
    settings: Settings,
    task: Task,
    file: UploadFile,
    model: str | None,
    response_format: render.ResponseFormat,
    params: GenerationParams,
    timeout: float | None,
    stream: bool = False,
) -> Response:
    if model is not None and model not in (settings.served_name, *settings.model_aliases):
        raise ModelNotFound(
            f"model {model!r} is not loaded; GET /v1/models lists what is", param="model"
        )
    record = facts(request.scope)
    record.response_format = response_format
    engine.adapter.validate(params)
    # One deadline from here on: waiting for a decode slot, decoding and the engine count.
    deadline = engine.deadline(timeout)
    # refuse overload before paying for decoding (which would slow the workers further);
    # `EarlyAdmission` did the same before the body was parsed, with the default deadline
    engine.scheduler.admit(deadline)
    if (file.size or 0) <= INLINE_ESTIMATE_BYTES:  # a header read in memory: no thread hop
        estimate = estimate_decode(file.file, settings.max_audio_seconds)
    else:
        estimate = await asyncio.to_thread(estimate_decode, file.file, settings.max_audio_seconds)
    reservation = engine.audio_budget.reserve(estimate.seconds, deadline)
    try:
        response = await _decode_and_transcribe(
            request,
            engine,
            settings,
            task,
            file,
            response_format,
            params,
            deadline,
            stream,
            estimate,
            reservation,
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


async def _decode_and_transcribe(
    request: Request,
    engine: Engine,
    settings: Settings,
    task: Task,
    file: UploadFile,
    response_format: render.ResponseFormat,
    params: GenerationParams,
    deadline: float,
    stream: bool,
    estimate: DecodeEstimate,
    reservation: Reservation,
) -> Response:
    record = facts(request.scope)
    gate: DecodeGate = request.app.state.decode_gate
    try:
        async with gate.slot(estimate, deadline):
            started = time.perf_counter()
            audio = await _decode(engine, settings, file, deadline)
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
    duration = len(audio) / engine.info.sampling_rate
    reservation.resize(duration)
    record.audio_seconds = duration
    rate = engine.info.sampling_rate
    language = params.language or settings.language
    temperature = params.temperature if params.do_sample else 0.0
    max_window = settings.max_window_seconds
    if engine.info.architecture == "whisper":  # Whisper sees at most 30 s
        max_window = min(max_window, 30.0)
    if duration > max_window:
        windows = await asyncio.to_thread(
            plan_speech_windows, audio, rate, max_window=max_window, vad=settings.long_audio_vad
        )
        results = engine.transcribe_pieces(
            [audio[w.start : w.end] for w in windows],
            params,
            deadline=deadline,
            client_gone=None if stream else lambda: _disconnected(request),
        )
        spans = [(w.speech_start / rate, w.speech_end / rate) for w in windows]
        if stream:
            return _event_stream(_segment_events(results, spans, temperature, record))
        pieces: list[render.Piece] = []
        try:
            async for result in results:
                pieces.append(render.Piece(*spans[len(pieces)], result))
        except ClientGone:
            return Response(status_code=499)
    elif stream:
        tokens: asyncio.Queue[int] = asyncio.Queue()
        job = engine.submit(audio, params, deadline=deadline, tokens=tokens)  # 429/503 as JSON
        return _event_stream(_token_events(engine, job, tokens, record))
    else:
        try:
            job = engine.submit(audio, params, deadline=deadline)
            result = await engine.result(job, client_gone=lambda: _disconnected(request))
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; ends the request cleanly
        pieces = [render.Piece(0.0, duration, result)]
    _record(record, [p.transcript for p in pieces])
    response = _render(pieces, duration, task, language, temperature, response_format)
    # Where the time went, for clients and benchmarks (https://www.w3.org/TR/server-timing/).
    response.headers["Server-Timing"] = (
        f"queue;dur={(record.queue_seconds or 0) * 1000:.1f}, "
        f"compute;dur={(record.compute_seconds or 0) * 1000:.1f}"
    )
    response.headers["X-Batch-Size"] = str(record.batch_size or 0)
    return response


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


async def _segment_events(
    results: AsyncIterator[Transcript],
    spans: list[tuple[float, float]],
    temperature: float,
    record: RequestFacts,
) -> AsyncIterator[str]:
    """Long audio: each window's segment as soon as it (and those before it) are done.

    Per window: a `transcript.text.segment` event (id, start, end, text) and a
    `transcript.text.delta` with its text, so a client that only joins deltas gets the whole
    text; then `transcript.text.done`. Leaving early cancels the windows not yet done.
    """
    done: list[Transcript] = []
    try:
        async for result in results:
            index = len(done)
            done.append(result)
            if not result.text:
                continue
            piece = render.Piece(*spans[index], result)
            segment = render.segment(index, piece, temperature)
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
            yield _sse({"type": "transcript.text.delta", "delta": prefix + result.text})
    except ServiceError as exc:
        yield _error_event(exc, record)
        return
    _record(record, done)
    yield _sse({"type": "transcript.text.done", "text": record.text or ""})


async def _token_events(
    engine: Engine, job: Job, tokens: "asyncio.Queue[int]", record: RequestFacts
) -> AsyncIterator[str]:
    """OpenAI's transcription stream: text deltas as tokens arrive, then the whole text.

    Leaving early (the client disconnects: the response task is cancelled) cancels the job.
    A failure after the stream has begun is sent as an `error` event in the error shape.
    """
    detok = IncrementalDetokenizer(engine.adapter.tokenizer)
    waiter = asyncio.ensure_future(engine.result(job))
    streamed = []
    try:
        while not waiter.done():
            getter = asyncio.ensure_future(tokens.get())
            await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            if delta := detok.push(getter.result()):
                streamed.append(delta)
                yield _sse({"type": "transcript.text.delta", "delta": delta})
        while not tokens.empty():  # tokens that arrived with the result
            if delta := detok.push(tokens.get_nowait()):
                streamed.append(delta)
                yield _sse({"type": "transcript.text.delta", "delta": delta})
        try:
            result = waiter.result()
        except ServiceError as exc:
            yield _error_event(exc, record)
            return
        rest = detok.finish() if streamed else result.text  # beam search streams no tokens
        if rest:
            yield _sse({"type": "transcript.text.delta", "delta": rest})
        _record(record, [result])
        yield _sse({"type": "transcript.text.done", "text": result.text})
    finally:
        waiter.cancel()


def _render(
    pieces: list[render.Piece],
    duration: float,
    task: Task,
    language: str,
    temperature: float,
    response_format: render.ResponseFormat,
) -> Response:
    if response_format == "text":
        return PlainTextResponse(render.joined_text(pieces))
    if response_format == "json":
        return JSONResponse(render.as_json(pieces, duration).model_dump())
    verbose = render.as_verbose(pieces, duration, task, language, temperature)
    if response_format == "verbose_json":
        return JSONResponse(verbose.model_dump())
    if response_format == "srt":
        return PlainTextResponse(render.as_srt(verbose.segments))
    return PlainTextResponse(render.as_vtt(verbose.segments), media_type="text/vtt")


@router.post(
    "/v1/audio/transcriptions",
    responses=_RESPONSES,
    response_model=None,
    summary="Transcribe an audio file",
)
async def transcriptions(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    file: FileField,
    model: ModelField = None,
    language: LanguageField = None,
    prompt: PromptField = None,
    response_format: FormatField = "json",
    temperature: TemperatureField = 0.0,
    num_beams: BeamsField = 1,
    do_sample: SampleField = False,
    top_k: TopKField = None,
    top_p: TopPField = None,
    max_new_tokens: MaxTokensField = None,
    repetition_penalty: PenaltyField = 1.0,
    seed: SeedField = None,
    timeout: TimeoutField = None,
    stream: StreamField = False,
) -> Response:
    params = _params(
        settings,
        engine.adapter.default_max_new_tokens,
        "transcribe",
        language,
        prompt,
        temperature,
        num_beams,
        do_sample,
        top_k,
        top_p,
        max_new_tokens,
        repetition_penalty,
        seed,
    )
    return await _handle(
        request,
        engine,
        settings,
        "transcribe",
        file,
        model,
        response_format,
        params,
        timeout,
        stream,
    )


@router.post(
    "/v1/audio/translations",
    responses=_RESPONSES,
    response_model=None,
    summary="Translate an audio file (into English, or `language` where supported)",
)
async def translations(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    file: FileField,
    model: ModelField = None,
    language: LanguageField = None,
    prompt: PromptField = None,
    response_format: FormatField = "json",
    temperature: TemperatureField = 0.0,
    num_beams: BeamsField = 1,
    do_sample: SampleField = False,
    top_k: TopKField = None,
    top_p: TopPField = None,
    max_new_tokens: MaxTokensField = None,
    repetition_penalty: PenaltyField = 1.0,
    seed: SeedField = None,
    timeout: TimeoutField = None,
) -> Response:
    params = _params(
        settings,
        engine.adapter.default_max_new_tokens,
        "translate",
        language or "en",
        prompt,
        temperature,
        num_beams,
        do_sample,
        top_k,
        top_p,
        max_new_tokens,
        repetition_penalty,
        seed,
    )
    return await _handle(
        request, engine, settings, "translate", file, model, response_format, params, timeout
    )


__all__ = ["TranscriptionJSON", "TranscriptionVerbose", "router"]
