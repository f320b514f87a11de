"""A corpus of bad input against a live server: each case gets its documented 4xx in the one
error shape, and the server goes on serving (ready, and a good request still transcribes).

Uploads go to `tiny_server` (tiny wav2vec2 + BERT checkpoint, 2 MB upload limit, 20 s audio
limit); the websocket cases use the same server, the idle-timeout case a dedicated one.
"""

import asyncio
import json
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soxr
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from service.api.app import create_app
from tests.conftest import LiveServer, encode, settings_for, speak

TRANSCRIBE = "/v1/audio/transcriptions"
RATE = 16_000
UPLOAD_LIMIT = 2_000_000  # tiny_server's limits (tests/conftest.py)
AUDIO_LIMIT_S = 20
MULTIPART_FIELD_LIMIT = 1024 * 1024  # Starlette's default cap on one non-file form field

TONE = (0.1 * np.sin(2 * np.pi * 220 * np.arange(RATE) / RATE)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# helpers


def wav(
    payload: bytes,
    rate: int = RATE,
    channels: int = 1,
    bits: int = 16,
    fmt_tag: int = 1,
    data_size: int | None = None,
    riff_size: int | None = None,
) -> bytes:
    """A RIFF/WAVE file written by hand, so headers soundfile refuses to write can be made."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate, rate * block, block, bits)
    size = len(payload) if data_size is None else data_size
    riff = 4 + 8 + len(fmt) + 8 + size if riff_size is None else riff_size
    return (
        b"RIFF"
        + struct.pack("<I", min(riff, 0xFFFFFFFF))
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", size)
        + payload
    )


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def with_sample(value: float) -> bytes:
    """One second of 32-bit float WAV with one sample set to `value` (NaN, inf)."""
    audio = TONE.copy()
    audio[RATE // 2] = value
    return encode(audio, RATE, "WAV", "FLOAT")


def mp3_tone() -> bytes:
    return encode(np.stack([TONE, TONE], axis=1), RATE, "MP3", "MPEG_LAYER_III")


def assert_error(
    response: httpx.Response, status: int, code: str, param: str | None
) -> dict[str, Any]:
    """The response is `status` with OpenAI's error shape, naming `code` and `param`."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"}, error
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code, error
    assert error["param"] == param, error
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    return dict(error)


def post(server: LiveServer, **kwargs: Any) -> httpx.Response:
    return httpx.post(server.url + TRANSCRIBE, timeout=60, **kwargs)


def upload(
    server: LiveServer, body: bytes, name: str = "a.wav", **fields: object
) -> httpx.Response:
    data = {k: str(v) for k, v in fields.items()}
    return post(server, files={"file": (name, body)}, data=data)


def assert_still_serving(server: LiveServer, speech_wav: bytes) -> None:
    """Ready, and a good upload is still transcribed."""
    assert httpx.get(server.url + "/ready", timeout=10).status_code == 200
    response = upload(server, speech_wav)
    assert response.status_code == 200, response.text
    assert response.json()["text"]


# ---------------------------------------------------------------------------------------------
# uploads


@dataclass(frozen=True)
class Bad:
    """One bad request: the multipart body (or raw content) and the answer it must get."""

    status: int
    code: str
    param: str | None
    files: Callable[[], Any] | None = None
    data: dict[str, str] | None = None
    content: Callable[[], bytes] | None = None
    headers: dict[str, str] | None = None


def _file(body: Callable[[], bytes], name: str = "a.wav") -> Callable[[], Any]:
    return lambda: {"file": (name, body())}


BAD_UPLOADS = {
    "empty-file": Bad(400, "bad_audio", "file", _file(lambda: b"")),
    "random-bytes": Bad(
        400,
        "unsupported_media_type",
        "file",
        _file(lambda: np.random.default_rng(7).bytes(64 * 1024)),
    ),
    "text-named-wav": Bad(
        400,
        "unsupported_media_type",
        "file",
        _file(lambda: b"this is a shopping list, not audio\n" * 20, "notes.wav"),
    ),
    "truncated-wav-header": Bad(
        400, "bad_audio", "file", _file(lambda: encode(TONE, RATE, "WAV", "PCM_16")[:30])
    ),
    "nan-float-wav": Bad(400, "bad_audio", "file", _file(lambda: with_sample(np.nan))),
    "inf-float-wav": Bad(400, "bad_audio", "file", _file(lambda: with_sample(np.inf))),
    # Finite but absurd float samples (a corrupt float file) overflow float32 arithmetic
    # (resampling, channel mean) into NaN: refused, never handed to the model as NaN audio.
    "huge-float-samples": Bad(
        400, "bad_audio", "file", _file(lambda: encode(TONE * 1e37, 22_050, "WAV", "FLOAT"))
    ),
    "rate-1-hz": Bad(400, "bad_audio", "file", _file(lambda: wav(pcm16(TONE[:4000]), rate=1))),
    "rate-384-khz": Bad(
        400, "bad_audio", "file", _file(lambda: wav(pcm16(TONE[:4000]), rate=384_000))
    ),
    "eight-channels": Bad(
        400,
        "bad_audio",
        "file",
        _file(lambda: encode(np.tile(TONE[:, None], (1, 8)), RATE, "WAV", "PCM_16")),
    ),
    # One sample (62.5 µs) is a valid WAV, but no model can hear it: wav2vec2's convolutions need
    # 400 samples, Speech2Text's filter bank one 25 ms frame. Like OpenAI's API (which refuses
    # audio under 0.1 s with a 400), the service must refuse it as bad audio, not fail the batch.
    "one-sample": Bad(
        400,
        "bad_audio",
        "file",
        _file(lambda: encode(np.array([0.25], np.float32), RATE, "WAV", "PCM_16")),
    ),
    "over-long-audio": Bad(
        413,
        "too_large",
        "file",
        # 21 s at 8 kHz, 16-bit: 336 kB, well under the upload limit, over the 20 s limit
        _file(
            lambda: encode(
                np.full((AUDIO_LIMIT_S + 1) * 8000, 0.01, np.float32), 8000, "WAV", "PCM_16"
            )
        ),
    ),
    "multipart-without-file": Bad(
        400, "invalid_value", "file", files=lambda: {"model": (None, "tiny")}
    ),
    "file-as-plain-field": Bad(
        400, "invalid_value", "file", files=lambda: {"file": (None, "not an upload")}
    ),
    "file-under-other-name": Bad(
        400,
        "invalid_value",
        "file",
        files=lambda: {"audio": ("a.wav", encode(TONE, RATE, "WAV", "PCM_16"))},
    ),
    "json-body": Bad(
        400,
        "invalid_value",
        "file",
        content=lambda: b'{"file": "a.wav"}',
        headers={"content-type": "application/json"},
    ),
    # A multipart content type without a boundary cannot be parsed at all: the parser's refusal
    # must still be the documented 400 `invalid_value`, not an undocumented code.
    "multipart-without-boundary": Bad(
        400,
        "invalid_value",
        None,
        content=lambda: b"--x\r\n",
        headers={"content-type": "multipart/form-data"},
    ),
    "unknown-model": Bad(
        404, "model_not_found", "model", _file(lambda: encode(TONE, RATE)), {"model": "whisper-9"}
    ),
    "num-beams-0": Bad(400, "invalid_value", "num_beams", _file(lambda: b"x"), {"num_beams": "0"}),
    "negative-temperature": Bad(
        400, "invalid_value", "temperature", _file(lambda: b"x"), {"temperature": "-0.5"}
    ),
    "nan-temperature": Bad(
        400, "invalid_value", "temperature", _file(lambda: b"x"), {"temperature": "nan"}
    ),
    "max-new-tokens-1e9": Bad(
        400,
        "invalid_value",
        "max_new_tokens",
        _file(lambda: encode(TONE, RATE)),
        {"max_new_tokens": str(10**9)},
    ),
    **{
        f"non-numeric-{field}": Bad(
            400, "invalid_value", field, _file(lambda: encode(TONE, RATE)), {field: value}
        )
        for field, value in (
            ("num_beams", "two"),
            ("temperature", "warm"),
            ("top_k", "ten"),
            ("top_p", "most"),
            ("max_new_tokens", "1e3"),
            ("repetition_penalty", "some"),
            ("seed", "1.5"),
            ("timeout", "soon"),
        )
    },
    # A prompt over the upload limit makes the whole body too large: refused from its
    # Content-Length before anything is read, as every upload over STT_MAX_UPLOAD_BYTES is
    # (the README's 413 `too_large`). The limiter cannot tell which part is large, so it names
    # `file`, the part that usually is.
    "prompt-10-mb": Bad(  # 5 x the 2 MB upload limit
        413,
        "too_large",
        "file",
        _file(lambda: encode(TONE, RATE)),
        {"prompt": "x" * 5 * UPLOAD_LIMIT},
    ),
    # Under the upload limit but over the multipart parser's cap on one text field: refused
    # while parsing, before the field is named, so `param` is null; the code is still the
    # README's `invalid_value` for a malformed field.
    "prompt-over-field-cap": Bad(
        400,
        "invalid_value",
        None,
        _file(lambda: encode(TONE, RATE)),
        {"prompt": "x" * (MULTIPART_FIELD_LIMIT + 1)},
    ),
    # Under both caps, over STT_MAX_PROMPT_CHARS (2000): the route names the field.
    "prompt-100-kb": Bad(
        400, "invalid_value", "prompt", _file(lambda: encode(TONE, RATE)), {"prompt": "x" * 100_000}
    ),
}


@pytest.mark.parametrize("case", BAD_UPLOADS.values(), ids=list(BAD_UPLOADS))
def test_bad_upload_gets_its_documented_error(
    tiny_server: LiveServer, speech_wav: bytes, case: Bad
) -> None:
    response = post(
        tiny_server,
        files=case.files() if case.files else None,
        data=case.data,
        content=case.content() if case.content else None,
        headers=case.headers,
    )
    assert_error(response, case.status, case.code, case.param)
    assert_still_serving(tiny_server, speech_wav)


@pytest.fixture(scope="module")
def batching_server(checkpoints: dict[str, Path]) -> Iterator[LiveServer]:
    """One worker that waits 200 ms for company: concurrent uploads share a batch."""
    settings = settings_for(checkpoints["wav2vec2-bert"], cpu_workers=1, max_wait_ms=200)
    with LiveServer(create_app(settings)) as server:
        yield server


def test_too_short_upload_does_not_fail_the_requests_batched_with_it(
    batching_server: LiveServer, speech_wav: bytes
) -> None:
    # A bad request must cost only its sender: refused before it reaches a batch, it cannot
    # take down the good requests that would have shared the batch with it.
    short = encode(np.array([0.25], np.float32), RATE, "WAV", "PCM_16")

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=batching_server.url, timeout=60) as client:
            bodies = [speech_wav, speech_wav, short, speech_wav]
            return await asyncio.gather(
                *(client.post(TRANSCRIBE, files={"file": ("a.wav", b)}) for b in bodies)
            )

    first, second, bad, third = asyncio.run(run())
    for good in (first, second, third):
        assert good.status_code == 200, good.text
    assert_error(bad, 400, "bad_audio", "file")
    assert_still_serving(batching_server, speech_wav)


def test_header_claiming_gigabytes_decodes_what_is_there(
    tiny_server: LiveServer, speech_wav: bytes
) -> None:
    # Streamed WAVs (espeak-ng --stdout, ffmpeg to a pipe, arecord) carry a placeholder length
    # near 4 GiB because the writer cannot seek back. The right answer is the audio that is
    # really there, never an allocation of the claim, and never a 5xx.
    half_second = pcm16(TONE[: RATE // 2])
    for riff_size in (None, 0xFFFFFFFF):
        body = wav(half_second, data_size=0xFFFFFFF0, riff_size=riff_size)
        response = upload(tiny_server, body, response_format="verbose_json")
        assert response.status_code == 200, response.text
        assert response.json()["duration"] == pytest.approx(0.5, abs=1e-3)
    assert_still_serving(tiny_server, speech_wav)


def test_integer_scaled_float_wav_is_accepted(tiny_server: LiveServer, speech_wav: bytes) -> None:
    # Some tools write integer samples into float WAVs (±32768): loud, but real audio.
    response = upload(tiny_server, encode(TONE * 32768, 22_050, "WAV", "FLOAT"))
    assert response.status_code == 200, response.text
    assert_still_serving(tiny_server, speech_wav)


def test_mp3_with_garbage_tail_transcribes_like_the_clean_mp3(
    tiny_server: LiveServer, speech_wav: bytes
) -> None:
    # A download cut and glued to junk (or a trailing ID3v1-like blob): the MP3 frames before
    # the junk are good audio, so the service transcribes them exactly as the clean file.
    clean = mp3_tone()
    dirty = clean + np.random.default_rng(3).bytes(8192)
    expected = upload(tiny_server, clean, "a.mp3", response_format="verbose_json")
    assert expected.status_code == 200, expected.text
    response = upload(tiny_server, dirty, "a.mp3", response_format="verbose_json")
    assert response.status_code == 200, response.text
    assert response.json()["duration"] == pytest.approx(expected.json()["duration"], abs=1e-3)
    assert response.json()["text"] == expected.json()["text"]
    assert_still_serving(tiny_server, speech_wav)


# ---------------------------------------------------------------------------------------------
# websocket


def ws_url(server: LiveServer, query: str = "") -> str:
    return server.url.replace("http://", "ws://") + "/v1/audio/stream" + (f"?{query}" * bool(query))


async def expect(ws: ClientConnection, kind: str, code: str | None = None) -> dict[str, Any]:
    event = json.loads(await asyncio.wait_for(ws.recv(), 30))
    assert event["type"] == kind, event
    if code is not None:
        assert event["error"]["code"] == code, event
        assert event["error"]["type"] == "invalid_request_error", event
        assert event["error"]["message"], event
    return dict(event)


async def read_until_closed(ws: ClientConnection) -> list[dict[str, Any]]:
    """Every event until the server closes the connection (the close code is on `ws`)."""
    events = []
    try:
        while True:
            events.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
    except ConnectionClosed:
        return events


async def expect_close(ws: ClientConnection, code: int) -> None:
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 30)
    assert ws.close_code == code, ws.close_reason


@pytest.fixture(scope="module")
def voice() -> np.ndarray:
    """'three four five' at 16 kHz with half a second of quiet after it (ends an utterance)."""
    spoken = soxr.resample(speak("three four five"), 22_050, RATE).astype(np.float32)
    return np.concatenate([spoken, np.zeros(RATE // 2, np.float32)])


async def transcribe_stream(url: str, audio: np.ndarray) -> list[dict[str, Any]]:
    """A whole good session: config by query, audio, `end`; every event until the close."""
    async with connect(url + f"?sample_rate={RATE}") as ws:
        await expect(ws, "session.created")
        await ws.send(pcm16(audio))
        await ws.send(json.dumps({"type": "end"}))
        events = [json.loads(m) async for m in ws]
        assert ws.close_code == 1000
    return events


def assert_stream_still_serves(server: LiveServer, voice: np.ndarray) -> None:
    events = asyncio.run(transcribe_stream(ws_url(server), voice))
    finals = [e for e in events if e["type"] == "transcript.final"]
    assert len(finals) == 1, events
    assert finals[0]["text"]
    assert events[-1]["type"] == "session.ended"
    assert not [e for e in events if e["type"] == "error"], events


Scenario = Callable[[ClientConnection], Awaitable[Callable[[np.ndarray], bytes]]]
"""Drives one session through bad messages; returns how to encode audio for the session it
configured."""


async def _garbage_json(ws: ClientConnection) -> Callable[[np.ndarray], bytes]:
    for text in ("{not json", "", '{"type": "config"', "\x00\x01"):
        await ws.send(text)
        await expect(ws, "error", "invalid_json")
    await ws.send(json.dumps({"type": "config", "sample_rate": RATE}))
    await expect(ws, "session.created")  # the session went on
    return pcm16


async def _json_that_is_not_an_object(ws: ClientConnection) -> Callable[[np.ndarray], bytes]:
    # "messages must be JSON objects" is what `invalid_json` says: valid JSON that is not an
    # object (a list, a number, a string, null) breaks exactly that rule.
    for text in ("[]", "42", '"config"', "null"):
        await ws.send(text)
        await expect(ws, "error", "invalid_json")
    await ws.send(json.dumps({"type": "config", "sample_rate": RATE}))
    await expect(ws, "session.created")
    return pcm16


async def _unknown_events(ws: ClientConnection) -> Callable[[np.ndarray], bytes]:
    for event in ({"type": "dance"}, {"type": None}, {}, {"type": ["config"]}, {"kind": "end"}):
        await ws.send(json.dumps(event))
        await expect(ws, "error", "unknown_event")
    await ws.send(json.dumps({"type": "config", "sample_rate": RATE}))
    await expect(ws, "session.created")
    return pcm16


async def _audio_before_config(ws: ClientConnection) -> Callable[[np.ndarray], bytes]:
    await ws.send(b"\x00\x00" * 800)
    await expect(ws, "error", "config_required")
    await ws.send(json.dumps({"type": "config", "sample_rate": RATE}))
    await expect(ws, "session.created")
    return pcm16


async def _bad_query_config(ws: ClientConnection) -> Callable[[np.ndarray], bytes]:
    # the connection was opened with ?sample_rate=fast: refused, and a config message still works
    await expect(ws, "error", "invalid_config")
    await ws.send(json.dumps({"type": "config", "sample_rate": RATE}))
    await expect(ws, "session.created")
    return pcm16


async def _bad_frames(ws: ClientConnection) -> Callable[[np.ndarray], bytes]:
    await ws.send(json.dumps({"type": "config", "sample_rate": RATE}))
    await expect(ws, "session.created")
    for frame in (b"\x01", b"\x01\x02\x03", b"\x00" * 1001):  # odd byte counts for s16
        await ws.send(frame)
        await expect(ws, "error", "bad_frame")
    return pcm16


async def _bad_float_frames(ws: ClientConnection) -> Callable[[np.ndarray], bytes]:
    await ws.send(json.dumps({"type": "config", "sample_rate": RATE, "encoding": "f32le"}))
    await expect(ws, "session.created")
    for frame in (
        np.array([0.1, np.nan], "<f4").tobytes(),
        np.array([np.inf], "<f4").tobytes(),
        np.array([1e9], "<f4").tobytes(),
        b"\x00" * 6,
    ):
        await ws.send(frame)
        await expect(ws, "error", "bad_frame")
    return lambda audio: audio.astype("<f4").tobytes()


WS_CASES: dict[str, tuple[str, Scenario]] = {
    "garbage-json": ("", _garbage_json),
    "json-not-an-object": ("", _json_that_is_not_an_object),
    "unknown-event-types": ("", _unknown_events),
    "audio-before-config": ("", _audio_before_config),
    "bad-query-config": ("sample_rate=fast", _bad_query_config),
    "odd-length-s16-frames": ("", _bad_frames),
    "bad-f32-frames": ("", _bad_float_frames),
}


@pytest.mark.parametrize("case", WS_CASES.values(), ids=list(WS_CASES))
def test_bad_stream_message_gets_an_error_event_and_the_session_goes_on(
    tiny_server: LiveServer, voice: np.ndarray, case: tuple[str, Scenario]
) -> None:
    query, scenario = case

    async def run() -> None:
        async with connect(ws_url(tiny_server, query)) as ws:
            as_bytes = await scenario(ws)
            # the same session still transcribes, and ends cleanly
            await ws.send(as_bytes(voice))
            await ws.send(json.dumps({"type": "end"}))
            events = [json.loads(m) async for m in ws]
            assert [e["type"] for e in events if e["type"] != "transcript.partial"] == [
                "transcript.final",
                "session.ended",
            ], events
            assert ws.close_code == 1000

    asyncio.run(run())
    assert_stream_still_serves(tiny_server, voice)


@pytest.mark.parametrize("kind", ["binary", "text"])
def test_frame_over_the_size_limit_closes_with_1009(
    tiny_server: LiveServer, voice: np.ndarray, kind: str
) -> None:
    limit = 1024 * 1024  # tiny_server's STT_MAX_FRAME_BYTES (the default)

    async def run() -> None:
        async with connect(ws_url(tiny_server, f"sample_rate={RATE}"), max_size=None) as ws:
            await expect(ws, "session.created")
            await ws.send(pcm16(voice))  # an open utterance: its final comes before the close
            big = bytes(limit + 2) if kind == "binary" else json.dumps({"pad": "x" * limit})
            await ws.send(big)
            events = await read_until_closed(ws)
            assert ws.close_code == 1009
            errors = [e for e in events if e["type"] == "error"]
            assert [e["error"]["code"] for e in errors] == ["too_large"], events

    asyncio.run(run())
    assert_stream_still_serves(tiny_server, voice)


def metric(server: LiveServer, name: str) -> float:
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["close", "abort"])
def test_client_leaving_mid_utterance_frees_its_session(
    tiny_server: LiveServer, voice: np.ndarray, how: str
) -> None:
    gone = 'stt_streams_closed_total{reason="client_gone"}'

    def closed_by_client() -> float:
        try:
            return metric(tiny_server, gone)
        except AssertionError:
            return 0.0

    before = closed_by_client()

    async def run() -> None:
        ws = await connect(ws_url(tiny_server, f"sample_rate={RATE}"))
        await expect(ws, "session.created")
        await ws.send(pcm16(voice[:RATE]))  # mid-utterance: the voice has not ended
        if how == "close":
            await ws.close()  # a clean close frame, but no `end`
        else:
            ws.transport.abort()  # the TCP connection just drops
            await ws.wait_closed()

    asyncio.run(run())
    wait_for(lambda: closed_by_client() == before + 1, "the session was not closed")
    wait_for(lambda: metric(tiny_server, "stt_streams_active") == 0, "a session is still open")
    assert_stream_still_serves(tiny_server, voice)
    assert httpx.get(tiny_server.url + "/ready", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def idle_server(checkpoints: dict[str, Path]) -> Iterator[LiveServer]:
    settings = settings_for(checkpoints["wav2vec2-bert"], stream_idle_timeout_s=0.5)
    with LiveServer(create_app(settings)) as server:
        yield server


@pytest.mark.parametrize("configured", [False, True])
def test_silent_client_is_closed_with_1008(
    idle_server: LiveServer, voice: np.ndarray, configured: bool
) -> None:
    async def run() -> None:
        query = f"sample_rate={RATE}" if configured else ""
        async with connect(ws_url(idle_server, query)) as ws:
            if configured:
                await expect(ws, "session.created")
            await expect(ws, "error", "policy")  # after 0.5 s without a message
            await expect_close(ws, 1008)

    asyncio.run(run())
    assert_stream_still_serves(idle_server, voice)
