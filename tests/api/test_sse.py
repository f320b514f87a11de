"""`stream=true` uploads: Server-Sent Events in OpenAI's shape, read by the official client."""

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from service.api.app import create_app
from service.settings import DEFAULT_MODEL_DIR, Settings
from tests.conftest import LiveServer, settings_for

TRANSCRIBE = "/v1/audio/transcriptions"
SAMPLE = DEFAULT_MODEL_DIR / "samples" / "06-turn-on-the.wav"


@pytest.fixture(scope="module")
def bundled_server() -> Iterator[LiveServer]:
    with LiveServer(create_app(Settings(cpu_workers=1, model_aliases=["whisper-1"]))) as server:
        yield server


def events(server: LiveServer, audio: bytes, **fields: str) -> list[dict[str, object]]:
    data = {"stream": "true", **fields}
    with httpx.stream(
        "POST", server.url + TRANSCRIBE, files={"file": ("a.wav", audio)}, data=data, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    return [json.loads(line.removeprefix("data: ")) for line in lines]


def test_official_client_streams_deltas_then_the_text(bundled_server: LiveServer) -> None:
    client = OpenAI(base_url=bundled_server.url + "/v1", api_key="unused")
    with SAMPLE.open("rb") as f:
        stream = client.audio.transcriptions.create(model="whisper-1", file=f, stream=True)
        received = list(stream)
    deltas = [e.delta for e in received if e.type == "transcript.text.delta"]
    done = [e for e in received if e.type == "transcript.text.done"]
    assert len(done) == 1
    assert done[0].text == "turn on the lights"
    assert len(deltas) >= 4  # one per word as it is generated, not one lump at the end
    assert "".join(deltas) == done[0].text
    assert received[-1].type == "transcript.text.done"


@pytest.mark.parametrize(
    "kind", ["hubert-gpt2", "wav2vec2-bart", "wav2vec2-bert", "whisper", "whisper-en"]
)
def test_deltas_add_up_to_the_unstreamed_transcript(
    kind: str, checkpoints: dict[str, Path], speech_wav: bytes
) -> None:
    # random-weight decoders emit arbitrary tokens: byte-level BPE pieces of multi-byte
    # characters included, which deltas must never split
    with LiveServer(create_app(settings_for(checkpoints[kind]))) as server:
        plain = httpx.post(server.url + TRANSCRIBE, files={"file": ("a.wav", speech_wav)})
        streamed = events(server, speech_wav)
        beams = events(server, speech_wav, num_beams="2")
        plain_beams = httpx.post(
            server.url + TRANSCRIBE, files={"file": ("a.wav", speech_wav)}, data={"num_beams": 2}
        )
    text = plain.json()["text"]
    assert {k: v for k, v in streamed[-1].items() if k != "usage"} == {
        "type": "transcript.text.done",
        "text": text,
    }
    deltas = [e["delta"] for e in streamed if e["type"] == "transcript.text.delta"]
    assert "".join(deltas) == text  # type: ignore[arg-type]
    assert all("\ufffd" not in d for d in deltas) or "\ufffd" in text  # type: ignore[operator]
    assert beams[-1]["type"] == "transcript.text.done"
    assert beams[-1]["text"] == plain_beams.json()["text"]


def test_stream_errors_before_the_stream_are_json(bundled_server: LiveServer) -> None:
    response = httpx.post(
        bundled_server.url + TRANSCRIBE,
        files={"file": ("a.wav", b"not audio at all")},
        data={"stream": "true"},
    )
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["param"] == "file"
