"""SIGTERM: in-flight and queued requests are answered, then the process exits cleanly."""

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import httpx

from tests.conftest import CLEAN_EXIT, ServiceProcess


def test_sigterm_answers_every_accepted_request(
    checkpoints: dict[str, Path], speech_wav: bytes
) -> None:
    service = ServiceProcess(
        STT_MODEL_DIR=str(checkpoints["wav2vec2-bert"]),
        STT_MAX_WAIT_MS="1000",
        STT_MAX_BATCH_SIZE="16",
    )
    url = service.url

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            requests = [
                asyncio.create_task(
                    client.post(
                        url + "/v1/audio/transcriptions", files={"file": ("a.wav", speech_wav)}
                    )
                )
                for _ in range(4)
            ]
            # The first request of a batch waits up to 1 s for company: wait until all four
            # are queued, then ask the server to stop while they wait.
            deadline = time.monotonic() + 30
            while (await client.get(url + "/ready")).json().get("queued") != 4:
                assert time.monotonic() < deadline, "requests never queued"
            os.kill(service.proc.pid, signal.SIGTERM)
            responses = await asyncio.gather(*requests)
            return [r.status_code for r in responses]

    try:
        assert asyncio.run(scenario()) == [200, 200, 200, 200]
        assert service.proc.wait(60) in CLEAN_EXIT
    finally:
        service.proc.kill()
    with socket.socket() as sock:  # nothing listens any more
        assert sock.connect_ex(("127.0.0.1", service.port)) != 0
