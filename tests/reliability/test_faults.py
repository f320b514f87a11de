"""Faults over HTTP: each test injects one, states what the service does about it, and proves
that no accepted request is left without an answer and that the next request is served.

(a)-(d) run on a live in-thread server (tiny wav2vec2 + BERT checkpoint, one worker, batches of
up to four; the worker is kept from the queue until four concurrent uploads are all queued
(`QueueHold`), so they share one batch however slowly they arrive);
the fault is injected ahead of the decoder step that starts a batch's rows (the worker's own
decoding loop), as `tests/engine/test_engine.py` does. (e) is SIGTERM to a real
`python -m service` under load with streaming sessions open, its worker held
(`tests/held_service.py`) so that the uploads are queued when the signal arrives.
"""

import asyncio
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soxr
import torch
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from service.api.app import create_app
from tests.conftest import (
    CLEAN_EXIT,
    HeldService,
    LiveServer,
    QueueHold,
    encode,
    settings_for,
    speak,
)

TRANSCRIBE = "/v1/audio/transcriptions"
RATE = 16_000  # the tiny checkpoint's rate: a 16 kHz upload decodes to exactly its samples
BATCH = 4
PHRASES = ("turn on the lights", "three four five", "call home", "set a timer")


# ---------------------------------------------------------------------------------------------
# helpers


def clip(text: str, samples: int) -> bytes:
    """`text` spoken, at 16 kHz, cut or padded with silence to exactly `samples`."""
    audio = soxr.resample(speak(text), 22_050, RATE).astype(np.float32)[:samples]
    return encode(np.pad(audio, (0, samples - len(audio))), RATE, "WAV", "PCM_16")


def metric(server: LiveServer, name: str, **labels: str) -> float:
    """A sample's value from `/metrics` (summed over unnamed labels; 0 if absent)."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Poll `predicate` (a scrape: cheap, but not free) every 50 ms until true or timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def post_all(server: LiveServer, bodies: list[bytes]) -> list[httpx.Response]:
    """Upload every body at once (each its own connection), as one batch: the worker is kept
    from the queue (`QueueHold`) until all are queued. Every response, in order."""
    engine = server.app.state.engine
    hold = QueueHold(engine)
    assert hold.parked.wait(30), "the worker never came back for work"

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            posts = [
                asyncio.create_task(client.post(TRANSCRIBE, files={"file": ("a.wav", b)}))
                for b in bodies
            ]
            deadline = time.monotonic() + 60
            while engine.scheduler.depth < len(bodies):
                assert time.monotonic() < deadline, "the uploads never queued"
                await asyncio.sleep(0.02)
            hold.release()
            return list(await asyncio.gather(*posts))

    try:
        return asyncio.run(run())
    finally:
        hold.release()


def assert_serves(server: LiveServer, body: bytes) -> None:
    """Ready, one worker alive, and an upload is transcribed."""
    assert httpx.get(server.url + "/ready", timeout=10).status_code == 200
    assert metric(server, "stt_worker_up") == 1
    response = httpx.post(server.url + TRANSCRIBE, files={"file": ("a.wav", body)}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["text"]


def error_code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


Before = Callable[[list[int]], None]  # sees each row's samples before the model runs them


@pytest.fixture(scope="module")
def server(checkpoints: dict[str, Path]) -> Iterator[LiveServer]:
    # the faults are injected at the own loop's decoder step (`STT_BATCHING=continuous`, not
    # the default yet); the static path's fault handling is tested in tests/engine/test_engine.py
    settings = settings_for(
        checkpoints["wav2vec2-bert"],
        cpu_workers=1,
        max_batch_size=BATCH,
        max_wait_ms=1000,
        batching="continuous",
    )
    with LiveServer(create_app(settings)) as live:
        yield live


@pytest.fixture(scope="module")
def bodies() -> list[bytes]:
    """Four different phrases, 1.5 s each."""
    return [clip(text, 24_000) for text in PHRASES]


@pytest.fixture
def inject(server: LiveServer) -> Any:
    """The worker's adapter; a test calls `install` to run a function ahead of its model
    calls (monkeypatch undoes it after the test). A replacement worker thread keeps the dead
    one's adapter, fake included."""
    return server.app.state.engine.pool.workers[0].adapter


def install(monkeypatch: pytest.MonkeyPatch, adapter: Any, before: Before) -> None:
    """Call `before(samples of each row)` ahead of every decoder step that starts rows (their
    first step, where a batch of newcomers is formed); it may raise or block."""
    step = adapter.decoder_step

    def decoder_step(ids, positions, self_mask, hidden, input_mask, cache):  # type: ignore[no-untyped-def]
        if cache is None:
            before([int(n) for n in input_mask.sum(dim=1)])
        return step(ids, positions, self_mask, hidden, input_mask, cache)

    monkeypatch.setattr(adapter, "decoder_step", decoder_step)


# ---------------------------------------------------------------------------------------------
# (a) one poisoned request in a batch


def test_poisoned_request_fails_alone_and_its_batch_mates_are_answered(
    server: LiveServer,
    bodies: list[bytes],
    inject: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The model raises on any batch holding the poisoned input (a 1.25 s clip; the others are
    # 1.5 s). The engine bisects the failing batch until the request that breaks it fails
    # alone: it gets 500 model_error, its three batch mates get their transcripts.
    adapter = inject
    poison_samples = 20_000
    sizes: list[int] = []

    def poisoned(samples: list[int]) -> None:
        sizes.append(len(samples))
        if poison_samples in samples:
            raise RuntimeError("injected: this input breaks the model")

    failures = metric(server, "stt_batch_failures_total", error="model_error")
    restarts = metric(server, "stt_worker_restarts_total")
    install(monkeypatch, adapter, poisoned)
    poison = clip("zero zero", poison_samples)
    first, second, bad, third = post_all(server, [bodies[0], bodies[1], poison, bodies[2]])

    assert bad.status_code == 500, bad.text
    assert error_code(bad) == "model_error"
    for good in (first, second, third):
        assert good.status_code == 200, good.text
        assert good.json()["text"]
    assert sizes[0] == BATCH  # they really shared one batch
    assert sorted(sizes) == [1, 1, 2, 2, 4]  # 4 -> 2 + 2 -> the poisoned half: 1 + 1
    assert metric(server, "stt_batch_failures_total", error="model_error") == failures + 3
    assert metric(server, "stt_worker_restarts_total") == restarts  # the worker lived on
    assert_serves(server, bodies[3])


# ---------------------------------------------------------------------------------------------
# (b) out of memory on every batch of more than one


def test_out_of_memory_splits_batches_until_every_request_is_answered(
    server: LiveServer,
    bodies: list[bytes],
    inject: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A device that only fits one request at a time: the batch is split in halves on each
    # out-of-memory error until the requests run alone, and every one gets its own transcript.
    adapter = inject
    alone = [post_all(server, [body])[0].json()["text"] for body in bodies]
    sizes: list[int] = []

    def small_memory(samples: list[int]) -> None:
        sizes.append(len(samples))
        if len(samples) > 1:
            raise torch.OutOfMemoryError("injected: out of memory")

    failures = metric(server, "stt_batch_failures_total", error="out_of_memory")
    install(monkeypatch, adapter, small_memory)
    responses = post_all(server, bodies)

    assert [r.status_code for r in responses] == [200] * BATCH, [r.text for r in responses]
    assert [r.json()["text"] for r in responses] == alone  # each its own, none mixed up
    assert sizes[0] == BATCH
    assert sorted(sizes) == [1, 1, 1, 1, 2, 2, 4]
    assert metric(server, "stt_batch_failures_total", error="out_of_memory") == failures + 3
    assert_serves(server, bodies[0])


# ---------------------------------------------------------------------------------------------
# (c) the worker thread dies


class WorkerKilled(BaseException):
    """Not an `Exception`: no batch-level handler catches it, so the worker thread dies."""


def test_killed_worker_answers_its_requests_503_and_is_replaced(
    server: LiveServer,
    bodies: list[bytes],
    inject: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The thread running a batch dies: the requests of that batch cannot be finished and get
    # 503 unavailable with Retry-After (a retry will be served); a fresh thread takes over the
    # same model replica at once, so the next request is served.
    adapter = inject
    killed = threading.Event()

    def dying(samples: list[int]) -> None:
        if not killed.is_set():
            killed.set()
            raise WorkerKilled("injected: the worker thread dies")

    restarts = metric(server, "stt_worker_restarts_total")
    install(monkeypatch, adapter, dying)
    responses = post_all(server, bodies)

    assert killed.is_set()
    for response in responses:
        assert response.status_code == 503, response.text
        assert error_code(response) == "unavailable"
        assert int(response.headers["retry-after"]) >= 1
    assert metric(server, "stt_worker_restarts_total") == restarts + 1
    assert_serves(server, bodies[0])
    assert server.app.state.engine.pool.alive == 1


# ---------------------------------------------------------------------------------------------
# (d) the client leaves while its request is being computed


def test_client_leaving_mid_request_is_counted_and_frees_the_worker(
    server: LiveServer,
    bodies: list[bytes],
    inject: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The worker holds the request (before its first decoder step, until released); the
    # client gives up and closes its connection. The service notices the disconnect, counts a
    # `client_gone` cancellation and a 499 (nobody to send an answer to), stops the row, and
    # goes on serving.
    adapter = inject
    entered, release = threading.Event(), threading.Event()

    def held(samples: list[int]) -> None:
        entered.set()
        release.wait(60)

    gone = metric(server, "stt_cancellations_total", reason="client_gone")
    closed = metric(server, "stt_requests_total", endpoint=TRANSCRIBE, status="499")
    install(monkeypatch, adapter, held)

    async def leave() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            request = asyncio.create_task(
                client.post(TRANSCRIBE, files={"file": ("a.wav", bodies[0])})
            )
            assert await asyncio.to_thread(entered.wait, 30), "the request never ran"
            request.cancel()  # the client gives up (as on its own timeout) ...
            with pytest.raises(asyncio.CancelledError):
                await request
        # ... and leaving the client closes its connection

    try:
        asyncio.run(leave())
        wait_for(
            lambda: metric(server, "stt_cancellations_total", reason="client_gone") == gone + 1,
            "the disconnect was not noticed",
        )
        wait_for(
            lambda: (
                metric(server, "stt_requests_total", endpoint=TRANSCRIBE, status="499")
                == closed + 1
            ),
            "the abandoned request was not logged as 499",
        )
    finally:
        release.set()  # the held row then stops at its next step: its client is gone
    assert_serves(server, bodies[1])
    assert server.app.state.engine.scheduler.depth == 0


# ---------------------------------------------------------------------------------------------
# (e) SIGTERM under load, with streaming sessions open


STREAM_RATE = 22_050  # espeak-ng's rate


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


async def recv_event(ws: ClientConnection) -> dict[str, Any]:
    return dict(json.loads(await asyncio.wait_for(ws.recv(), 30)))


async def open_session(url: str) -> tuple[ClientConnection, list[dict[str, Any]]]:
    """A session that has had one utterance transcribed (its final received) and is halfway
    through a second one; partials off, so it has nothing in the engine."""
    ws = await connect(f"{url}?sample_rate={STREAM_RATE}&partials=false")
    events = [await recv_event(ws)]
    assert events[0]["type"] == "session.created", events
    silence = np.zeros(STREAM_RATE, np.float32)
    await ws.send(pcm16(np.concatenate([speak("three four five"), silence])))
    while events[-1]["type"] != "transcript.final":
        events.append(await recv_event(ws))
    second = speak("turn on the lights")
    await ws.send(pcm16(second[: len(second) // 2]))  # an open utterance
    return ws, events


async def read_to_close(ws: ClientConnection, events: list[dict[str, Any]]) -> int | None:
    """Every event until the server closes the connection; the close code."""
    try:
        while True:
            events.append(await recv_event(ws))
    except ConnectionClosed:
        return ws.close_code


def test_sigterm_under_load_answers_accepted_requests_and_closes_streams_cleanly(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    # SIGTERM with 16 uploads accepted (the worker holds one, 15 wait in the queue; 16 is the
    # most uploads that may wait for a decode slot at once, so none is refused 429) and two
    # streaming sessions open (each mid-utterance): uvicorn stops accepting connections, closes
    # the sessions with 1012 (service restart) after the finals they had, lets every accepted
    # upload finish (200), then the engine drains and the process exits cleanly. Uploads sent
    # after the signal are refused at connect (or 503 with Retry-After), never hung or failed
    # with a 5xx. The worker is held (`HeldService`) until the sessions are closed, so the
    # uploads are still queued when the signal arrives, however slow the machine.
    service = HeldService(
        tmp_path / "hold",
        STT_MODEL_DIR=str(checkpoints["wav2vec2-bert"]),
        STT_CPU_WORKERS="1",
        STT_MAX_BATCH_SIZE="1",
    )
    url = service.url
    ws_url = url.replace("http://", "ws://") + "/v1/audio/stream"
    body = clip("call home", 24_000)
    accepted_count = 16

    async def scenario() -> tuple[list[int], list[object], list[tuple[int | None, list[Any]]]]:
        sessions = [await open_session(ws_url) for _ in range(2)]
        limits = httpx.Limits(max_connections=accepted_count + 16)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            service.hold()
            accepted = [
                asyncio.create_task(client.post(TRANSCRIBE, files={"file": ("a.wav", body)}))
                for _ in range(accepted_count)
            ]
            deadline = time.monotonic() + 60
            while (await client.get("/ready")).json().get("queued", 0) < accepted_count - 1:
                assert time.monotonic() < deadline, "the uploads never queued"
                await asyncio.sleep(0.05)
            os.kill(service.proc.pid, signal.SIGTERM)
            codes = await asyncio.gather(*(read_to_close(ws, events) for ws, events in sessions))
            # the server is shutting down (it closed the sessions): late uploads now, then the
            # queued work may run
            late = [client.post(TRANSCRIBE, files={"file": ("a.wav", body)}) for _ in range(8)]
            late_answers = await asyncio.gather(*late, return_exceptions=True)
            service.release()
            answers = await asyncio.gather(*accepted)
        return (
            [r.status_code for r in answers],
            list(late_answers),
            [(code, events) for code, (_, events) in zip(codes, sessions, strict=True)],
        )

    try:
        statuses, late, streams = asyncio.run(scenario())
        assert service.proc.wait(60) in CLEAN_EXIT
    finally:
        service.proc.kill()

    assert statuses == [200] * accepted_count  # every accepted upload was answered
    for answer in late:  # after the signal: refused, never hung or failed
        if isinstance(answer, httpx.Response):
            assert answer.status_code == 503, answer.text
            assert "retry-after" in answer.headers
        else:
            assert isinstance(answer, httpx.ConnectError | httpx.RemoteProtocolError), answer
    for code, events in streams:
        assert code == 1012, events  # a clean close: "service restart", not a dropped socket
        kinds = [e["type"] for e in events]
        assert kinds[0] == "session.created"
        assert kinds.count("transcript.final") == 1  # the final it had before the signal
        assert "error" not in kinds, events
    assert "Traceback" not in "".join(service.log), "".join(service.log)[-4000:]
    with socket.socket() as sock:  # nothing listens any more
        assert sock.connect_ex(("127.0.0.1", service.port)) != 0
