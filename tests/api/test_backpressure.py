"""Overload and deadlines over HTTP: a fast 429 with Retry-After, a 504 past the deadline."""

import asyncio
import time
from pathlib import Path

import httpx

from service.api.app import create_app
from tests.conftest import LiveServer, settings_for


def test_full_queue_is_429_at_once_and_deadline_is_504(
    checkpoints: dict[str, Path], speech_wav: bytes
) -> None:
    # One queue slot; a lone request waits up to 1 s for company before it runs.
    settings = settings_for(checkpoints["wav2vec2-bert"], max_queue_size=1, max_wait_ms=1000)
    with LiveServer(create_app(settings)) as server:
        url = server.url + "/v1/audio/transcriptions"

        async def scenario() -> tuple[httpx.Response, httpx.Response, float]:
            async with httpx.AsyncClient(timeout=60) as client:
                first = asyncio.create_task(client.post(url, files={"file": ("a.wav", speech_wav)}))
                deadline = time.monotonic() + 30
                while (await client.get(server.url + "/ready")).json()["queued"] != 1:
                    assert time.monotonic() < deadline
                started = time.monotonic()
                second = await client.post(url, files={"file": ("a.wav", speech_wav)})
                rejected_in = time.monotonic() - started
                return await first, second, rejected_in

        first, second, rejected_in = asyncio.run(scenario())
        assert first.status_code == 200
        assert second.status_code == 429
        assert second.json()["error"]["code"] == "queue_full"
        assert int(second.headers["retry-after"]) >= 1
        assert rejected_in < 1.0  # not held until the queue drains

        late = httpx.post(
            url, files={"file": ("a.wav", speech_wav)}, data={"timeout": "0.3"}, timeout=60
        )
        assert late.status_code == 504
        assert late.json()["error"]["code"] == "deadline_exceeded"
        assert httpx.post(url, files={"file": ("a.wav", speech_wav)}, timeout=60).status_code == 200
