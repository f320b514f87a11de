"""The REST API end to end: a real uvicorn server, httpx and the official OpenAI client."""

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from service.api.app import create_app
from service.settings import Settings
from tests.conftest import LiveServer, encode, settings_for, speak

TRANSCRIBE = "/v1/audio/transcriptions"


def post(server: LiveServer, body: bytes | None = None, name: str = "a.wav", **fields: object):
    files = {"file": (name, body)} if body is not None else None
    data = {k: str(v) for k, v in fields.items()}
    return httpx.post(server.url + TRANSCRIBE, files=files, data=data, timeout=60)


def assert_error(response: httpx.Response, status: int, code: str, param: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"}
    assert error["request_id"] == response.headers["x-request-id"]
    assert error["code"] == code
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_probes_and_model_list(tiny_server: LiveServer) -> None:
    assert httpx.get(tiny_server.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(tiny_server.url + "/ready")
    assert ready.status_code == 200
    assert ready.json()["workers"] == min(4, os.cpu_count() or 1)  # CPU workers by default
    models = httpx.get(tiny_server.url + "/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["architecture"] == "wav2vec2+bert"


def test_ready_is_503_before_the_model_is_loaded(checkpoints: dict[str, Path]) -> None:
    from fastapi.testclient import TestClient

    app = create_app(settings_for(checkpoints["wav2vec2-bert"]))
    client = TestClient(app)  # not entered: the lifespan (model load) has not run
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.headers["retry-after"]
    assert_error(client.post(TRANSCRIBE, files={"file": ("a.wav", b"x")}), 503, "unavailable")


@pytest.mark.parametrize("fmt", ["json", "text", "verbose_json", "srt", "vtt"])
def test_each_response_format_with_httpx(tiny_server: LiveServer, speech_wav: bytes, fmt: str):
    response = post(tiny_server, speech_wav, response_format=fmt, model="tiny")
    assert response.status_code == 200, response.text
    json_text = post(tiny_server, speech_wav).json()["text"]
    duration = len(speak("turn on the lights")) / 22_050
    assert response.headers["x-batch-size"] == "1"
    assert response.headers["server-timing"].startswith("queue;dur=")
    if fmt == "json":
        body = response.json()
        assert body["usage"] == {"type": "duration", "seconds": pytest.approx(duration, abs=1e-3)}
    elif fmt == "text":
        assert response.text == json_text
    elif fmt == "verbose_json":
        body = response.json()
        assert body["text"] == json_text
        assert body["duration"] == pytest.approx(duration, abs=1e-3)
        assert body["task"] == "transcribe"
        (segment,) = body["segments"]
        assert segment["start"] == 0.0
        assert segment["end"] == pytest.approx(duration, abs=1e-3)
        assert len(segment["tokens"]) > 0
        assert segment["avg_logprob"] <= 0
    elif fmt == "srt":
        lines = response.text.splitlines()
        assert lines[0] == "1"
        assert lines[1].startswith("00:00:00,000 --> 00:00:0")
        assert lines[2] == json_text
    else:
        assert response.text.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:0")
        assert json_text in response.text


def test_greedy_is_deterministic_and_beam_and_sampling_work(
    tiny_server: LiveServer, speech_wav: bytes
) -> None:
    greedy = [post(tiny_server, speech_wav, response_format="verbose_json").json() for _ in "ab"]
    assert greedy[0]["segments"][0]["tokens"] == greedy[1]["segments"][0]["tokens"]
    beam = post(tiny_server, speech_wav, num_beams=3, response_format="verbose_json")
    assert beam.status_code == 200
    # beam search finds a sequence at least as likely as greedy's (same length: 8 tokens)
    beam_lp = sum(beam.json()["segments"][0]["tokens"]) and beam.json()["segments"][0]
    assert beam_lp["avg_logprob"] >= greedy[0]["segments"][0]["avg_logprob"] - 1e-3
    seeded = [
        post(tiny_server, speech_wav, temperature=1.5, seed=7, response_format="verbose_json")
        for _ in "ab"
    ]
    tokens = [r.json()["segments"][0]["tokens"] for r in seeded]
    assert tokens[0] == tokens[1]
    other_seeds = {
        tuple(
            post(
                tiny_server, speech_wav, temperature=1.5, seed=s, response_format="verbose_json"
            ).json()["segments"][0]["tokens"]
        )
        for s in range(8)
    }
    assert len(other_seeds) > 1  # sampling really samples


def test_openai_client_every_format(tiny_server: LiveServer, speech_wav: bytes, tmp_path: Path):
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)
    path = tmp_path / "speech.wav"
    path.write_bytes(speech_wav)
    expected = post(tiny_server, speech_wav).json()["text"]
    with path.open("rb") as f:
        result = client.audio.transcriptions.create(model="tiny", file=f)
    assert result.text == expected
    with path.open("rb") as f:
        verbose = client.audio.transcriptions.create(
            model="tiny", file=f, response_format="verbose_json"
        )
    assert verbose.text == expected
    assert verbose.segments is not None
    assert verbose.segments[0].text == expected
    for fmt in ("text", "srt", "vtt"):
        with path.open("rb") as f:
            out = client.audio.transcriptions.create(model="tiny", file=f, response_format=fmt)
        assert isinstance(out, str)
        assert expected in out
    with pytest.raises(openai.NotFoundError) as info, path.open("rb") as f:
        client.audio.transcriptions.create(model="whisper-1", file=f)
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError), path.open("rb") as f:
        client.audio.translations.create(model="tiny", file=f)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"num_beams": 0}, "num_beams"),
        ({"num_beams": 99}, "num_beams"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_new_tokens": 10**9}, "max_new_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"response_format": "mp4"}, "response_format"),
        ({"prompt": "x" * 5000}, "prompt"),
    ],
)
def test_bad_fields_are_400(tiny_server: LiveServer, speech_wav: bytes, fields, param) -> None:
    assert_error(post(tiny_server, speech_wav, **fields), 400, "invalid_value", param)


def test_bad_requests(tiny_server: LiveServer, speech_wav: bytes) -> None:
    assert_error(post(tiny_server, None, model="tiny"), 400, "invalid_value", "file")
    assert_error(post(tiny_server, speech_wav, model="nope"), 404, "model_not_found", "model")
    assert_error(post(tiny_server, b""), 400, "bad_audio", "file")
    assert_error(
        post(tiny_server, b"hello, I am text", name="a.wav"), 400, "unsupported_media_type", "file"
    )
    assert_error(
        post(tiny_server, np.random.default_rng(0).bytes(4096)), 400, "unsupported_media_type"
    )
    error = assert_error(
        httpx.post(
            tiny_server.url + "/v1/audio/translations", files={"file": ("a.wav", speech_wav)}
        ),
        400,
        "unsupported",
        "model",
    )
    assert "cannot translate" in error["message"]
    assert httpx.get(tiny_server.url + "/nowhere").json()["error"]["code"] == "not_found"


def test_upload_and_duration_limits(tiny_server: LiveServer) -> None:
    # 25 s of 16 kHz 16-bit audio is 800 kB: under the 2 MB upload limit, over the 20 s limit
    long_audio = encode(np.zeros(25 * 16_000, np.float32) + 0.01, 16_000, "WAV", "PCM_16")
    error = assert_error(post(tiny_server, long_audio), 413, "too_large")
    assert "limit is 20" in error["message"]
    huge = encode(np.zeros(70 * 16_000, np.float32), 16_000, "WAV", "PCM_16")  # 2.2 MB
    assert_error(post(tiny_server, huge), 413, "too_large", "file")

    def chunks():  # no Content-Length: counted while streaming
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        for _ in range(40):
            yield b"\0" * 100_000

    response = httpx.post(
        tiny_server.url + TRANSCRIBE,
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=b"},
        timeout=60,
    )
    assert_error(response, 413, "too_large")
    assert httpx.get(tiny_server.url + "/ready").status_code == 200  # still serving


@pytest.fixture(scope="module")
def bundled_server() -> Iterator[LiveServer]:
    """The bundled model: it really transcribes, so transcripts can be compared."""
    with LiveServer(create_app(Settings(cpu_workers=1))) as server:
        yield server


# A phrase the bundled model transcribes exactly at every rate and bit depth below (measured:
# "turn on the lights" as 8-bit 8 kHz audio becomes "play the news"; that is the audio's
# quality, not its container).
CONTAINER_PHRASE = "set volume to five"


@pytest.mark.parametrize(
    ("fmt", "subtype", "rate"),
    [
        ("WAV", "PCM_U8", 8_000),
        ("WAV", "PCM_24", 44_100),
        ("WAV", "FLOAT", 16_000),
        ("FLAC", "PCM_16", 22_050),
        ("OGG", "VORBIS", 44_100),
        ("OGG", "OPUS", 48_000),
        ("MP3", "MPEG_LAYER_III", 44_100),
    ],
)
def test_every_container_transcribes_like_the_wav(
    bundled_server: LiveServer, fmt: str, subtype: str, rate: int
) -> None:
    import soxr

    speech = soxr.resample(speak(CONTAINER_PHRASE), 22_050, rate)
    stereo = np.stack([speech, speech], axis=1)
    wav = post(bundled_server, encode(stereo, rate, "WAV", "PCM_16"), response_format="json")
    assert wav.status_code == 200, wav.text
    assert wav.json()["text"] == CONTAINER_PHRASE
    response = post(
        bundled_server,
        encode(stereo, rate, fmt, subtype),
        name=f"a.{fmt.lower()}",
        response_format="verbose_json",
    )
    assert response.status_code == 200, response.text
    assert response.json()["duration"] == pytest.approx(len(speech) / rate, abs=0.08)
    assert response.json()["text"] == wav.json()["text"]
