"""Overload and deadlines over HTTP: a fast 429 with Retry-After, a 504 past the deadline.

The worker is held (`WorkerHold`) while the queue is filled, so "the queue is full" is a state
that lasts as long as the test needs, not a window the batcher may close first.
"""

import asyncio
import time
from pathlib import Path

import httpx

from service.api.app import create_app
from tests.conftest import LiveServer, WorkerHold, settings_for


async def queued(client: httpx.AsyncClient, count: int) -> None:
    deadline = time.monotonic() + 60
    while (await client.get("/ready")).json()["queued"] != count:
        assert time.monotonic() < deadline, "the request never queued"
        await asyncio.sleep(0.02)


def test_full_queue_is_429_at_once_and_deadline_is_504(
    checkpoints: dict[str, Path], speech_wav: bytes
) -> None:
    # One queue slot, one worker taking one request at a time.
    settings = settings_for(
        checkpoints["wav2vec2-bert"], max_queue_size=1, max_batch_size=1, cpu_workers=1
    )
    with LiveServer(create_app(settings)) as server:
        url = "/v1/audio/transcriptions"
        files = {"file": ("a.wav", speech_wav)}

        async def full_queue() -> tuple[httpx.Response, httpx.Response, httpx.Response, float]:
            hold = WorkerHold(server.app.state.engine)
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                running = asyncio.create_task(client.post(url, files=files))
                assert await asyncio.to_thread(hold.entered.wait, 60)  # the worker has it
                waiting = asyncio.create_task(client.post(url, files=files))
                await queued(client, 1)  # the one slot is taken
                started = time.monotonic()
                refused = await client.post(url, files=files)
                refused_in = time.monotonic() - started
                hold.release()
                return await running, await waiting, refused, refused_in

        running, waiting, refused, refused_in = asyncio.run(full_queue())
        assert (running.status_code, waiting.status_code) == (200, 200)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) >= 1
        assert refused_in < 1.0  # not held until the queue drains

        async def past_deadline() -> tuple[httpx.Response, httpx.Response, float]:
            hold = WorkerHold(server.app.state.engine)
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                running = asyncio.create_task(client.post(url, files=files))
                assert await asyncio.to_thread(hold.entered.wait, 60)
                started = time.monotonic()
                late = await client.post(url, files=files, data={"timeout": "0.3"})
                late_in = time.monotonic() - started
                hold.release()
                return await running, late, late_in

        running, late, late_in = asyncio.run(past_deadline())
        assert running.status_code == 200
        assert late.status_code == 504
        assert late.json()["error"]["code"] == "deadline_exceeded"
        assert 0.3 <= late_in < 5  # answered at its deadline, not when the worker got to it
        assert httpx.post(server.url + url, files=files, timeout=60).status_code == 200
