"""API keys on REST and websocket, the open probes, /metrics, and CORS."""

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from service.api.app import create_app
from tests.conftest import LiveServer, settings_for

TRANSCRIBE = "/v1/audio/transcriptions"


@pytest.fixture(scope="module")
def keyed(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    keys_file = tmp_path_factory.mktemp("secrets") / "keys"
    keys_file.write_text("# mounted secret\nfile-key\n\n")
    settings = settings_for(
        checkpoints["wav2vec2-bert"],
        api_keys="key-one, key-two",
        api_keys_file=keys_file,
        cors_origins="https://app.example",
    )
    with LiveServer(create_app(settings)) as server:
        yield server


def upload(server: LiveServer, audio: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        server.url + TRANSCRIBE, files={"file": ("a.wav", audio)}, headers=headers, timeout=60
    )


def assert_401(response: httpx.Response, message: str) -> None:
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key"
    assert message in error["message"]
    assert error["request_id"] == response.headers["x-request-id"]


def test_rest_needs_a_valid_key(keyed: LiveServer, speech_wav: bytes) -> None:
    assert_401(upload(keyed, speech_wav), "missing API key")
    assert_401(upload(keyed, speech_wav, Authorization="Bearer nope"), "invalid API key")
    assert_401(upload(keyed, speech_wav, Authorization="Basic key-one"), "missing API key")
    assert_401(upload(keyed, speech_wav, **{"X-API-Key": "key-on"}), "invalid API key")
    for headers in (
        {"Authorization": "Bearer key-one"},
        {"Authorization": "bearer key-two"},
        {"X-API-Key": "file-key"},
    ):
        assert upload(keyed, speech_wav, **headers).status_code == 200
    assert_401(httpx.get(keyed.url + "/v1/models"), "missing API key")
    assert_401(httpx.get(keyed.url + "/openapi.json"), "missing API key")


def test_an_unauthenticated_upload_is_refused_before_its_body(keyed: LiveServer) -> None:
    # larger than any upload limit: a 413 would mean the body was looked at first
    response = upload(keyed, bytes(30_000_000))
    assert_401(response, "missing API key")


def test_probes_are_open_and_metrics_are_not(keyed: LiveServer) -> None:
    assert httpx.get(keyed.url + "/health").status_code == 200
    assert httpx.get(keyed.url + "/ready").status_code == 200
    assert_401(httpx.get(keyed.url + "/metrics"), "missing API key")
    metrics = httpx.get(keyed.url + "/metrics", headers={"Authorization": "Bearer key-one"})
    assert metrics.status_code == 200
    assert 'stt_rejections_total{reason="auth"}' in metrics.text


def test_public_metrics_setting(checkpoints: dict[str, Path]) -> None:
    settings = settings_for(checkpoints["wav2vec2-bert"], api_keys="k", public_metrics=True)
    with LiveServer(create_app(settings)) as server:
        assert httpx.get(server.url + "/metrics").status_code == 200
        assert_401(httpx.get(server.url + "/v1/models"), "missing API key")


def test_the_openai_client_sends_its_key(keyed: LiveServer, speech_wav: bytes) -> None:
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key="key-two", max_retries=0)
    assert good.audio.transcriptions.create(model="tiny", file=("a.wav", speech_wav)).text
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.audio.transcriptions.create(model="tiny", file=("a.wav", speech_wav))


def test_websocket_is_refused_before_accept_without_a_key(keyed: LiveServer) -> None:
    url = keyed.url.replace("http://", "ws://") + "/v1/audio/stream?sample_rate=16000"

    async def status(target: str, headers: dict[str, str] | None = None) -> int | str:
        try:
            async with connect(target, additional_headers=headers) as ws:
                return str(json.loads(await ws.recv())["type"])
        except InvalidStatus as exc:
            return exc.response.status_code

    async def scenario() -> list[int | str]:
        return [
            await status(url),
            await status(url, {"Authorization": "Bearer wrong"}),
            await status(url, {"Authorization": "Bearer key-one"}),
            await status(url + "&api_key=file-key"),
        ]

    assert asyncio.run(scenario()) == [401, 401, "session.created", "session.created"]


def test_cors_only_for_configured_origins(keyed: LiveServer, checkpoints: dict[str, Path]) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    allowed = httpx.options(keyed.url + TRANSCRIBE, headers=preflight)
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.get(keyed.url + "/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    with LiveServer(create_app(settings_for(checkpoints["wav2vec2-bert"]))) as plain:
        response = httpx.get(plain.url + "/health", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in response.headers
