"""SIGTERM: in-flight and queued requests are answered, then the process exits cleanly; past
the drain timeout, what is still queued is refused and the process still exits."""

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import httpx

from tests.conftest import CLEAN_EXIT, HeldService

TRANSCRIBE = "/v1/audio/transcriptions"


async def queued(client: httpx.AsyncClient, count: int) -> None:
    """Wait until `count` requests are queued (a state that lasts while the worker is held)."""
    deadline = time.monotonic() + 60
    while (await client.get("/ready")).json().get("queued") != count:
        assert time.monotonic() < deadline, "the requests never queued"
        await asyncio.sleep(0.05)


def test_sigterm_answers_every_accepted_request(
    checkpoints: dict[str, Path], speech_wav: bytes, tmp_path: Path
) -> None:
    service = HeldService(
        tmp_path / "hold",
        STT_MODEL_DIR=str(checkpoints["wav2vec2-bert"]),
        STT_CPU_WORKERS="1",
        STT_MAX_BATCH_SIZE="1",
    )

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:
            service.hold()  # the worker takes one request and waits: the other three queue
            requests = [
                asyncio.create_task(client.post(TRANSCRIBE, files={"file": ("a.wav", speech_wav)}))
                for _ in range(4)
            ]
            await queued(client, 3)
            os.kill(service.proc.pid, signal.SIGTERM)
            await asyncio.to_thread(service.wait_for_log, "Shutting down")
            service.release()  # the server is shutting down with three requests queued
            responses = await asyncio.gather(*requests)
            return [r.status_code for r in responses]

    try:
        assert asyncio.run(scenario()) == [200, 200, 200, 200]
        assert service.proc.wait(60) in CLEAN_EXIT
    finally:
        service.proc.kill()
    with socket.socket() as sock:  # nothing listens any more
        assert sock.connect_ex(("127.0.0.1", service.port)) != 0


def test_past_the_drain_timeout_queued_requests_get_503_and_the_process_exits(
    checkpoints: dict[str, Path], speech_wav: bytes, tmp_path: Path
) -> None:
    # `STT_DRAIN_TIMEOUT_S=1`: SIGTERM with one request held by the worker and three queued
    # behind it, none released. When the drain timeout expires the pool stops: the batch in
    # hand runs to its end (200), the three still queued are refused 503 `unavailable` with
    # Retry-After in the error shape, well before uvicorn's own graceful timeout (drain + 5 s)
    # would cancel them with a bare 500, and the process exits cleanly.
    drain = 1.0
    service = HeldService(
        tmp_path / "hold",
        STT_MODEL_DIR=str(checkpoints["wav2vec2-bert"]),
        STT_CPU_WORKERS="1",
        STT_MAX_BATCH_SIZE="1",
        STT_DRAIN_TIMEOUT_S=str(drain),
    )

    async def scenario() -> tuple[list[httpx.Response], float]:
        async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:
            service.hold()  # never released: only the drain timeout ends the wait
            requests = [
                asyncio.create_task(client.post(TRANSCRIBE, files={"file": ("a.wav", speech_wav)}))
                for _ in range(4)
            ]
            await queued(client, 3)
            signalled = time.monotonic()
            os.kill(service.proc.pid, signal.SIGTERM)
            responses = await asyncio.gather(*requests)
            return list(responses), time.monotonic() - signalled

    try:
        responses, answered_in = asyncio.run(scenario())
        assert service.proc.wait(60) in CLEAN_EXIT
    finally:
        service.proc.kill()
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 503, 503, 503], [r.text for r in responses]
    for response in responses:
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "unavailable"
            assert "shut down" in response.json()["error"]["message"]
            assert int(response.headers["retry-after"]) >= 1
    assert drain <= answered_in < drain + 4  # at the drain timeout, not uvicorn's (drain + 5)
    assert "Traceback" not in "".join(service.log), "".join(service.log)[-4000:]
