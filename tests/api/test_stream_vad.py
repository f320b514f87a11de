"""`/v1/audio/stream` sessions with the Silero detector (`vad=silero`) instead of the energy one."""

import asyncio
import json
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import connect

from service.api.app import create_app
from service.settings import Settings
from tests.api.test_stream import RATE, check_finals, pcm16, spoken, stream_audio, ws_url
from tests.conftest import LiveServer


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer(create_app(Settings())) as live:
        yield live


@pytest.mark.slow
def test_silero_sessions_give_exact_finals(server: LiveServer) -> None:
    speech = spoken()
    events, _ = asyncio.run(
        stream_audio(ws_url(server, f"sample_rate={RATE}&vad=silero"), pcm16(speech.audio), 882)
    )
    created = events[0][1]
    assert created["type"] == "session.created"
    assert created["config"]["vad"] == "silero"
    check_finals([e for _, e in events], speech, server)


def test_default_vad_is_the_settings_and_bad_values_are_refused(server: LiveServer) -> None:
    async def scenario() -> None:
        async with connect(ws_url(server, "")) as ws:
            await ws.send(json.dumps({"type": "config", "vad": "webrtc"}))
            error = json.loads(await ws.recv())
            assert error["error"]["code"] == "invalid_config"
            assert "vad" in error["error"]["message"]
            await ws.send(json.dumps({"type": "config", "vad_threshold": 0.7}))
            created = json.loads(await ws.recv())
            assert created["config"]["vad"] == "energy"  # STT_STREAM_VAD's default
            assert created["config"]["vad_threshold"] == 0.7

    asyncio.run(scenario())
