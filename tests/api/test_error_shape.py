"""One error shape everywhere: raw-ASGI refusals (401, 413), route errors and websocket error
events all carry `message`, `type`, `param`, `code` and the request's id."""

import asyncio
import json

import httpx
from websockets.asyncio.client import connect

from service.api.app import create_app
from tests.conftest import LiveServer, settings_for

FIELDS = {"message", "type", "param", "code", "request_id"}


def test_every_refusal_has_the_same_shape(checkpoints: dict[str, object]) -> None:
    settings = settings_for(
        checkpoints["wav2vec2-bert"],  # type: ignore[arg-type]
        api_keys="k1",
        max_upload_bytes=1000,
        cpu_workers=1,
    )
    with LiveServer(create_app(settings)) as server, httpx.Client(base_url=server.url) as client:
        answers = {
            "auth": client.get("/v1/models"),
            "too_large": client.post(
                "/v1/audio/transcriptions",
                headers={"Authorization": "Bearer k1"},
                files={"file": ("a.wav", b"x" * 5000)},
            ),
            "validation": client.post(
                "/v1/audio/transcriptions",
                headers={"Authorization": "Bearer k1"},
                files={"file": ("a.wav", b"x" * 10)},
                data={"temperature": "7"},
            ),
            "not_found": client.get("/nope", headers={"Authorization": "Bearer k1"}),
        }
        for name, answer in answers.items():
            error = answer.json()["error"]
            assert set(error) == FIELDS, (name, error)
            assert error["request_id"] == answer.headers["x-request-id"], name
        assert answers["auth"].status_code == 401
        assert answers["auth"].json()["error"]["code"] == "invalid_api_key"
        assert answers["too_large"].status_code == 413
        assert answers["too_large"].json()["error"]["param"] == "file"
        assert answers["validation"].json()["error"]["param"] == "temperature"

        async def bad_messages() -> None:
            url = server.url.replace("http", "ws") + "/v1/audio/stream?api_key=k1"
            async with connect(url) as ws:
                request_id = ws.response.headers["x-request-id"]
                await ws.send("not json")
                await ws.send(json.dumps({"type": "config", "num_beams": 0}))
                for expected in ("invalid_json", "invalid_config"):
                    event = json.loads(await ws.recv())
                    assert event["type"] == "error"
                    assert set(event["error"]) == FIELDS
                    assert event["error"]["code"] == expected
                    assert event["error"]["request_id"] == request_id
                    if expected == "invalid_config":
                        assert event["error"]["param"] == "num_beams"

        asyncio.run(bad_messages())
