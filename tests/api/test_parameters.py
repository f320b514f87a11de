"""Every decoding parameter has its effect, proven against plain `model.generate`.

A tiny wav2vec2 + BERT checkpoint serves a 16 kHz WAV (its samples reach the model unresampled).
For each parameter the reference is `generate` on the same input with the kwargs the parameter
stands for, seeded as the service seeds (`torch.manual_seed(seed)`); the case is chosen where
that reference differs from the same call without the parameter, so a parameter that was
dropped or mistranslated on its way to `generate` fails the test.
"""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from transformers import AutoFeatureExtractor, SpeechEncoderDecoderModel
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from service.api.app import create_app
from tests.conftest import CLEAN_EXIT, LiveServer, ServiceProcess, encode, settings_for, speak

TRANSCRIBE = "/v1/audio/transcriptions"
RATE = 16_000


class Reference:
    """`generate` on the checkpoint, loaded apart from the service."""

    def __init__(self, model_dir: Path, audio: np.ndarray) -> None:
        self.model = SpeechEncoderDecoderModel.from_pretrained(model_dir).eval()
        extractor = AutoFeatureExtractor.from_pretrained(model_dir)
        self.inputs = extractor(
            audio, sampling_rate=RATE, return_attention_mask=True, return_tensors="pt"
        )
        gen = self.model.generation_config
        self.eos, self.pad = gen.eos_token_id, gen.pad_token_id
        self.max_new_tokens = gen.max_new_tokens

    @torch.inference_mode()
    def tokens(self, seed: int | None = None, **kwargs: Any) -> list[int]:
        """The text tokens `generate` gives with these kwargs (the service's defaults for the
        rest: sampling filters off unless given), up to EOS."""
        if kwargs.get("do_sample"):
            kwargs = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **kwargs}
        if seed is not None:
            torch.manual_seed(seed)
        out = self.model.generate(**self.inputs, max_new_tokens=self.max_new_tokens, **kwargs)
        tokens = []
        for token in out[0, 1:].tolist():
            if token == self.eos:
                break
            if token != self.pad:
                tokens.append(token)
        return tokens


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    """'turn on the lights' at 16 kHz, quantised to 16 bits as the WAV will carry it."""
    import soxr

    x = soxr.resample(speak("turn on the lights"), 22_050, RATE)
    return (np.round(np.clip(x, -1, 1) * 32767) / 32768).astype(np.float32)


@pytest.fixture(scope="module")
def wav(audio: np.ndarray) -> bytes:
    return encode(audio, RATE, "WAV", "PCM_16")


@pytest.fixture(scope="module")
def server(checkpoints: dict[str, Path]) -> Iterator[LiveServer]:
    settings = settings_for(checkpoints["wav2vec2-bert"], cpu_workers=1, model_aliases=["w-1"])
    with LiveServer(create_app(settings)) as live:
        yield live


@pytest.fixture(scope="module")
def reference(checkpoints: dict[str, Path], audio: np.ndarray) -> Reference:
    return Reference(checkpoints["wav2vec2-bert"], audio)


def served_tokens(server: LiveServer, wav: bytes, **fields: object) -> list[int]:
    response = httpx.post(
        server.url + TRANSCRIBE,
        files={"file": ("a.wav", wav)},
        data={"response_format": "verbose_json", **fields},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    (segment,) = response.json()["segments"]
    return list(segment["tokens"])


def test_greedy_equals_generate(server: LiveServer, wav: bytes, reference: Reference) -> None:
    greedy = reference.tokens()
    assert len(greedy) == reference.max_new_tokens
    assert served_tokens(server, wav) == greedy


# (form fields, the generate kwargs they stand for, the kwargs of the call they must differ
# from). Sampling cases are seeded; the seed is searched for one where the two calls differ.
CASES = {
    "do_sample": ({"do_sample": "true"}, {"do_sample": True}, {}),
    "temperature": (
        {"temperature": "1.7"},
        {"do_sample": True, "temperature": 1.7},
        {"do_sample": True, "temperature": 1.0},
    ),
    "top_k": (
        {"do_sample": "true", "temperature": "1.5", "top_k": "3"},
        {"do_sample": True, "temperature": 1.5, "top_k": 3},
        {"do_sample": True, "temperature": 1.5},
    ),
    "top_p": (
        {"do_sample": "true", "temperature": "1.5", "top_p": "0.4"},
        {"do_sample": True, "temperature": 1.5, "top_p": 0.4},
        {"do_sample": True, "temperature": 1.5},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sampling_parameter_reaches_generate(
    server: LiveServer, wav: bytes, reference: Reference, case: str
) -> None:
    fields, kwargs, without = CASES[case]
    seed = next(
        (s for s in range(40) if reference.tokens(s, **kwargs) != reference.tokens(s, **without)),
        None,
    )
    assert seed is not None, f"{case} never changes this model's tokens"
    expected = reference.tokens(seed, **kwargs)
    assert served_tokens(server, wav, **fields, seed=seed) == expected
    assert served_tokens(server, wav, **fields, seed=seed) == expected  # reproducible


def test_seed_is_the_sampling_seed(server: LiveServer, wav: bytes, reference: Reference) -> None:
    fields = {"temperature": "1.5"}
    samples = {s: served_tokens(server, wav, **fields, seed=s) for s in range(6)}
    for s, tokens in samples.items():
        assert tokens == reference.tokens(s, do_sample=True, temperature=1.5)
    assert len({tuple(t) for t in samples.values()}) > 1  # different seeds, different samples


def test_top_k_one_samples_the_greedy_tokens(
    server: LiveServer, wav: bytes, reference: Reference
) -> None:
    greedy = reference.tokens()
    for seed in range(4):
        assert served_tokens(server, wav, temperature="2.0", top_k=1, seed=seed) == greedy
    # without the filter, the same temperature and seeds wander off the greedy path
    unfiltered = [served_tokens(server, wav, temperature="2.0", seed=s) for s in range(4)]
    assert any(tokens != greedy for tokens in unfiltered)


def test_repetition_penalty_changes_repeated_tokens(
    server: LiveServer, wav: bytes, reference: Reference
) -> None:
    greedy = reference.tokens()
    assert len(set(greedy)) < len(greedy), greedy  # this input's greedy output repeats tokens
    for penalty in (5.0, 0.5):
        expected = reference.tokens(repetition_penalty=penalty)
        assert expected != greedy
        assert served_tokens(server, wav, repetition_penalty=penalty) == expected
    # a penalty above 1 makes repeats rarer
    penalised = reference.tokens(repetition_penalty=5.0)
    assert len(set(penalised)) > len(set(greedy))


# ----------------------------------------------------------------------------- the model card


def test_get_model_by_id_and_alias(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    listed = {m.id: m.model_dump() for m in client.models.list().data}
    assert set(listed) == {"tiny", "w-1"}
    for name in ("tiny", "w-1"):
        card = client.models.retrieve(name)
        assert card.id == name
        assert card.object == "model"
        assert card.model_dump() == listed[name]
        extra = card.model_dump()
        assert extra["architecture"] == "wav2vec2+bert"
        assert extra["sampling_rate"] == RATE
        assert extra["can_translate"] is False
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("whisper-1")
    error = missing.value.response.json()["error"]
    assert error["code"] == "model_not_found"
    assert "whisper-1" in error["message"]


# ------------------------------------------------------------------------- STT_LOG_TRANSCRIPTS


def test_log_transcripts_puts_the_text_in_the_request_log(speech_wav: bytes) -> None:
    """The opposite setting's test (no text anywhere in the log) is in `test_metrics.py`."""
    service = ServiceProcess(STT_LOG_FORMAT="json", STT_LOG_TRANSCRIPTS="true", STT_CPU_WORKERS="1")
    try:
        response = httpx.post(
            service.url + TRANSCRIBE,
            files={"file": ("a.wav", speech_wav)},
            headers={"X-Request-ID": "log-text-1"},
            timeout=60,
        )
        assert response.status_code == 200
        text = response.json()["text"]
        assert text == "turn on the lights"  # the bundled model
        service.wait_for_log("log-text-1")
    finally:
        assert service.stop() in CLEAN_EXIT
    entries = [json.loads(line) for line in service.log if line.startswith("{")]
    (entry,) = [e for e in entries if e.get("request_id") == "log-text-1"]
    assert entry["text"] == text
    assert entry["status"] == 200


# ---------------------------------------------------------------------- the stream's `model`


async def first_events(url: str, config: dict[str, object] | None, count: int) -> list[Any]:
    async with connect(url) as ws:
        if config is not None:
            await ws.send(json.dumps({"type": "config", **config}))
        return [json.loads(await ws.recv()) for _ in range(count)]


def test_stream_model_field_names_the_model_or_is_refused(server: LiveServer) -> None:
    import asyncio

    base = server.url.replace("http://", "ws://") + "/v1/audio/stream"
    by_query = asyncio.run(first_events(base + "?model=w-1", None, 1))[0]
    assert by_query["type"] == "session.created"
    assert by_query["config"]["model"] == "w-1"
    by_message = asyncio.run(first_events(base, {"model": "tiny"}, 1))[0]
    assert by_message["config"]["model"] == "tiny"
    default = asyncio.run(first_events(base, {"sample_rate": 16000}, 1))[0]
    assert default["config"]["model"] == "tiny"  # the served name when none is given
    refused = asyncio.run(first_events(base, {"model": "nope"}, 1))[0]
    assert refused["type"] == "error"
    assert refused["error"]["code"] == "invalid_config"
    assert "nope" in refused["error"]["message"]


# ---------------------------------------------------------------------- no worker alive


class WorkerKilled(BaseException):
    """Not an `Exception`: it ends the worker thread."""


def test_no_worker_alive_is_503_on_ready_uploads_and_streams(
    checkpoints: dict[str, Path], wav: bytes
) -> None:
    # The one worker dies and (replacement disabled, as if it failed) none takes its place:
    # /ready says 503 with Retry-After, uploads get 503 unavailable, a websocket is closed 1013.
    import asyncio

    settings = settings_for(checkpoints["wav2vec2-bert"], cpu_workers=1)
    with LiveServer(create_app(settings)) as live:
        pool = live.app.state.engine.pool
        assert httpx.get(live.url + "/ready").status_code == 200

        def die(worker: object, jobs: object) -> None:
            raise WorkerKilled("injected")

        pool.replace = lambda dead: None
        pool.before_batch = die
        killed = httpx.post(live.url + TRANSCRIBE, files={"file": ("a.wav", wav)}, timeout=60)
        assert killed.status_code == 503  # its request: the worker crashed
        pool.workers[0].thread.join(30)
        assert pool.alive == 0

        ready = httpx.get(live.url + "/ready")
        assert ready.status_code == 503
        assert ready.json()["status"] == "not ready"
        assert int(ready.headers["retry-after"]) >= 1
        upload = httpx.post(live.url + TRANSCRIBE, files={"file": ("a.wav", wav)}, timeout=60)
        assert upload.status_code == 503
        assert upload.json()["error"]["code"] == "unavailable"
        assert "retry-after" in upload.headers
        metrics = httpx.get(live.url + "/metrics").text
        assert 'stt_worker_up{device="cpu",worker="0"} 0.0' in metrics

        async def stream_close() -> int | None:
            url = live.url.replace("http://", "ws://") + "/v1/audio/stream?sample_rate=16000"
            async with connect(url) as ws:
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 30)
                return ws.close_code

        assert asyncio.run(stream_close()) == 1013


def test_stt_language_is_the_language_of_a_model_without_language_tokens(
    checkpoints: dict[str, Path], wav: bytes
) -> None:
    """`STT_LANGUAGE` names what such a model speaks: it is reported, accepted as `language`,
    and any other language is refused (the model has no token to force it)."""
    settings = settings_for(checkpoints["wav2vec2-bert"], language="de", cpu_workers=1)
    with LiveServer(create_app(settings)) as german, httpx.Client(base_url=german.url) as client:

        def post(**fields: str) -> httpx.Response:
            data = {"response_format": "verbose_json", **fields}
            files = {"file": ("a.wav", wav)}
            return client.post("/v1/audio/transcriptions", files=files, data=data, timeout=60)

        assert post().json()["language"] == "de"
        assert post(language="de").json()["language"] == "de"
        assert post(language="German").json()["language"] == "de"  # names map to codes
        refused = post(language="en")
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "unsupported"
        assert refused.json()["error"]["param"] == "language"
