"""Several models in one server (`STT_MODELS`): a real uvicorn server on loopback serving the
bundled model (the default) and two tiny random-weight checkpoints with other tokenizers
(HuBERT + GPT-2's byte-level BPE, Whisper's real tokenizer), driven by the official `openai`
client and real websocket clients. Each model must answer with its own transcript: the bundled
one with the words spoken, the tiny ones with exactly what `model.generate` of that checkpoint
gives (tests/api/test_reference.py's oracle), which differ between them because their
vocabularies do.
"""

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import soxr
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from service.api.app import create_app
from service.settings import DEFAULT_MODEL_DIR, Settings
from tests.api.test_realtime import COMPLETED, client_for, count, events_until, pcm24, send_audio
from tests.api.test_reference import Reference, clip
from tests.conftest import CLEAN_EXIT, HeldService, LiveServer, encode, speak

pytestmark = pytest.mark.slow
RATE = 16_000
TINY = ("gpt2", "whisper")  # served names of the two tiny checkpoints


@pytest.fixture(scope="module")
def folders(checkpoints: dict[str, Path]) -> dict[str, Path]:
    return {
        "commands": DEFAULT_MODEL_DIR,
        "gpt2": checkpoints["hubert-gpt2"],
        "whisper": checkpoints["whisper"],
    }


@pytest.fixture(scope="module")
def server(folders: dict[str, Path]) -> Iterator[LiveServer]:
    models = ",".join(f"{name}={folder}" for name, folder in folders.items())
    settings = Settings(models=models, cpu_workers=1, cpu_threads=1)  # type: ignore[arg-type]
    with LiveServer(create_app(settings)) as live:
        yield live


@pytest.fixture(scope="module")
def wav() -> bytes:
    """2 s of 'turn on the lights' with faint noise (a bucket rung: the reference's input)."""
    return encode(clip("turn on the lights", 0), RATE, "WAV", "PCM_16")


def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(api_key="unused", base_url=server.url + "/v1", max_retries=0)


def samples(server: LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def audio_seconds(server: LiveServer) -> dict[str, float]:
    """`stt_audio_seconds_total` by model label."""
    return {
        dict(labels)["model"]: value
        for (name, labels), value in samples(server).items()
        if name == "stt_audio_seconds_total"
    }


def test_each_model_answers_with_its_own_transcript(
    server: LiveServer, folders: dict[str, Path], wav: bytes
) -> None:
    texts = {}
    for name in folders:
        result = client(server).audio.transcriptions.create(
            model=name, file=("a.wav", wav), response_format="verbose_json"
        )
        texts[name] = result.text
        if name == "commands":
            assert result.text == "turn on the lights"
            continue
        task = {"task": "transcribe"} if name == "whisper" else {}
        _, tokens = Reference(folders[name]).generate(wav, **task)
        assert tokens, name
        assert result.segments is not None
        assert [t for s in result.segments for t in s.tokens] == tokens, name
    assert len(set(texts.values())) == 3, texts  # three vocabularies, three transcripts
    # no `model`: the default (the first listed)
    plain = httpx.post(
        server.url + "/v1/audio/transcriptions", files={"file": ("a.wav", wav)}, timeout=60
    )
    assert plain.status_code == 200
    assert plain.json()["text"] == texts["commands"]
    # SSE through the official client: the named model's deltas spell its text
    stream = client(server).audio.transcriptions.create(
        model="gpt2", file=("a.wav", wav), stream=True
    )
    events = list(stream)
    deltas = "".join(e.delta for e in events if e.type == "transcript.text.delta")
    assert events[-1].type == "transcript.text.done"
    assert events[-1].text == texts["gpt2"]
    assert deltas.strip() == texts["gpt2"].strip()


def test_translations_pick_the_named_model(
    server: LiveServer, folders: dict[str, Path], wav: bytes
) -> None:
    result = client(server).audio.translations.create(
        model="whisper", file=("a.wav", wav), response_format="verbose_json"
    )
    _, tokens = Reference(folders["whisper"]).generate(wav, task="translate")
    assert result.segments is not None
    assert [t for s in result.segments for t in s.tokens] == tokens
    # the default and the GPT-2 model have no target-language tokens: refused, each by name
    for name in ("commands", "gpt2"):
        with pytest.raises(openai.BadRequestError) as refused:
            client(server).audio.translations.create(model=name, file=("a.wav", wav))
        assert refused.value.body["code"] == "unsupported"  # type: ignore[index]
        assert name in refused.value.body["message"]  # type: ignore[index]


def test_models_lists_every_model_and_an_unknown_one_is_404(server: LiveServer, wav: bytes) -> None:
    listed = client(server).models.list()
    assert [m.id for m in listed.data] == ["commands", "gpt2", "whisper"]
    architectures = {m.id: m.model_extra["architecture"] for m in listed.data}  # type: ignore[index]
    assert architectures == {
        "commands": "wav2vec2+bert",
        "gpt2": "hubert+gpt2",
        "whisper": "whisper",
    }
    assert client(server).models.retrieve("whisper").id == "whisper"
    with pytest.raises(openai.NotFoundError) as missing:
        client(server).audio.transcriptions.create(model="whisper-9", file=("a.wav", wav))
    error = missing.value.body
    assert error["code"] == "model_not_found"  # type: ignore[index]
    assert error["param"] == "model"  # type: ignore[index]
    assert "commands, gpt2, whisper" in error["message"]  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("whisper-9")
    ready = httpx.get(server.url + "/ready").json()
    assert ready["status"] == "ready"
    assert set(ready["models"]) == {"commands", "gpt2", "whisper"}


def test_every_metric_carries_the_model_label(server: LiveServer, wav: bytes) -> None:
    for name in ("commands", "gpt2"):
        client(server).audio.transcriptions.create(model=name, file=("a.wav", wav))
    found = samples(server)
    families = {name for name, _ in found}
    by_name: dict[str, set[str]] = {}
    for (name, labels), _ in found.items():
        if name.startswith("stt_"):
            by_name.setdefault(name, set()).add(dict(labels).get("model", "<none>"))
    assert "<none>" not in set().union(*by_name.values()), {
        n: m for n, m in by_name.items() if "<none>" in m
    }
    for family in (
        "stt_requests_total",
        "stt_audio_seconds_total",
        "stt_generated_tokens_total",
        "stt_worker_batches_total",
        "stt_batch_size_count",
        "stt_queue_wait_seconds_count",
        "stt_stage_duration_seconds_count",
    ):
        assert {"commands", "gpt2"} <= by_name[family], (family, by_name.get(family))
    assert by_name["stt_model_info"] == {"commands", "gpt2", "whisper"}
    assert by_name["stt_worker_up"] == {"commands", "gpt2", "whisper"}
    assert by_name["stt_queue_depth"] == {"commands", "gpt2", "whisper"}
    assert by_name["stt_threads"] == {""}  # the process's, no model's
    assert by_name["stt_inflight_audio_seconds"] == {""}  # one budget for every model
    assert by_name["stt_compiles_total"] == {""}  # the process's compiler, no model's
    assert "stt_model_info" in families
    info = {dict(labels)["model"]: dict(labels) for (n, labels) in found if n == "stt_model_info"}
    assert info["gpt2"]["architecture"] == "hubert+gpt2"
    assert info["whisper"]["architecture"] == "whisper"
    ok = "stt_requests_total"
    labelled = {
        dict(labels)["model"]
        for (n, labels), v in found.items()
        if n == ok and dict(labels).get("status") == "200" and v > 0
    }
    assert {"commands", "gpt2"} <= labelled


def test_stream_websocket_config_picks_the_model(server: LiveServer) -> None:
    phrase = soxr.resample(speak("turn on the lights"), 22_050, RATE).astype(np.float32)
    quiet = np.zeros(RATE // 2, np.float32)
    pcm = (np.concatenate([quiet, phrase, quiet]) * 32767).astype("<i2").tobytes()
    url = server.url.replace("http://", "ws://") + "/v1/audio/stream"

    async def session(model: str) -> list[dict[str, Any]]:
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "config", "sample_rate": RATE, "model": model}))
            events = [json.loads(await ws.recv())]
            if events[0]["type"] != "session.created":
                return events
            for offset in range(0, len(pcm), 3200):
                await ws.send(pcm[offset : offset + 3200])
            await ws.send(json.dumps({"type": "end"}))
            async for message in ws:
                events.append(json.loads(message))
            return events

    before = audio_seconds(server)
    events = asyncio.run(session("commands"))
    assert events[0]["config"]["model"] == "commands"
    finals = [e["text"] for e in events if e["type"] == "transcript.final"]
    assert finals == ["turn on the lights"]
    middle = audio_seconds(server)
    events = asyncio.run(session("gpt2"))
    assert events[0]["config"]["model"] == "gpt2"
    assert [e["type"] for e in events].count("transcript.final") == 1
    after = audio_seconds(server)
    # the engine that did the work is the one named: each session moved only its model's
    assert middle["commands"] > before.get("commands", 0)
    assert middle.get("gpt2", 0) == before.get("gpt2", 0)
    assert after["gpt2"] > middle.get("gpt2", 0)
    assert after["commands"] == middle["commands"]
    # an unknown model: the error event of a refused config field, naming it
    (error,) = asyncio.run(session("whisper-9"))
    assert error["type"] == "error"
    assert error["error"]["code"] == "invalid_config"
    assert error["error"]["param"] == "model"
    assert "commands, gpt2, whisper" in error["error"]["message"]


def test_realtime_session_picks_the_model(server: LiveServer) -> None:
    quiet = np.zeros(int(0.4 * 22_050), np.float32)
    phrase = np.concatenate([quiet, speak("turn on the lights"), quiet])

    async def scenario(model: str) -> list[dict[str, Any]]:
        async with client_for(server).realtime.connect(
            model="", extra_query={"intent": "transcription"}
        ) as conn:
            await conn.session.update(
                session={
                    "type": "transcription",
                    "audio": {"input": {"turn_detection": None, "transcription": {"model": model}}},
                }
            )
            if model == "whisper-9":
                return await events_until(conn, lambda ev: ev[-1]["type"] == "error")
            await send_audio(conn, pcm24(phrase), paced=False)
            await conn.input_audio_buffer.commit()
            return await events_until(conn, count(COMPLETED))

    samples24 = np.frombuffer(pcm24(phrase), "<i2").astype(np.float32) / 32768
    upload = encode(samples24, 24_000)
    transcripts = {}
    for model in ("commands", "gpt2", "whisper"):
        events = asyncio.run(scenario(model))
        assert events[1]["session"]["audio"]["input"]["transcription"]["model"] == model
        (completed,) = [e for e in events if e["type"] == COMPLETED]
        # exactly the upload of the audio appended, by the same model
        expected = client(server).audio.transcriptions.create(model=model, file=("a.wav", upload))
        assert completed["transcript"] == expected.text, model
        transcripts[model] = completed["transcript"]
    assert transcripts["commands"] == "turn on the lights"
    assert len(set(transcripts.values())) == 3, transcripts
    events = asyncio.run(scenario("whisper-9"))
    assert events[-1]["error"]["code"] == "model_not_found"


def test_an_unknown_realtime_query_model_is_refused(server: LiveServer) -> None:
    url = server.url.replace("http://", "ws://") + "/v1/realtime?intent=transcription&model=x9"

    async def scenario() -> dict[str, Any]:
        async with connect(url) as ws:
            return dict(json.loads(await ws.recv()))

    assert asyncio.run(scenario())["error"]["code"] == "model_not_found"

    async def named() -> dict[str, Any]:
        query = "intent=transcription&model=gpt2"
        async with connect(url.split("?")[0] + "?" + query) as ws:
            return dict(json.loads(await ws.recv()))

    created = asyncio.run(named())
    assert created["session"]["audio"]["input"]["transcription"]["model"] == "gpt2"


def test_sigterm_drains_every_model(
    checkpoints: dict[str, Path], speech_wav: bytes, tmp_path: Path
) -> None:
    """Both models hold one request in their worker and one queued; SIGTERM, then release:
    every accepted request of both models is answered and the process exits cleanly."""
    models = f"a={checkpoints['wav2vec2-bert']},b={checkpoints['hubert-gpt2']}"
    service = HeldService(
        tmp_path / "hold", STT_MODELS=models, STT_CPU_WORKERS="1", STT_MAX_BATCH_SIZE="1"
    )

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=service.url, timeout=60) as http:
            service.hold()
            requests = [
                asyncio.create_task(
                    http.post(
                        "/v1/audio/transcriptions",
                        files={"file": ("a.wav", speech_wav)},
                        data={"model": model},
                    )
                )
                for model in ("a", "b", "a", "b")
            ]
            # each model: one request in its held worker, one queued (a state that lasts)
            held = {"a": {"workers": 1, "queued": 1}, "b": {"workers": 1, "queued": 1}}
            deadline = time.monotonic() + 60
            while (await http.get("/ready")).json().get("models") != held:
                assert time.monotonic() < deadline, "the requests never queued"
                await asyncio.sleep(0.05)
            os.kill(service.proc.pid, signal.SIGTERM)
            await asyncio.to_thread(service.wait_for_log, "Shutting down")
            service.release()
            return list(await asyncio.gather(*requests))

    try:
        responses = asyncio.run(scenario())
        assert service.proc.wait(60) in CLEAN_EXIT
    finally:
        service.proc.kill()
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    texts = [r.json()["text"] for r in responses]
    assert texts[0] == texts[2]
    assert texts[1] == texts[3]
    assert texts[0] != texts[1]
