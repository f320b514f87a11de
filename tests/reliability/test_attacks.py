"""Attacks from the second reliability pass (issue 22), each against a live server on loopback.

Every attack is scaled down to what two shared cores run in seconds; each test says how, and
which property the smaller attack still proves.
"""

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from service.api.app import create_app
from tests.conftest import LiveServer, settings_for, speak
from tests.reliability.test_bad_input import (
    RATE,
    assert_error,
    assert_still_serving,
    assert_stream_still_serves,
    expect,
    pcm16,
    upload,
    ws_url,
)


@pytest.fixture(scope="module")
def voice() -> np.ndarray:
    """'three four five' at 16 kHz with half a second of quiet after it (ends an utterance)."""
    spoken = soxr.resample(speak("three four five"), 22_050, RATE).astype(np.float32)
    return np.concatenate([spoken, np.zeros(RATE // 2, np.float32)])


# ---------------------------------------------------------------------------------------------
# item 5: values that become 0 (or infinite) in float32


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "1e-300"),
        ("temperature", "1e-45"),
        ("temperature", "1e-9"),
        ("repetition_penalty", "1e-300"),
        ("repetition_penalty", "1e-45"),
        ("repetition_penalty", "1e-9"),
    ],
)
def test_values_that_vanish_in_float32_are_400_not_500(
    tiny_server: LiveServer, speech_wav: bytes, field: str, value: str
) -> None:
    response = upload(tiny_server, speech_wav, **{field: value})
    error = assert_error(response, 400, "invalid_value", field)
    assert "0.01" in error["message"], error
    assert_still_serving(tiny_server, speech_wav)


def test_smallest_allowed_values_transcribe(tiny_server: LiveServer, speech_wav: bytes) -> None:
    """The bounds refuse only what breaks the arithmetic: their own edge still transcribes."""
    for fields in ({"temperature": "0.01", "seed": "1"}, {"repetition_penalty": "0.01"}):
        response = upload(tiny_server, speech_wav, **fields)
        assert response.status_code == 200, (fields, response.text)


# ---------------------------------------------------------------------------------------------
# item 7: websocket messages that break the JSON parser


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000, "[" * 50_000 + "]" * 50_000],
    ids=["100k-open-brackets", "50k-nested-objects", "50k-nested-lists"],
)
def test_deeply_nested_json_is_invalid_json_and_the_session_goes_on(
    tiny_server: LiveServer, voice: np.ndarray, text: str
) -> None:
    async def run() -> None:
        async with connect(ws_url(tiny_server), max_size=None) as ws:
            await ws.send(text)
            await expect(ws, "error", "invalid_json")
            await ws.send(json.dumps({"type": "config", "sample_rate": RATE}))
            await expect(ws, "session.created")
            await ws.send(text)  # configured: still only an error event
            await expect(ws, "error", "invalid_json")
            await ws.send(pcm16(voice))
            await ws.send(json.dumps({"type": "end"}))
            events: list[dict[str, Any]] = [json.loads(m) async for m in ws]
            kinds = [e["type"] for e in events if e["type"] != "transcript.partial"]
            assert kinds == ["transcript.final", "session.ended"], events
            assert ws.close_code == 1000

    asyncio.run(run())
    assert_stream_still_serves(tiny_server, voice)


# ---------------------------------------------------------------------------------------------
# item 4: slot hogging by sessions that never configure, or send only invalid messages
#
# Scale-down: the attack held 32 slots with one invalid message every 10 s against a 30 s idle
# timeout; here the timeouts are 0.6 s (config) and 1 s (idle) and the messages come every
# 0.2 s, so each message arrives well inside the window that would reset a timer.

KEYS = ("key-a", "key-b")


@pytest.fixture(scope="module")
def hog_server(checkpoints: dict[str, Path]) -> Iterator[LiveServer]:
    settings = settings_for(
        checkpoints["wav2vec2-bert"],
        stream_config_timeout_s=0.6,
        stream_idle_timeout_s=1.0,
        max_streams=8,
        max_streams_per_client=2,
        api_keys=",".join(KEYS),
    )
    with LiveServer(create_app(settings)) as server:
        yield server


def keyed(server: LiveServer, key: str, query: str = "") -> str:
    return ws_url(server, "&".join(q for q in (f"api_key={key}", query) if q))


async def chatter_until_closed(ws: ClientConnection, message: str | bytes) -> list[str]:
    """Send `message` every 0.2 s until the server closes; the error codes it sent."""
    codes: list[str] = []

    async def read() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                event = json.loads(raw)
                if event["type"] == "error":
                    codes.append(event["error"]["code"])

    reader = asyncio.create_task(read())
    with contextlib.suppress(ConnectionClosed):
        while not reader.done():
            await ws.send(message)
            await asyncio.sleep(0.2)
    await reader
    return codes


@pytest.mark.parametrize(
    "message", ['{"type": "dance"}', "{not json", b"\x00\x00"], ids=["unknown", "bad-json", "audio"]
)
def test_session_that_never_configures_is_closed(
    hog_server: LiveServer, voice: np.ndarray, message: str | bytes
) -> None:
    async def run() -> float:
        started = time.monotonic()
        async with connect(keyed(hog_server, KEYS[0])) as ws:
            codes = await asyncio.wait_for(chatter_until_closed(ws, message), 10)
            assert ws.close_code == 1008, ws.close_reason
            assert codes[-1] == "policy", codes
            assert "config" in (ws.close_reason or ""), ws.close_reason
        return time.monotonic() - started

    elapsed = asyncio.run(run())
    assert elapsed < 3, elapsed  # closed at the 0.6 s config deadline, not kept alive


def test_invalid_messages_do_not_keep_a_configured_session_alive(
    hog_server: LiveServer, voice: np.ndarray
) -> None:
    async def run() -> float:
        async with connect(keyed(hog_server, KEYS[0], f"sample_rate={RATE}")) as ws:
            await expect(ws, "session.created")
            await ws.send(pcm16(voice[: RATE // 4]))  # a little audio: activity
            started = time.monotonic()
            await asyncio.wait_for(chatter_until_closed(ws, '{"type": "dance"}'), 10)
            assert ws.close_code == 1008, ws.close_reason
            assert "idle" in (ws.close_reason or ""), ws.close_reason
        return time.monotonic() - started

    elapsed = asyncio.run(run())
    assert elapsed < 3.5, elapsed  # closed at the 1 s idle deadline


def test_audio_keeps_a_session_alive_past_the_idle_timeout(
    hog_server: LiveServer, voice: np.ndarray
) -> None:
    """The idle clock still counts real audio as activity (2 s of audio at real time > 1 s)."""

    async def run() -> None:
        async with connect(keyed(hog_server, KEYS[0], f"sample_rate={RATE}")) as ws:
            await expect(ws, "session.created")
            quiet = np.zeros(RATE // 5, np.float32)
            for _ in range(10):
                await ws.send(pcm16(quiet))
                await asyncio.sleep(0.2)
            await ws.send(json.dumps({"type": "end"}))
            events = [json.loads(m) async for m in ws]
            assert events[-1]["type"] == "session.ended", events
            assert ws.close_code == 1000

    asyncio.run(run())


def test_one_client_cannot_take_every_stream_slot(
    hog_server: LiveServer, voice: np.ndarray
) -> None:
    """Two sessions per key (`max_streams_per_client=2` of 8): the third with the same key is
    closed with 1013, while another key still gets a session."""

    async def run() -> None:
        query = f"sample_rate={RATE}"
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(2):
                ws = await stack.enter_async_context(connect(keyed(hog_server, KEYS[0], query)))
                await expect(ws, "session.created")
            async with connect(keyed(hog_server, KEYS[0], query)) as third:
                await expect(third, "error", "too_many_streams")
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(third.recv(), 10)
                assert third.close_code == 1013
            async with connect(keyed(hog_server, KEYS[1], query)) as other:
                await expect(other, "session.created")
                await other.send(pcm16(voice))
                await other.send(json.dumps({"type": "end"}))
                events = [json.loads(m) async for m in other]
                finals = [e for e in events if e["type"] == "transcript.final"]
                assert len(finals) == 1, events
                assert finals[0]["text"], events
        # the slots are the client's again once its sessions end
        async with connect(keyed(hog_server, KEYS[0], query)) as again:
            await expect(again, "session.created")

    asyncio.run(run())
