"""OpenAI Realtime transcription sessions, end to end: a real uvicorn server driven by the
official `openai` SDK (`client.realtime.connect`) and, for what the SDK cannot send (malformed
events, browser subprotocols, beta headers), by a plain websocket client."""

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soxr
from openai import AsyncOpenAI
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from service.api.app import create_app
from service.settings import Settings
from service.streaming.pcm import _G711
from tests.api.test_stream import PHRASES, rest_text, spoken
from tests.conftest import LiveServer, encode, settings_for, speak

RATE = 24_000  # the Realtime API's PCM rate
CHUNK = RATE // 10  # 100 ms per append

COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"


def pcm24(audio_22k: np.ndarray) -> bytes:
    """espeak-ng's 22.05 kHz speech as the 24 kHz pcm16 a Realtime client sends."""
    audio = soxr.resample(audio_22k, 22_050, RATE)
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def client_for(server: LiveServer, api_key: str = "unused") -> AsyncOpenAI:
    return AsyncOpenAI(
        api_key=api_key,
        base_url=server.url + "/v1",
        websocket_base_url=server.url.replace("http://", "ws://") + "/v1",
    )


def ws_url(server: LiveServer, query: str = "intent=transcription") -> str:
    return server.url.replace("http://", "ws://") + "/v1/realtime?" + query


def as_dict(event: Any) -> dict[str, Any]:
    return event if isinstance(event, dict) else event.model_dump(exclude_unset=True)


async def send_audio(conn: Any, data: bytes, paced: bool) -> None:
    """Append `data` (pcm16) in 100 ms events, at real-time pace if `paced`."""
    started = time.monotonic()
    for k, offset in enumerate(range(0, len(data), 2 * CHUNK)):
        piece = data[offset : offset + 2 * CHUNK]
        await conn.input_audio_buffer.append(audio=base64.b64encode(piece).decode())
        if paced:
            await asyncio.sleep(max(0.0, started + (k + 1) * 0.1 - time.monotonic()))


async def events_until(conn: Any, done: Any, timeout: float = 60) -> list[dict[str, Any]]:
    """Server events (as dicts, with their arrival time under `_t`) until `done(events)`."""
    events: list[dict[str, Any]] = []

    async def read() -> None:
        async for event in conn:
            events.append({**as_dict(event), "_t": time.monotonic()})
            if done(events):
                return

    await asyncio.wait_for(read(), timeout)
    return events


def count(kind: str) -> Any:
    return lambda events: sum(e["type"] == kind for e in events)


@pytest.fixture(scope="module")
def bundled_server() -> Iterator[LiveServer]:
    with LiveServer(create_app(Settings())) as server:
        yield server


@pytest.mark.slow
def test_server_vad_two_utterances_with_the_official_client(bundled_server: LiveServer) -> None:
    speech = spoken(("set a timer for five minutes", "three four five"))
    lead = np.zeros(int(0.4 * 22_050), np.float32)
    data = pcm24(np.concatenate([lead, speech.audio]))

    async def scenario() -> list[dict[str, Any]]:
        async with client_for(bundled_server).realtime.connect(
            model="", extra_query={"intent": "transcription"}
        ) as conn:
            await conn.session.update(
                session={
                    "type": "transcription",
                    "audio": {"input": {"transcription": {"language": None}}},
                    "include": ["item.input_audio_transcription.logprobs"],
                }
            )
            sender = asyncio.create_task(send_audio(conn, data, paced=True))
            events = await events_until(conn, lambda ev: count(COMPLETED)(ev) == 2)
            await sender
            return events

    events = asyncio.run(scenario())
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["session.created", "session.updated"]
    assert events[0]["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
    assert events[1]["session"]["include"] == ["item.input_audio_transcription.logprobs"]
    assert "error" not in kinds
    started = [e for e in events if e["type"] == "input_audio_buffer.speech_started"]
    stopped = [e for e in events if e["type"] == "input_audio_buffer.speech_stopped"]
    committed = [e for e in events if e["type"] == "input_audio_buffer.committed"]
    completed = [e for e in events if e["type"] == COMPLETED]
    assert len(started) == len(stopped) == len(committed) == len(completed) == 2
    items = [e["item_id"] for e in committed]
    assert [e["item_id"] for e in started] == [e["item_id"] for e in stopped] == items
    assert [e["item_id"] for e in completed] == items
    assert committed[0].get("previous_item_id") is None
    assert committed[1]["previous_item_id"] == items[0]
    offset = len(lead) / 22_050
    for i, (start, end) in enumerate(speech.bounds):
        # audio_start_ms includes prefix_padding_ms (300), as OpenAI's does
        assert abs(started[i]["audio_start_ms"] / 1000 + 0.3 - (start + offset)) <= 0.3
        assert abs(stopped[i]["audio_end_ms"] / 1000 - (end + offset)) <= 0.3
    for event, piece in zip(completed, speech.pieces, strict=True):
        assert event["transcript"] == rest_text(bundled_server, piece)  # as an upload
        assert event["usage"]["type"] == "duration"
        assert event["usage"]["seconds"] > 0.5
        logprobs = event["logprobs"]
        assert logprobs
        assert all(p["logprob"] <= 0 and p["bytes"] == list(p["token"].encode()) for p in logprobs)
    assert [c["transcript"] for c in completed] == [
        "set a timer for five minutes",
        "three four five",
    ]
    # deltas: committed words while the speaker still talks, then the rest, so that in order
    # they spell the transcript; when the final re-transcription changed a word already sent
    # (the bundled model heard "seven" for the "set" of "set a timer" in some partials), no
    # rest is appended and `completed` is authoritative
    during_speech = 0
    for item, done, stop in zip(items, completed, stopped, strict=True):
        deltas = [e for e in events if e["type"] == DELTA and e["item_id"] == item]
        joined = "".join(d["delta"] for d in deltas)
        if done["transcript"].startswith(joined):
            assert joined == done["transcript"]  # the rest came as one more delta
        assert all(d["_t"] <= done["_t"] for d in deltas)
        during_speech += sum(d["_t"] < stop["_t"] for d in deltas)
    assert during_speech >= 1  # text before the end of speech: beyond what OpenAI sends
    for item in items:  # each item's events in protocol order
        order = [
            e["type"]
            for e in events
            if e.get("item_id") == item or e.get("item", {}).get("id") == item
        ]
        lifecycle = [k for k in order if k != DELTA]
        assert lifecycle == [
            "input_audio_buffer.speech_started",
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed",
            "conversation.item.added",
            "conversation.item.done",
            COMPLETED,
        ]


@pytest.mark.slow
def test_manual_commits_give_the_uploads_transcripts(bundled_server: LiveServer) -> None:
    quiet = np.zeros(int(0.4 * 22_050), np.float32)  # the bundled model wants quiet around speech
    phrases = [np.concatenate([quiet, speak(text), quiet]) for text in PHRASES[:2]]

    async def scenario() -> list[dict[str, Any]]:
        async with client_for(bundled_server).realtime.connect(
            model="", extra_query={"intent": "transcription"}
        ) as conn:
            await conn.session.update(
                session={"type": "transcription", "audio": {"input": {"turn_detection": None}}}
            )
            await conn.input_audio_buffer.commit(event_id="evt_empty")  # nothing yet: error
            await conn.input_audio_buffer.append(
                audio=base64.b64encode(b"\x01\x00" * 4000).decode()
            )
            await conn.input_audio_buffer.clear()
            for phrase in phrases:
                await send_audio(conn, pcm24(phrase), paced=False)
                await conn.input_audio_buffer.commit()
            return await events_until(conn, lambda ev: count(COMPLETED)(ev) == 2)

    events = asyncio.run(scenario())
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["session.created", "session.updated"]
    assert events[1]["session"]["audio"]["input"]["turn_detection"] is None
    (error,) = [e for e in events if e["type"] == "error"]
    assert error["error"]["code"] == "input_audio_buffer_commit_empty"
    assert error["error"]["event_id"] == "evt_empty"
    assert "input_audio_buffer.cleared" in kinds
    assert "input_audio_buffer.speech_started" not in kinds  # no VAD in manual mode
    completed = [e for e in events if e["type"] == COMPLETED]
    for event, phrase in zip(completed, phrases, strict=True):
        # the upload of exactly the audio appended: the same 24 kHz samples as a WAV file
        samples = np.frombuffer(pcm24(phrase), "<i2").astype(np.float32) / 32768
        upload = httpx.post(
            bundled_server.url + "/v1/audio/transcriptions",
            files={"file": ("a.wav", encode(samples, RATE))},
            timeout=60,
        )
        assert event["transcript"] == upload.json()["text"]
    assert [e["transcript"] for e in completed] == list(PHRASES[:2])


def _ulaw_encode(audio: np.ndarray) -> bytes:
    """Nearest mu-law code of each sample (test-side encoder: the inverse of the table)."""
    table = _G711["g711_ulaw"]
    order = np.argsort(table)
    sorted_values = table[order]
    index = np.clip(np.searchsorted(sorted_values, audio), 1, 255)
    left, right = sorted_values[index - 1], sorted_values[index]
    nearest = np.where(audio - left < right - audio, index - 1, index)
    return order[nearest].astype(np.uint8).tobytes()


@pytest.mark.slow
def test_g711_ulaw_input_is_decoded(bundled_server: LiveServer) -> None:
    phrase = soxr.resample(speak("open the garage"), 22_050, 8_000).astype(np.float32)
    codes = _ulaw_encode(phrase)

    async def scenario() -> list[dict[str, Any]]:
        async with client_for(bundled_server).realtime.connect(
            model="", extra_query={"intent": "transcription"}
        ) as conn:
            await conn.session.update(
                session={
                    "type": "transcription",
                    "audio": {"input": {"format": {"type": "audio/pcmu"}, "turn_detection": None}},
                }
            )
            for offset in range(0, len(codes), 800):
                piece = codes[offset : offset + 800]
                await conn.input_audio_buffer.append(audio=base64.b64encode(piece).decode())
            await conn.input_audio_buffer.commit()
            return await events_until(conn, count(COMPLETED))

    events = asyncio.run(scenario())
    assert events[1]["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    decoded = _G711["g711_ulaw"][np.frombuffer(codes, np.uint8)]
    upload = httpx.post(
        bundled_server.url + "/v1/audio/transcriptions",
        files={"file": ("a.wav", encode(decoded, 8_000))},
        timeout=60,
    )
    assert events[-1]["transcript"] == upload.json()["text"] == "open the garage"


@pytest.fixture(scope="module")
def tiny_server(checkpoints: dict[str, Path]) -> Iterator[LiveServer]:
    settings = settings_for(
        checkpoints["wav2vec2-bert"],
        realtime_max_buffer_seconds=2,
        realtime_max_event_bytes=64 * 1024,
        model_aliases=["whisper-1"],
    )
    with LiveServer(create_app(settings)) as server:
        yield server


async def recv(ws: ClientConnection) -> dict[str, Any]:
    return dict(json.loads(await asyncio.wait_for(ws.recv(), 30)))


async def expect_error(ws: ClientConnection, message: Any, code: str, param: str | None) -> None:
    await ws.send(message if isinstance(message, str | bytes) else json.dumps(message))
    event = await recv(ws)
    assert event["type"] == "error", event
    assert event["error"]["code"] == code, event
    assert event["error"]["param"] == param, event
    assert event["event_id"].startswith("event_")
    if isinstance(message, dict) and "event_id" in message:
        assert event["error"]["event_id"] == message["event_id"]


def test_bad_client_events_get_error_events_and_the_session_goes_on(
    tiny_server: LiveServer,
) -> None:
    def update(session: dict[str, Any], event_id: str = "evt_1") -> dict[str, Any]:
        return {"type": "session.update", "event_id": event_id, "session": session}

    ga = {"type": "transcription"}
    inp = "session.audio.input"

    async def scenario() -> None:
        async with connect(ws_url(tiny_server)) as ws:
            created = await recv(ws)
            assert created["type"] == "session.created"
            await expect_error(ws, "{nope", "invalid_json", None)
            await expect_error(ws, b"\x00\x01", "invalid_value", None)
            await expect_error(
                ws, {"type": "response.create", "event_id": "e1"}, "invalid_value", "type"
            )
            await expect_error(
                ws,
                {"type": "input_audio_buffer.append", "event_id": "e2", "audio": "%%%"},
                "invalid_value",
                "audio",
            )
            await expect_error(
                ws,
                {"type": "input_audio_buffer.append", "event_id": "e3", "audio": "AAA=", "x": 1},
                "invalid_value",
                "x",
            )
            await expect_error(
                ws,  # 3 bytes: not whole 16-bit samples
                {"type": "input_audio_buffer.append", "event_id": "e4", "audio": "AAAA"},
                "invalid_value",
                "audio",
            )
            await expect_error(ws, update({"type": "realtime"}), "invalid_value", "session.type")
            await expect_error(
                ws,
                update({**ga, "audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}),
                "unsupported",
                f"{inp}.turn_detection.type",
            )
            await expect_error(
                ws,
                update({**ga, "audio": {"input": {"noise_reduction": {"type": "near_field"}}}}),
                "unsupported",
                f"{inp}.noise_reduction",
            )
            await expect_error(
                ws,
                update({**ga, "audio": {"input": {"transcription": {"model": "gpt-9"}}}}),
                "model_not_found",
                f"{inp}.transcription.model",
            )
            await expect_error(
                ws,
                update(
                    {**ga, "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}
                ),
                "invalid_value",
                f"{inp}.format.rate",
            )
            await expect_error(
                ws,
                update(
                    {
                        **ga,
                        "audio": {
                            "input": {"turn_detection": {"type": "server_vad", "threshold": 2}}
                        },
                    }
                ),
                "invalid_value",
                f"{inp}.turn_detection.threshold",
            )
            await expect_error(
                ws, update({**ga, "voice": "alloy"}), "invalid_value", "session.voice"
            )
            await expect_error(
                ws,
                update({**ga, "audio": {"input": {"transcription": {"prompt": "x" * 2001}}}}),
                "invalid_value",
                f"{inp}.transcription.prompt",
            )
            # the session object of session.created, sent back as it came, is a valid update
            await ws.send(json.dumps({"type": "session.update", "session": created["session"]}))
            assert (await recv(ws))["type"] == "session.updated"
            # the session is still there and takes a good update (an alias names the model)
            await ws.send(
                json.dumps(
                    update({**ga, "audio": {"input": {"transcription": {"model": "whisper-1"}}}})
                )
            )
            updated = await recv(ws)
            assert updated["type"] == "session.updated"
            assert updated["session"]["audio"]["input"]["transcription"]["model"] == "whisper-1"

    asyncio.run(scenario())


def test_limits_buffer_message_size_sessions_and_idle(checkpoints: dict[str, Path]) -> None:
    settings = settings_for(
        checkpoints["wav2vec2-bert"],
        max_streams=1,
        stream_idle_timeout_s=1.0,
        realtime_max_buffer_seconds=2,
        realtime_max_event_bytes=64 * 1024,
    )
    second = b"\x00\x10" * RATE  # one second of quiet pcm16 at 24 kHz (64 KB as base64)

    async def scenario() -> None:
        async with connect(ws_url(server)) as ws:
            assert (await recv(ws))["type"] == "session.created"
            async with connect(ws_url(server)) as other:  # one session at most
                refused = await recv(other)
                assert refused["error"]["code"] == "session_limit"
                with pytest.raises(ConnectionClosed):
                    await other.recv()
                assert other.close_code == 1013
            await ws.send(
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {
                            "type": "transcription",
                            "audio": {"input": {"turn_detection": None}},
                        },
                    }
                )
            )
            assert (await recv(ws))["type"] == "session.updated"
            half = base64.b64encode(second[: len(second) // 2]).decode()
            for _ in range(4):  # 2 s: at the limit
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": half}))
            await expect_error(
                ws,
                {"type": "input_audio_buffer.append", "event_id": "full", "audio": half},
                "input_audio_buffer_full",
                "audio",
            )
            await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            assert (await recv(ws))["type"] == "input_audio_buffer.cleared"
            await ws.send(
                json.dumps({"type": "input_audio_buffer.append", "audio": half})
            )  # room again
            # then silence from the client: closed after the idle timeout, with an error event
            event = await recv(ws)
            assert event["type"] == "error"
            assert event["error"]["code"] == "policy"
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1008
        async with connect(ws_url(server)) as ws:  # the slot is free again
            assert (await recv(ws))["type"] == "session.created"
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 70_000}))
            event = await recv(ws)
            assert event["error"]["code"] == "too_large"
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1009

    with LiveServer(create_app(settings)) as server:
        asyncio.run(scenario())


def test_leaving_mid_utterance_cancels_the_session(checkpoints: dict[str, Path]) -> None:
    voice = pcm24(speak("set a timer for ten minutes"))
    with LiveServer(create_app(settings_for(checkpoints["wav2vec2-bert"]))) as server:

        async def scenario() -> None:
            async with connect(ws_url(server)) as ws:
                assert (await recv(ws))["type"] == "session.created"
                for offset in range(0, len(voice) // 2, 4800):
                    chunk = base64.b64encode(voice[offset : offset + 4800]).decode()
                    await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))

        asyncio.run(scenario())
        deadline = time.monotonic() + 10
        while True:
            text = httpx.get(server.url + "/metrics").text
            if 'stt_streams_closed_total{reason="client_gone"} 1.0' in text:
                break
            assert time.monotonic() < deadline, text
        assert "stt_streams_active 0.0" in text


def test_keys_by_header_subprotocol_and_query(checkpoints: dict[str, Path]) -> None:
    settings = settings_for(checkpoints["wav2vec2-bert"], api_keys="sekrit")

    async def scenario() -> None:
        async with client_for(server, "sekrit").realtime.connect(
            model="", extra_query={"intent": "transcription"}
        ) as conn:
            assert as_dict(await conn.recv())["type"] == "session.created"
        with pytest.raises(Exception, match="401"):
            async with client_for(server, "wrong").realtime.connect(
                model="", extra_query={"intent": "transcription"}
            ) as conn:
                await conn.recv()
        # a browser: the key as a subprotocol, next to "realtime" (which the server selects)
        async with connect(
            ws_url(server),
            subprotocols=["realtime", "openai-insecure-api-key.sekrit"],  # type: ignore[list-item]
        ) as ws:
            assert ws.subprotocol == "realtime"
            assert (await recv(ws))["type"] == "session.created"
        async with connect(ws_url(server, "intent=transcription&api_key=sekrit")) as ws:
            assert (await recv(ws))["type"] == "session.created"
        for refused in (
            connect(ws_url(server), subprotocols=["realtime", "openai-insecure-api-key.nope"]),  # type: ignore[list-item]
            connect(ws_url(server)),
        ):
            with pytest.raises(InvalidStatus) as caught:
                async with refused:
                    pass
            assert caught.value.response.status_code == 401

    with LiveServer(create_app(settings)) as server:
        asyncio.run(scenario())


def test_beta_names_and_session_shape(tiny_server: LiveServer) -> None:
    async def scenario() -> None:
        async with connect(
            ws_url(tiny_server), additional_headers={"OpenAI-Beta": "realtime=v1"}
        ) as ws:
            created = await recv(ws)
            assert created["type"] == "transcription_session.created"
            assert created["session"]["input_audio_format"] == "pcm16"
            await ws.send(
                json.dumps(
                    {
                        "type": "transcription_session.update",
                        "session": {
                            "input_audio_format": "g711_alaw",
                            "input_audio_transcription": {"model": "whisper-1"},
                            "turn_detection": None,
                        },
                    }
                )
            )
            updated = await recv(ws)
            assert updated["type"] == "transcription_session.updated"
            assert updated["session"]["input_audio_format"] == "g711_alaw"
            assert updated["session"]["turn_detection"] is None
            assert updated["session"]["input_audio_transcription"]["model"] == "whisper-1"
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": "c"}))
            error = await recv(ws)
            assert error["error"]["code"] == "input_audio_buffer_commit_empty"
        async with connect(ws_url(tiny_server, "intent=conversation")) as ws:
            error = await recv(ws)
            assert error["error"]["code"] == "unsupported"
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1008

    asyncio.run(scenario())


def test_format_changes_between_turns_keep_pending_transcripts(tiny_server: LiveServer) -> None:
    voice = pcm24(speak("three four five"))
    quiet = b"\x00\x00" * RATE  # one second of silence ends the turn (server_vad, 500 ms)

    async def append(ws: ClientConnection, data: bytes) -> None:
        for offset in range(0, len(data), 9600):
            chunk = base64.b64encode(data[offset : offset + 9600]).decode()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))

    async def scenario() -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        async with connect(ws_url(tiny_server)) as ws:

            async def until(kind: str) -> dict[str, Any]:
                while True:
                    events.append(await recv(ws))
                    if events[-1]["type"] == kind:
                        return events[-1]

            await until("session.created")
            await append(ws, voice + quiet)
            await until("input_audio_buffer.committed")  # server_vad found the turn's end
            manual_pcmu = {
                "type": "transcription",
                "audio": {"input": {"format": {"type": "audio/pcmu"}, "turn_detection": None}},
            }
            await ws.send(json.dumps({"type": "session.update", "session": manual_pcmu}))
            await until("session.updated")
            await append(ws, _ulaw_encode(np.full(4000, 0.01, np.float32)))
            back = {**manual_pcmu, "audio": {"input": {"format": {"type": "audio/pcm"}}}}
            await ws.send(json.dumps({"type": "session.update", "event_id": "u2", "session": back}))
            refused = await until("error")  # audio waits in the buffer: commit or clear first
            assert refused["error"]["code"] == "invalid_state"
            assert refused["error"]["event_id"] == "u2"
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            while sum(e["type"] == COMPLETED for e in events) < 2:
                events.append(await recv(ws))
        return events

    events = asyncio.run(scenario())
    committed = [e for e in events if e["type"] == "input_audio_buffer.committed"]
    completed = [e for e in events if e["type"] == COMPLETED]
    assert [e["item_id"] for e in completed] == [e["item_id"] for e in committed]
    assert committed[1]["previous_item_id"] == committed[0]["item_id"]  # one conversation
    assert completed[1]["usage"]["seconds"] == pytest.approx(0.5, abs=0.02)  # 4000 at 8 kHz
    assert not [e for e in events if e["type"] == "error" and e["error"]["code"] != "invalid_state"]
