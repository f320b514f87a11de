"""Websocket streaming end to end: a real uvicorn server and the `websockets` client library."""

import asyncio
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import soxr
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from service.api.app import create_app
from service.settings import Settings
from tests.conftest import LiveServer, encode, settings_for, speak

RATE = 22_050  # espeak-ng's rate: the stream is resampled to the model's 16 kHz
PHRASES = ("turn on the lights", "three four five", "set a timer for ten minutes")


@dataclass
class Spoken:
    """Speech with pauses, and where each phrase's voice really starts and ends (seconds)."""

    audio: np.ndarray
    bounds: list[tuple[float, float]]
    pieces: list[np.ndarray]


def spoken(phrases: tuple[str, ...] = PHRASES, pause: float = 1.0) -> Spoken:
    parts, bounds, pieces, at = [], [], [], 0
    for phrase in phrases:
        voice = speak(phrase)
        loud = np.flatnonzero(np.abs(voice) > 1e-3)
        bounds.append(((at + loud[0]) / RATE, (at + loud[-1]) / RATE))
        pieces.append(voice)
        silence = np.zeros(int(pause * RATE), np.float32)
        parts += [voice, silence]
        at += len(voice) + len(silence)
    return Spoken(np.concatenate(parts), bounds, pieces)


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def ws_url(server: LiveServer, query: str = f"sample_rate={RATE}") -> str:
    return server.url.replace("http://", "ws://") + "/v1/audio/stream" + (f"?{query}" * bool(query))


async def stream_audio(
    url: str, data: bytes, frame_bytes: int, realtime_rate: int | None = None
) -> tuple[list[tuple[float, dict]], float]:
    """Send the bytes in frames (at real-time pace if a rate is given), then `end`; return the
    events with their arrival times, and when the last frame was sent."""
    received: list[tuple[float, dict]] = []
    async with connect(url, max_size=None) as ws:

        async def read() -> None:
            async for message in ws:
                received.append((time.monotonic(), json.loads(message)))

        reader = asyncio.create_task(read())
        started = time.monotonic()
        for offset in range(0, len(data), frame_bytes):
            await ws.send(data[offset : offset + frame_bytes])
            if realtime_rate:
                due = started + (offset + frame_bytes) / 2 / realtime_rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))
        sent_all = time.monotonic()
        await ws.send(json.dumps({"type": "end"}))
        await reader
        assert ws.close_code == 1000
    return received, sent_all


@pytest.fixture(scope="module")
def bundled_server() -> Iterator[LiveServer]:
    with LiveServer(create_app(Settings())) as server:
        yield server


@pytest.fixture(scope="module")
def speech() -> Spoken:
    return spoken()


def rest_text(server: LiveServer, audio: np.ndarray) -> str:
    """The upload transcript of one phrase, as a clip with half a second of quiet around it."""
    quiet = np.zeros(RATE // 2, np.float32)
    audio = np.concatenate([quiet, audio, quiet])
    response = httpx.post(
        server.url + "/v1/audio/transcriptions",
        files={"file": ("a.wav", encode(audio, RATE))},
        timeout=60,
    )
    return str(response.json()["text"])


def check_finals(events: list[dict], speech: Spoken, server: LiveServer) -> None:
    finals = [e for e in events if e["type"] == "transcript.final"]
    assert [f["utterance"] for f in finals] == list(range(len(speech.bounds)))
    for final, (start, end), piece in zip(finals, speech.bounds, speech.pieces, strict=True):
        assert abs(final["start"] - start) <= 0.5
        assert abs(final["end"] - end) <= 0.5
        assert final["text"] == rest_text(server, piece)
    assert [f["text"] for f in finals][:2] == ["turn on the lights", "three four five"]


def test_realtime_stream_gives_partials_early_and_exact_finals(
    bundled_server: LiveServer, speech: Spoken
) -> None:
    events, sent_all = asyncio.run(
        stream_audio(ws_url(bundled_server), pcm16(speech.audio), 2 * 441, realtime_rate=RATE)
    )
    kinds = [e["type"] for _, e in events]
    assert kinds[0] == "session.created"
    assert kinds[-1] == "session.ended"
    partials = [(t, e) for t, e in events if e["type"] == "transcript.partial"]
    assert partials
    assert partials[0][0] < sent_all  # text while the audio still streams in
    for utterance in {e["utterance"] for _, e in partials}:
        committed = [e["committed"].split() for _, e in partials if e["utterance"] == utterance]
        for before, after in itertools.pairwise(committed):
            assert after[: len(before)] == before  # committed words never change or vanish
        for _, event in partials:
            assert event["text"] == " ".join(x for x in (event["committed"], event["tail"]) if x)
    check_finals([e for _, e in events], speech, bundled_server)


def test_fast_stream_in_odd_frames_gives_the_same_finals(
    bundled_server: LiveServer, speech: Spoken
) -> None:
    audio16 = soxr.resample(speech.audio, RATE, 16_000).astype("<f4")
    events, _ = asyncio.run(
        stream_audio(
            ws_url(bundled_server, "sample_rate=16000&encoding=f32le"), audio16.tobytes(), 4 * 777
        )
    )
    check_finals([e for _, e in events], speech, bundled_server)


async def expect(ws: ClientConnection, kind: str, code: str | None = None) -> dict:
    event = json.loads(await asyncio.wait_for(ws.recv(), 30))
    assert event["type"] == kind, event
    if code is not None:
        assert event["error"]["code"] == code, event
    return event


@pytest.fixture(scope="module")
def tiny_stream_server(checkpoints: dict[str, Path]) -> Iterator[LiveServer]:
    settings = settings_for(checkpoints["wav2vec2-bert"], max_frame_bytes=64 * 1024)
    with LiveServer(create_app(settings)) as server:
        yield server


def test_bad_messages_get_error_events_and_the_session_survives(
    tiny_stream_server: LiveServer,
) -> None:
    voice = pcm16(speak("three four five"))

    async def scenario() -> None:
        async with connect(ws_url(tiny_stream_server, "")) as ws:
            await ws.send(b"\x00\x00" * 100)
            await expect(ws, "error", "config_required")
            await ws.send(json.dumps({"type": "config", "sample_rate": 1}))
            await expect(ws, "error", "invalid_config")
            await ws.send(json.dumps({"type": "config", "num_beams": 999}))
            await expect(ws, "error", "invalid_config")
            await ws.send(json.dumps({"type": "config", "task": "translate"}))
            assert "cannot translate" in str(await expect(ws, "error", "invalid_config"))
            await ws.send(json.dumps({"type": "config", "sample_rate": RATE}))
            created = await expect(ws, "session.created")
            assert created["config"]["sample_rate"] == RATE
            await ws.send(b"\x01\x02\x03")  # odd byte count for 16-bit samples
            await expect(ws, "error", "bad_frame")
            await ws.send("{not json")
            await expect(ws, "error", "invalid_json")
            await ws.send(json.dumps({"type": "dance"}))
            await expect(ws, "error", "unknown_event")
            await ws.send(voice)
            await ws.send(json.dumps({"type": "config", "sample_rate": 16000}))
            await expect(ws, "error", "already_configured")
            await ws.send(json.dumps({"type": "end"}))
            events = [json.loads(m) async for m in ws]
            finals = [e for e in events if e["type"] == "transcript.final"]
            assert len(finals) == 1  # the good audio still made its final
            assert finals[0]["reason"] == "end_of_stream"
            assert events[-1]["type"] == "session.ended"
            assert ws.close_code == 1000

    asyncio.run(scenario())


def test_oversized_frame_closes_with_1009(tiny_stream_server: LiveServer) -> None:
    async def scenario() -> None:
        async with connect(ws_url(tiny_stream_server)) as ws:
            await expect(ws, "session.created")
            await ws.send(bytes(64 * 1024 + 2))
            await expect(ws, "error", "too_large")
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1009

    asyncio.run(scenario())


def test_stream_limit_idle_timeout_and_departure(checkpoints: dict[str, Path]) -> None:
    settings = settings_for(checkpoints["wav2vec2-bert"], max_streams=1, stream_idle_timeout_s=0.5)
    with LiveServer(create_app(settings)) as server:

        async def scenario() -> None:
            async with connect(ws_url(server)) as first:
                await expect(first, "session.created")
                async with connect(ws_url(server)) as second:
                    with pytest.raises(ConnectionClosed):
                        await second.recv()
                    assert second.close_code == 1013
                    assert "at most 1" in second.close_reason
                # the first goes quiet: closed after the idle timeout, with an error event
                await expect(first, "error", "policy")
                with pytest.raises(ConnectionClosed):
                    await first.recv()
                assert first.close_code == 1008
            async with connect(ws_url(server)) as third:  # the slot is free again
                await expect(third, "session.created")
                await third.send(pcm16(speak("turn on the lights"))[:RATE])  # mid-utterance
            # leaving without `end`: the session is closed as client_gone

        asyncio.run(scenario())
        deadline = time.monotonic() + 10
        while True:
            text = httpx.get(server.url + "/metrics").text
            if 'stt_streams_closed_total{reason="client_gone"} 1.0' in text:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
        assert "stt_streams_active 0.0" in text
        assert 'stt_streams_closed_total{reason="timeout"} 1.0' in text
        assert 'stt_rejections_total{reason="too_many_streams"} 1.0' in text
        assert "stt_streams_opened_total 2.0" in text


def test_readme_client_example_works(bundled_server: LiveServer) -> None:
    root = Path(__file__).parents[2]
    readme = (root / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:]]
    (example,) = [b for b in blocks if "/v1/audio/stream" in b]
    port = bundled_server.url.rsplit(":", 1)[1]
    code = example.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(": turn on the lights"), out.stdout + out.stderr


def test_session_past_its_maximum_length_is_flushed_and_closed(
    checkpoints: dict[str, Path],
) -> None:
    settings = settings_for(checkpoints["wav2vec2-bert"], max_stream_seconds=3.0)
    voice = pcm16(speak("three four five"))
    with LiveServer(create_app(settings)) as server:

        async def scenario() -> list[dict]:
            async with connect(ws_url(server)) as ws:
                await expect(ws, "session.created")
                await ws.send(voice)  # an utterance still open when the time is up
                events = []
                while ws.close_code is None:  # until the server closes
                    try:
                        events.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
                    except ConnectionClosed:
                        break
                assert ws.close_code == 1008
                return events

        events = asyncio.run(scenario())
    kinds = [e["type"] for e in events if e["type"] != "transcript.partial"]
    assert kinds == ["transcript.final", "error"]  # the open utterance's final comes first
    assert events[-1]["error"]["code"] == "policy"
    assert "maximum length" in events[-1]["error"]["message"]
