"""`/metrics` scraped from a real server: exact changes after known requests, rejections and
cancellations; the request id on responses, error bodies and the JSON request log."""

import asyncio
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.api.app import create_app
from service.metrics import Metrics
from service.settings import Settings
from tests.conftest import (
    CLEAN_EXIT,
    LiveServer,
    ServiceProcess,
    WorkerHold,
    encode,
    settings_for,
    speak,
)

TRANSCRIBE = "/v1/audio/transcriptions"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: LiveServer | ServiceProcess) -> tuple[set[str], Samples]:
    """Family names and every sample, keyed by (sample name, sorted labels)."""
    response = httpx.get(server.url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families, samples = set(), {}
    for family in text_string_to_metric_families(response.text):
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_every_defined_metric_is_exposed(tiny_server: LiveServer) -> None:
    families, samples = scrape(tiny_server)
    defined = Metrics().family_names()
    assert len(defined) >= 25
    assert set(defined) <= families, set(defined) - families
    assert all(name.startswith("stt_") for name in defined)
    assert "process_resident_memory_bytes" in families  # the client's default collectors
    info = [key for key in samples if key[0] == "stt_model_info"]
    assert len(info) == 1
    labels = dict(info[0][1])
    assert labels["model"] == "tiny"
    assert labels["architecture"] == "wav2vec2+bert"
    assert (labels["device"], labels["dtype"]) == ("cpu", "float32")
    workers = [key for key in samples if key[0] == "stt_worker_up"]
    assert workers
    assert all(samples[key] == 1.0 for key in workers)


def test_known_requests_move_the_counters_exactly(tiny_server: LiveServer) -> None:
    rate = 16_000
    lengths = [0.75, 1.0, 1.5, 2.0]  # seconds, at the model's rate: no resampling
    rng = np.random.default_rng(1)
    # noise that rises and falls like syllables: steady noise is answered without the model
    clips = [
        encode(
            (rng.normal(0, 0.1, n) * np.abs(np.sin(np.arange(n) * 8 / rate))).astype(np.float32),
            rate,
        )
        for n in (int(s * rate) for s in lengths)
    ]
    _, before = scrape(tiny_server)

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        tiny_server.url + TRANSCRIBE,
                        files={"file": ("a.wav", clip)},
                        data={"response_format": "verbose_json"},
                    )
                    for clip in clips
                )
            )

    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [200] * len(clips)
    _, after = scrape(tiny_server)
    k = len(clips)
    labels = {"endpoint": TRANSCRIBE, "response_format": "verbose_json", "status": "200"}
    assert delta(before, after, "stt_requests_total", **labels) == k
    duration = "stt_request_duration_seconds_count"
    assert delta(before, after, duration, endpoint=TRANSCRIBE) == k
    assert delta(before, after, "stt_audio_seconds_total") == pytest.approx(sum(lengths))
    tokens = sum(len(seg["tokens"]) for r in responses for seg in r.json()["segments"])
    assert delta(before, after, "stt_generated_tokens_total") == tokens > 0
    batches = delta(before, after, "stt_worker_batches_total", worker="0", device="cpu") + delta(
        before, after, "stt_worker_batches_total", worker="1", device="cpu"
    )
    assert 1 <= batches <= k
    assert delta(before, after, "stt_batch_size_count") == batches
    assert delta(before, after, "stt_batch_size_sum") == k  # every request in exactly one batch
    assert delta(before, after, "stt_queue_wait_seconds_count") == k
    assert delta(before, after, "stt_real_time_factor_count") == k
    assert delta(before, after, "stt_stage_duration_seconds_count", stage="decode") == k
    # the engine's own loop: a batch is the requests that start together; it then takes
    # decoder steps (each timed) and detokenizes each request as it finishes
    # (with `STT_BATCHING=continuous`; the default is static for now: no step is taken)
    steps = delta(before, after, "stt_decoder_step_duration_seconds_count", part="total")
    continuous = Settings.model_fields["batching"].default == "continuous"
    if continuous:
        assert steps >= max(len(seg["tokens"]) for r in responses for seg in r.json()["segments"])
    else:
        assert steps == 0
    assert delta(before, after, "stt_decoder_step_duration_seconds_count", part="model") == steps
    assert delta(before, after, "stt_decoder_step_rows_count") == steps
    assert delta(before, after, "stt_decoder_step_rows_sum") >= (tokens if continuous else 0)
    assert delta(before, after, "stt_rows_joined_total") == (k if continuous else 0)
    left = delta(before, after, "stt_rows_left_total", reason="finished")
    assert left == (k if continuous else 0)
    decoding, detokenize = (steps, k) if continuous else (batches, batches)
    expected = {
        "features": batches,
        "encoder": batches,
        "decoding": decoding,
        "detokenize": detokenize,
    }
    for stage, count in expected.items():
        assert delta(before, after, "stt_stage_duration_seconds_count", stage=stage) == count
        assert delta(before, after, "stt_stage_duration_seconds_sum", stage=stage) > 0
    assert value(after, "stt_queue_depth") == 0
    assert value(after, "stt_queued_audio_seconds") == 0


def test_bad_requests_count_as_rejections_by_reason(tiny_server: LiveServer) -> None:
    _, before = scrape(tiny_server)
    url = tiny_server.url + TRANSCRIBE
    bad = httpx.post(url, files={"file": ("a.wav", b"RIFF" + bytes(100))}, timeout=30)
    assert bad.status_code == 400
    big = httpx.post(url, files={"file": ("a.wav", bytes(3_000_000))}, timeout=30)
    assert big.status_code == 413
    unknown = httpx.post(url, files={"file": ("a.wav", b"x")}, data={"model": "nope"})
    assert unknown.status_code == 404
    _, after = scrape(tiny_server)
    reason = bad.json()["error"]["code"]
    assert delta(before, after, "stt_rejections_total", reason=reason) == 1
    assert delta(before, after, "stt_rejections_total", reason="too_large") == 1
    assert delta(before, after, "stt_rejections_total", reason="model_not_found") == 1
    for response in (bad, unknown):
        assert response.json()["error"]["request_id"] == response.headers["x-request-id"]
    labels = {"endpoint": TRANSCRIBE, "response_format": "", "status": "413"}
    assert delta(before, after, "stt_requests_total", **labels) == 1


def test_overload_and_cancellations_are_counted(
    checkpoints: dict[str, Path], speech_wav: bytes
) -> None:
    # One queue slot, one worker taking one request at a time, held (`WorkerHold`) while the
    # queue is full, while a request's deadline passes and while a client leaves.
    settings = settings_for(
        checkpoints["wav2vec2-bert"], max_queue_size=1, max_batch_size=1, cpu_workers=1
    )
    with LiveServer(create_app(settings)) as server:
        files = {"file": ("a.wav", speech_wav)}
        _, before = scrape(server)

        async def queued(client: httpx.AsyncClient, count: int) -> None:
            deadline = time.monotonic() + 60
            while (await client.get("/ready")).json()["queued"] != count:
                assert time.monotonic() < deadline, f"the queue never held {count}"
                await asyncio.sleep(0.02)

        async def client_gone_counted() -> Samples:
            deadline = time.monotonic() + 30
            while True:  # the server notices the departed client on its own time
                _, after = await asyncio.to_thread(scrape, server)
                if delta(before, after, "stt_cancellations_total", reason="client_gone"):
                    return after
                assert time.monotonic() < deadline, "the departed client was never counted"
                await asyncio.sleep(0.05)

        async def scenario() -> list[int]:
            hold = WorkerHold(server.app.state.engine)
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                running = asyncio.create_task(client.post(TRANSCRIBE, files=files))
                assert await asyncio.to_thread(hold.entered.wait, 60)  # the worker has it
                late = await client.post(TRANSCRIBE, files=files, data={"timeout": "0.3"})
                with pytest.raises(httpx.ReadTimeout):  # the client leaves while it waits
                    await client.post(TRANSCRIBE, files=files, timeout=0.3)
                await client_gone_counted()
                await queued(client, 0)  # it left the queue
                waiting = asyncio.create_task(client.post(TRANSCRIBE, files=files))
                await queued(client, 1)
                full = await client.post(TRANSCRIBE, files=files)
                hold.release()
                return [r.status_code for r in (await running, late, full, await waiting)]

        assert asyncio.run(scenario()) == [200, 504, 429, 200]
        _, after = scrape(server)
        assert delta(before, after, "stt_rejections_total", reason="queue_full") == 1
        assert delta(before, after, "stt_cancellations_total", reason="deadline") == 1
        assert delta(before, after, "stt_cancellations_total", reason="client_gone") == 1
        # the 504 and the abandoned request are cancellations, not rejections
        assert (
            sum(v for (name, _), v in after.items() if name == "stt_rejections_total")
            - sum(v for (name, _), v in before.items() if name == "stt_rejections_total")
            == 1
        )


def test_request_id_is_echoed_or_generated(tiny_server: LiveServer) -> None:
    given = httpx.get(tiny_server.url + "/health", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    fresh = [httpx.get(tiny_server.url + "/health").headers["x-request-id"] for _ in range(2)]
    assert len(set(fresh)) == 2
    assert all(len(f) == 32 for f in fresh)
    hostile = httpx.get(tiny_server.url + "/health", headers={"X-Request-ID": "a b\tc" * 50})
    assert hostile.headers["x-request-id"] != "a b\tc" * 50


def test_json_request_log_has_the_fields_and_no_transcript(speech_wav: bytes) -> None:
    service = ServiceProcess(STT_LOG_FORMAT="json", STT_CPU_WORKERS="1")
    try:
        response = httpx.post(
            service.url + TRANSCRIBE,
            files={"file": ("a.wav", speech_wav)},
            headers={"X-Request-ID": "log-test-1"},
            timeout=60,
        )
        assert response.status_code == 200
        text = response.json()["text"]
        assert text
    finally:
        assert service.stop() in CLEAN_EXIT
    lines = [line for line in service.log if line.strip()]
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    noise = [line for line in lines if not line.startswith("{")]
    assert not [n for n in noise if "Loading weights" not in n], noise  # every log line is JSON
    (entry,) = [e for e in entries if e.get("request_id") == "log-test-1"]
    assert entry["status"] == 200
    assert entry["endpoint"] == TRANSCRIBE
    assert entry["audio_seconds"] == pytest.approx(len(speak("turn on the lights")) / 22_050, 1e-3)
    assert entry["batch_size"] == 1
    assert entry["queue_seconds"] >= 0
    assert entry["compute_seconds"] > 0
    assert all(text not in line for line in lines)
