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


def test_stream_config_is_checked_like_the_upload_form(
    checkpoints: dict[str, object], speech_wav: bytes
) -> None:
    """The same values are refused with the same message and `param` on both transports."""
    settings = settings_for(
        checkpoints["wav2vec2-bert"],  # type: ignore[arg-type]
        max_num_beams=2,
        max_new_tokens=20,
        cpu_workers=1,
    )
    cases = [
        {"num_beams": 3},
        {"max_new_tokens": 21},
        {"language": "hh"},
        {"language": "german"},  # a real language this model has no token for
        {"model": "not-loaded"},
    ]
    with LiveServer(create_app(settings)) as server, httpx.Client(base_url=server.url) as client:
        uploads = [
            client.post(
                "/v1/audio/transcriptions",
                files={"file": ("a.wav", speech_wav)},
                data={k: str(v) for k, v in case.items()},
            ).json()["error"]
            for case in cases
        ]

        async def configs() -> list[dict[str, object]]:
            errors = []
            async with connect(server.url.replace("http", "ws") + "/v1/audio/stream") as ws:
                for case in cases:
                    await ws.send(json.dumps({"type": "config", **case}))
                    event = json.loads(await ws.recv())
                    assert event["type"] == "error", event
                    errors.append(event["error"])
                await ws.send(json.dumps({"type": "config", "language": "English"}))
                created = json.loads(await ws.recv())
                assert created["type"] == "session.created"
                assert created["config"]["language"] == "en"  # names map as on uploads
            return errors

        streamed = asyncio.run(configs())
    for case, upload, stream in zip(cases, uploads, streamed, strict=True):
        assert stream["code"] == "invalid_config", case
        assert stream["param"] == upload["param"] == next(iter(case)), (case, upload, stream)
        assert stream["message"].endswith(upload["message"].split(": ", 1)[-1]), (
            case,
            upload,
            stream,
        )
