"""Attacks from the second reliability pass (issue 22), each against a live server on loopback.

Every attack is scaled down to what two shared cores run in seconds; each test says how, and
which property the smaller attack still proves.
"""

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soxr
from websockets.asyncio.client import connect

from tests.conftest import LiveServer, speak
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


