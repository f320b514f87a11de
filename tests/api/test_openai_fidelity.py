"""Every field of OpenAI's audio requests honoured or refused, through the official client.

A real uvicorn server on the bundled model (real transcripts) and the official `openai`
Python client, as OpenAI's users call it: nothing asked for is silently ignored.
"""

import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import soxr

from service.api.app import create_app
from service.settings import DEFAULT_MODEL_DIR, Settings
from tests.conftest import LiveServer, encode, speak
from tests.media import KINDS, record_as

RATE = 16_000
SAMPLE = DEFAULT_MODEL_DIR / "samples" / "06-turn-on-the.wav"
TRANSCRIBE = "/v1/audio/transcriptions"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer(create_app(Settings(cpu_workers=1, model_aliases=["whisper-1"]))) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def voice(text: str) -> np.ndarray:
    """espeak-ng speech at 16 kHz, without espeak's own silence before and after it."""
    audio = soxr.resample(speak(text), 22_050, RATE).astype(np.float32)
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    return audio[loud[0] : loud[-1] + 1]


def wav(audio: np.ndarray, rate: int = RATE) -> bytes:
    return encode(audio, rate, "WAV", "PCM_16")


def refused(call: Any, status: int = 400) -> dict[str, Any]:
    """The error body of a call the client raises for."""
    with pytest.raises(openai.APIStatusError) as info:
        call()
    assert info.value.status_code == status, info.value.response.text
    error: dict[str, Any] = info.value.response.json()["error"]
    return error


def create(client: openai.OpenAI, audio: bytes, **fields: Any) -> Any:
    return client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), **fields)


# ------------------------------------------------------------------------ 1. nothing ignored


def test_unknown_field_is_refused_by_name(client: openai.OpenAI) -> None:
    audio = SAMPLE.read_bytes()
    error = refused(lambda: create(client, audio, extra_body={"beam_size": "3"}))
    assert (error["code"], error["param"]) == ("invalid_value", "beam_size")
    assert "beam_size" in error["message"]
    error = refused(
        lambda: client.audio.translations.create(
            model="whisper-1", file=("a.wav", audio), extra_body={"frobnicate": "1"}
        )
    )
    assert (error["code"], error["param"]) == ("invalid_value", "frobnicate")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"keywords": ["lights"]}, "keywords"),
        ({"languages": ["en", "de"]}, "languages"),
        ({"known_speaker_names": ["agent"]}, "known_speaker_names"),
        ({"known_speaker_references": ["data:audio/wav;base64,AAAA"]}, "known_speaker_references"),
    ],
)
def test_openai_fields_we_cannot_honour_are_refused(
    client: openai.OpenAI, fields: dict[str, Any], param: str
) -> None:
    error = refused(lambda: create(client, SAMPLE.read_bytes(), **fields))
    assert (error["code"], error["param"]) == ("unsupported", param)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": "diarized_json"}, "response_format"),
        ({"timestamp_granularities": ["word"]}, "timestamp_granularities"),  # json: no place
        ({"timestamp_granularities": ["segment"], "response_format": "text"}, None),
        ({"include": ["logprobs"], "response_format": "srt"}, "include"),
        ({"include": ["tokens"]}, "include"),
        ({"chunking_strategy": {"type": "server_vad", "threshold": 2}}, None),
        ({"chunking_strategy": {"type": "client_vad"}}, None),
        ({"language": "hh"}, "language"),
        ({"language": "klingon"}, "language"),
    ],
)
def test_fields_that_cannot_be_honoured_together_are_refused(
    client: openai.OpenAI, fields: dict[str, Any], param: str | None
) -> None:
    error = refused(lambda: create(client, SAMPLE.read_bytes(), **fields))
    assert error["code"] == "invalid_value"
    if param is not None:
        assert error["param"] == param
    else:
        key = next(iter(fields))
        assert error["param"].startswith(key.removesuffix("_body"))


def test_translation_takes_no_stream(server: LiveServer) -> None:
    response = httpx.post(
        server.url + "/v1/audio/translations",
        files={"file": ("a.wav", SAMPLE.read_bytes())},
        data={"stream": "true"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] in ("stream", "model")


def test_max_completion_tokens_is_max_new_tokens(client: openai.OpenAI) -> None:
    audio = SAMPLE.read_bytes()
    full = create(client, audio, response_format="verbose_json")
    assert full.text == "turn on the lights"
    cut = create(
        client, audio, response_format="verbose_json", extra_body={"max_completion_tokens": 2}
    )
    assert cut.text == "turn on"
    assert len(cut.segments[0].tokens) == 2
    error = refused(
        lambda: create(client, audio, extra_body={"max_completion_tokens": 2, "max_new_tokens": 3})
    )
    assert error["param"] in ("max_completion_tokens", "max_new_tokens")
    assert "more than once" in error["message"]


def test_a_scalar_field_given_twice_is_refused(server: LiveServer) -> None:
    files = [("file", ("a.wav", SAMPLE.read_bytes())), ("language", (None, "en"))]
    files.append(("language", (None, "de")))
    response = httpx.post(server.url + TRANSCRIBE, files=files)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "language"


def test_prompt_is_refused_by_a_model_that_takes_none(client: openai.OpenAI) -> None:
    error = refused(lambda: create(client, SAMPLE.read_bytes(), prompt="lights"))
    assert (error["code"], error["param"]) == ("unsupported", "prompt")


def test_the_openapi_document_lists_every_field(server: LiveServer) -> None:
    document = httpx.get(server.url + "/openapi.json").json()
    body = document["paths"][TRANSCRIBE]["post"]["requestBody"]["content"]["multipart/form-data"]
    names = set(body["schema"]["properties"])
    assert {
        "file", "model", "language", "prompt", "response_format", "temperature",
        "timestamp_granularities[]", "include[]", "chunking_strategy", "stream",
    } <= names  # fmt: skip
    assert body["schema"]["required"] == ["file"]


# --------------------------------------------------------------------------------- 6. language


def test_language_codes_and_names(client: openai.OpenAI) -> None:
    audio = SAMPLE.read_bytes()
    for given in ("en", "EN", "english", "English"):
        result = create(client, audio, language=given, response_format="verbose_json")
        assert result.language == "en"
        assert result.text == "turn on the lights"
    # a real language this English-only model (no language tokens) cannot use
    error = refused(lambda: create(client, audio, language="de"))
    assert (error["code"], error["param"]) == ("unsupported", "language")
    error = refused(lambda: create(client, audio, language="german"))
    assert (error["code"], error["param"]) == ("unsupported", "language")


# ------------------------------------------------------------------------------ 7. containers


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_recorded_containers_transcribe_like_the_wav(client: openai.OpenAI, kind: str) -> None:
    audio, rate = sf.read(SAMPLE, dtype="float32")
    data = record_as(audio, rate, kind)
    result = create(client, data, response_format="verbose_json")
    assert result.text == "turn on the lights"
    # AAC adds up to two frames of priming and padding where no edit list trims them (ADTS)
    assert result.duration == pytest.approx(len(audio) / rate, abs=0.15)


@pytest.mark.parametrize(
    ("fmt", "subtype"),
    [
        ("AIFF", "PCM_16"),
        ("AU", "PCM_16"),
        ("NIST", "PCM_16"),
        ("IRCAM", "PCM_16"),
        ("HTK", "PCM_16"),
        ("MAT5", "PCM_16"),
        ("VOC", "PCM_16"),
        ("W64", "PCM_16"),
        ("CAF", "PCM_16"),
    ],
)
def test_containers_nobody_records_speech_in_are_refused(
    client: openai.OpenAI, fmt: str, subtype: str
) -> None:
    audio, rate = sf.read(SAMPLE, dtype="float32")
    data = encode(audio, rate, fmt, subtype)
    with pytest.raises(openai.BadRequestError) as info:
        create(client, data)
    error = info.value.response.json()["error"]
    assert (error["code"], error["param"]) == ("unsupported_media_type", "file")


def test_undecodable_input_is_a_bad_request(client: openai.OpenAI) -> None:
    audio, rate = sf.read(SAMPLE, dtype="float32")
    webm = record_as(audio, rate, "webm-opus")
    cases = {
        b"I am a text file, not audio\n" * 10: "unsupported_media_type",
        webm[:40]: "bad_audio",  # WebM header cut short: the right container, broken
        b"RIFF\x00\x00\x00\x00WAVEfmt ": "bad_audio",
    }
    for data, code in cases.items():
        with pytest.raises(openai.BadRequestError) as info:
            create(client, data)
        assert info.value.response.json()["error"]["code"] == code


# ------------------------------------------------------------------------------- 8. no speech


@pytest.mark.parametrize("seconds", [1, 7, 19])
def test_digital_silence_gives_no_words_on_every_path(client: openai.OpenAI, seconds: int) -> None:
    data = wav(np.zeros(seconds * RATE, np.float32))
    assert create(client, data).text == ""
    verbose = create(client, data, response_format="verbose_json")
    assert (verbose.text, verbose.segments) == ("", [])
    worded = create(client, data, response_format="verbose_json", timestamp_granularities=["word"])
    assert (worded.text, worded.segments, worded.words) == ("", [], [])
    assert create(client, data, response_format="srt") == ""
    chunked = create(client, data, response_format="verbose_json", chunking_strategy="auto")
    assert (chunked.text, chunked.segments) == ("", [])
    events = list(create(client, data, stream=True))
    assert [e.type for e in events] == ["transcript.text.done"]
    assert events[0].text == ""


def test_digital_silence_on_the_websocket_gives_no_words(server: LiveServer) -> None:
    from websockets.sync.client import connect

    url = server.url.replace("http", "ws") + "/v1/audio/stream?sample_rate=16000"
    with connect(url) as ws:
        assert json.loads(ws.recv())["type"] == "session.created"
        for _ in range(30):  # 3 s of digital silence in 100 ms frames
            ws.send(bytes(3200))
        ws.send(json.dumps({"type": "end"}))
        events = []
        while (event := json.loads(ws.recv()))["type"] != "session.ended":
            events.append(event)
    assert all(e.get("text", "") == "" for e in events), events
    assert not [e for e in events if e["type"] == "error"]


@pytest.mark.parametrize("kind", ["hiss", "tone"])
def test_steady_noise_on_the_websocket_gives_no_words(server: LiveServer, kind: str) -> None:
    from websockets.sync.client import connect

    rng = np.random.default_rng(1)
    t = np.arange(4 * RATE) / RATE
    noise = rng.normal(0, 0.05, t.size) if kind == "hiss" else 0.3 * np.sin(2 * np.pi * 440 * t)
    # after a second of silence, so that the endpointer's noise floor starts low and the noise
    # opens an utterance: the gate, not the endpointer, must keep it wordless
    noise = np.concatenate([np.zeros(RATE), noise, np.zeros(RATE)])
    pcm = (np.clip(noise, -1, 1) * 32767).astype("<i2").tobytes()
    url = server.url.replace("http", "ws") + "/v1/audio/stream?sample_rate=16000"
    with connect(url) as ws:
        assert json.loads(ws.recv())["type"] == "session.created"
        for start in range(0, len(pcm), 3200):  # 100 ms frames
            ws.send(pcm[start : start + 3200])
        ws.send(json.dumps({"type": "end"}))
        events = []
        while (event := json.loads(ws.recv()))["type"] != "session.ended":
            events.append(event)
    assert all(e.get("text", "") == "" for e in events), events
    assert not [e for e in events if e["type"] == "error"]


def test_steady_noise_and_tones_give_no_words(client: openai.OpenAI) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(3 * RATE) / RATE
    for audio in (
        rng.normal(0, 0.05, 3 * RATE),  # hiss
        0.3 * np.sin(2 * np.pi * 440 * t),  # a held tone
        0.2 * np.sin(2 * np.pi * 50 * t) + rng.normal(0, 0.01, t.size),  # mains hum
    ):
        result = create(client, wav(audio.astype(np.float32)), response_format="verbose_json")
        assert (result.text, result.segments) == ("", [])


# --------------------------------------------------------------------------- 3, 5. logprobs


def test_logprobs_in_json(client: openai.OpenAI) -> None:
    audio = SAMPLE.read_bytes()
    result = create(client, audio, include=["logprobs"])
    assert result.text == "turn on the lights"
    assert [lp.token for lp in result.logprobs] == ["turn", " on", " the", " lights"]
    assert "".join(lp.token for lp in result.logprobs) == result.text
    for lp in result.logprobs:
        assert -20 < lp.logprob <= 0
        assert bytes(int(b) for b in lp.bytes) == lp.token.encode()
    verbose = create(client, audio, response_format="verbose_json")
    mean = np.mean([lp.logprob for lp in result.logprobs])
    assert verbose.segments[0].avg_logprob == pytest.approx(mean, abs=1e-3)
    plain = create(client, audio)
    assert plain.logprobs is None  # only when asked


def test_logprobs_and_usage_in_the_stream(client: openai.OpenAI) -> None:
    audio = SAMPLE.read_bytes()
    expected = create(client, audio, include=["logprobs"]).logprobs
    events = list(create(client, audio, stream=True, include=["logprobs"]))
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    (done,) = [e for e in events if e.type == "transcript.text.done"]
    assert len(deltas) >= 4  # streamed token by token, each with its logprobs
    streamed = [lp for d in deltas for lp in d.logprobs]
    assert [lp.token for lp in streamed] == [lp.token for lp in expected]
    assert [lp.logprob for lp in streamed] == pytest.approx(
        [lp.logprob for lp in expected], abs=2e-4
    )
    for delta in deltas:
        assert "".join(lp.token for lp in delta.logprobs) == delta.delta or delta is deltas[0]
    assert [lp.token for lp in done.logprobs] == [lp.token for lp in expected]
    # usage: the audio's encoder frames in, the generated tokens out
    info = sf.info(SAMPLE)
    frames = 38  # the bundled encoder: 25 frames a second (strides 5·4·4·8 = 640 samples)
    assert info.frames // 640 <= done.usage.input_tokens == frames
    assert done.usage.output_tokens == 4
    assert done.usage.total_tokens == frames + 4
    assert done.usage.input_token_details.audio_tokens == frames
    plain = list(create(client, audio, stream=True))
    assert all(getattr(e, "logprobs", None) is None for e in plain)
    assert plain[-1].usage == done.usage


# -------------------------------------------------------------------------- 4. chunking


def _three_commands() -> tuple[bytes, list[tuple[float, float]]]:
    """Three commands with a second of quiet between them; (start, end) of each."""
    quiet = np.zeros(RATE, np.float32)
    parts, spans, now = [quiet], [], 1.0
    for text in ("turn on the lights", "call mom", "go left"):
        speech = voice(text)
        parts += [speech, quiet]
        spans.append((now, now + len(speech) / RATE))
        now += len(speech) / RATE + 1.0
    audio = np.concatenate(parts) + np.random.default_rng(0).normal(0, 1e-3, int(now * RATE))
    return wav(audio.astype(np.float32)), spans


def test_chunking_strategy_drives_the_windows(client: openai.OpenAI) -> None:
    data, spans = _three_commands()
    whole = create(client, data, response_format="verbose_json")
    assert len(whole.segments) == 1  # unset: one block, as OpenAI does
    auto = create(client, data, response_format="verbose_json", chunking_strategy="auto")
    assert [s.text for s in auto.segments] == ["turn on the lights", "call mom", "go left"]
    for segment, (start, end) in zip(auto.segments, spans, strict=True):
        assert segment.start == pytest.approx(start, abs=0.1)
        assert segment.end == pytest.approx(end, abs=0.15)
    # pauses shorter than silence_duration_ms do not end a chunk
    long_pause = create(
        client,
        data,
        response_format="verbose_json",
        chunking_strategy={"type": "server_vad", "silence_duration_ms": 1500},
    )
    assert len(long_pause.segments) == 1
    vad = create(
        client,
        data,
        response_format="verbose_json",
        chunking_strategy={"type": "server_vad", "silence_duration_ms": 500, "threshold": 0.5},
    )
    assert [s.text for s in vad.segments] == [s.text for s in auto.segments]
    # streamed: one segment event per chunk
    events = list(create(client, data, stream=True, chunking_strategy="auto"))
    segments = [e for e in events if e.type == "transcript.text.segment"]
    assert [s.text for s in segments] == [s.text for s in auto.segments]


def test_chunking_strategy_as_json_text_and_brackets(server: LiveServer) -> None:
    data, _ = _three_commands()
    as_json = httpx.post(
        server.url + TRANSCRIBE,
        files={"file": ("a.wav", data)},
        data={
            "response_format": "verbose_json",
            "chunking_strategy": json.dumps({"type": "server_vad", "silence_duration_ms": 500}),
        },
        timeout=60,
    )
    assert as_json.status_code == 200, as_json.text
    assert len(as_json.json()["segments"]) == 3
    both = httpx.post(
        server.url + TRANSCRIBE,
        files={"file": ("a.wav", data)},
        data={"chunking_strategy": "auto", "chunking_strategy[type]": "server_vad"},
    )
    assert both.status_code == 400
    assert both.json()["error"]["param"] == "chunking_strategy"


# ------------------------------------------------------------------------- 2. word timestamps


def test_words_with_verbose_json(client: openai.OpenAI) -> None:
    audio = SAMPLE.read_bytes()
    result = create(
        client,
        audio,
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    assert [w.word for w in result.words] == result.text.split()
    starts = [w.start for w in result.words]
    assert starts == sorted(starts)
    assert all(0 <= w.start <= w.end <= result.duration for w in result.words)
    assert result.segments[0].start == 0.0  # segments keep their times
    assert create(client, audio, response_format="verbose_json").words is None
