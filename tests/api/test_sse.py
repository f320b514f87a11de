"""`stream=true` uploads: Server-Sent Events in OpenAI's shape, read by the official client."""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI
from transformers import AutoTokenizer, SpeechEncoderDecoderModel

from service.api.app import create_app
from service.settings import DEFAULT_MODEL_DIR, Settings
from tests.checkpoints import byte_symbols
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
    assert beams[-1]["type"] == "transcript.text.done"
    assert beams[-1]["text"] == plain_beams.json()["text"]


# Characters of 2, 3 and 4 UTF-8 bytes between ASCII letters; each byte is its own token.
MULTIBYTE = "éa€b🎉c"


def spelling_checkpoint(src: Path, out: Path) -> list[int]:
    """A copy of the tiny HuBERT + GPT-2 checkpoint whose decoder writes `MULTIBYTE` one byte
    token at a time, whatever the audio; returns those token ids.

    The decoder is a real GPT-2 run by the real service, with weights set so that its output
    is known: attention, cross-attention and MLP outputs are zeroed and positions carry
    nothing, so the last hidden state is the layer norm of the current token's embedding; each
    token on the path embeds as its own unit vector, and the output projection maps that
    vector to the next token of the path.
    """
    model = SpeechEncoderDecoderModel.from_pretrained(src)
    tokenizer = AutoTokenizer.from_pretrained(src)
    vocab = tokenizer.get_vocab()
    path = [vocab[byte_symbols()[byte]] for byte in MULTIBYTE.encode()]
    states = [model.generation_config.decoder_start_token_id, *path]
    decoder = model.decoder
    assert len(states) <= decoder.config.n_embd
    with torch.no_grad():
        for name, weights in decoder.transformer.named_parameters():
            if name.split(".")[-2] == "c_proj":
                weights.zero_()
        decoder.transformer.wpe.weight.zero_()
        embed = decoder.transformer.wte.weight
        head = decoder.get_output_embeddings().weight
        embed.zero_()
        head.zero_()
        for state, token in enumerate(states[:-1]):
            embed[token, state] = 1.0
            head[states[state + 1], state] = 1.0
    model.generation_config.max_new_tokens = len(path)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.copy(src / "preprocessor_config.json", out)
    return path


def test_deltas_never_split_a_multi_byte_character(
    checkpoints: dict[str, Path], speech_wav: bytes, tmp_path: Path
) -> None:
    path = spelling_checkpoint(checkpoints["hubert-gpt2"], tmp_path / "spelling")
    assert len(path) == len(MULTIBYTE.encode()) > len(MULTIBYTE)
    with LiveServer(create_app(settings_for(tmp_path / "spelling"))) as server:
        verbose = httpx.post(
            server.url + TRANSCRIBE,
            files={"file": ("a.wav", speech_wav)},
            data={"response_format": "verbose_json"},
            timeout=60,
        ).json()
        streamed = events(server, speech_wav)
    assert verbose["segments"][0]["tokens"] == path  # é, € and 🎉 arrive in 2, 3, 4 tokens
    assert verbose["text"] == MULTIBYTE
    deltas = [e["delta"] for e in streamed if e["type"] == "transcript.text.delta"]
    assert streamed[-1]["type"] == "transcript.text.done"
    assert streamed[-1]["text"] == MULTIBYTE
    assert "".join(deltas) == MULTIBYTE  # type: ignore[arg-type]
    assert not any("\ufffd" in d for d in deltas), deltas  # type: ignore[operator]
    assert len(deltas) >= len(MULTIBYTE) - 1, deltas  # as generated, not one lump at the end


def test_stream_errors_before_the_stream_are_json(bundled_server: LiveServer) -> None:
    response = httpx.post(
        bundled_server.url + TRANSCRIBE,
        files={"file": ("a.wav", b"not audio at all")},
        data={"stream": "true"},
    )
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["param"] == "file"
