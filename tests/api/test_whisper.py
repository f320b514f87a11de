"""Whisper through every endpoint, on tiny Whisper checkpoints with OpenAI's real tokenizer.

Each request's tokens are checked against `generate` on the same audio with the same Whisper
options (language, task, prompt), so a forced language, a prompt or a translation is proven to
reach the model, and the language reported is the one the decoder prompt really held.
"""

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soxr
import torch
from websockets.asyncio.client import connect

from service.api.app import create_app
from service.engine.adapter import ModelAdapter
from service.engine.engine import Engine
from service.engine.types import GenerationParams
from service.errors import BadAudio, StartupError
from tests.api.test_reference import RATE, Reference, clip
from tests.conftest import LiveServer, encode, settings_for, speak

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wav() -> bytes:
    return encode(clip("turn on the lights", 0), RATE, "WAV", "PCM_16")


@pytest.fixture(scope="module")
def multilingual(checkpoints: dict[str, Path]) -> Iterator[tuple[LiveServer, Reference]]:
    # windows up to 60 s allowed by the settings: the model's 30 s limit must win
    settings = settings_for(
        checkpoints["whisper"], cpu_workers=1, cpu_threads=1, max_window_seconds=60
    )
    with LiveServer(create_app(settings)) as server:
        yield server, Reference(checkpoints["whisper"])


@pytest.fixture(scope="module")
def english(checkpoints: dict[str, Path]) -> Iterator[tuple[LiveServer, Reference]]:
    settings = settings_for(checkpoints["whisper-en"], cpu_workers=1, cpu_threads=1)
    with LiveServer(create_app(settings)) as server:
        yield server, Reference(checkpoints["whisper-en"])


def talk(seconds: float) -> np.ndarray:
    """Continuous speech (phrases 0.15 s apart, too short a pause to cut at) over faint noise."""
    phrases = ["turn on the lights", "three four five", "set a timer for ten minutes"]
    voices = [soxr.resample(speak(p), 22_050, RATE).astype(np.float32) for p in phrases]
    gap = np.zeros(int(0.15 * RATE), np.float32)
    parts, total, index = [], 0, 0
    while total < seconds * RATE:
        parts += [voices[index % len(voices)], gap]
        total += len(parts[-2]) + len(gap)
        index += 1
    audio = np.concatenate(parts)[: int(seconds * RATE)]
    return audio + np.random.default_rng(5).normal(0, 0.002, len(audio)).astype(np.float32)


def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(api_key="unused", base_url=server.url + "/v1", max_retries=0)


def tokens_of(result: object) -> list[int]:
    return [t for s in getattr(result, "segments", None) or [] for t in s.tokens]


def post(server: LiveServer, path: str, wav: bytes, **fields: str) -> httpx.Response:
    return httpx.post(server.url + path, files={"file": ("a.wav", wav)}, data=fields, timeout=60)


def test_forced_language_is_used_and_reported(multilingual, wav: bytes) -> None:
    server, reference = multilingual
    detected = client(server).audio.transcriptions.create(
        model="tiny", file=("a.wav", wav), response_format="verbose_json"
    )
    forced = "de" if detected.language != "de" else "fr"
    result = client(server).audio.transcriptions.create(
        model="tiny", file=("a.wav", wav), response_format="verbose_json", language=forced
    )
    assert result.language == forced
    prompt, tokens = reference.generate(wav, task="transcribe", language=forced)
    assert reference.tokenizer.convert_ids_to_tokens(prompt[1]) == f"<|{forced}|>"
    assert tokens_of(result) == tokens


def test_prompt_reaches_the_decoder(multilingual, wav: bytes) -> None:
    server, reference = multilingual
    text = "Call home, then set a timer."
    result = client(server).audio.transcriptions.create(
        model="tiny", file=("a.wav", wav), response_format="verbose_json", prompt=text
    )
    prompt_ids = torch.tensor(reference.tokenizer.get_prompt_ids(text))
    _, tokens = reference.generate(wav, task="transcribe", prompt_ids=prompt_ids)
    _, without = reference.generate(wav, task="transcribe")
    assert tokens != without  # the prompt changes this model's output ...
    assert tokens_of(result) == tokens  # ... and the service's in the same way


def test_translation_uses_the_translate_task(multilingual, wav: bytes) -> None:
    server, reference = multilingual
    result = client(server).audio.translations.create(
        model="tiny", file=("a.wav", wav), response_format="verbose_json"
    )
    prompt, tokens = reference.generate(wav, task="translate")
    assert reference.tokenizer.convert_ids_to_tokens(prompt[2]) == "<|translate|>"
    assert tokens_of(result) == tokens
    assert result.language == "en"
    # Whisper translates into English only
    refused = post(server, "/v1/audio/translations", wav, language="de")
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "language"
    assert "English only" in refused.json()["error"]["message"]


def test_unknown_language_lists_the_known_ones(multilingual, wav: bytes) -> None:
    server, _ = multilingual
    # a real ISO 639-1 language (Abkhazian) the model has no token for: its languages are listed
    refused = post(server, "/v1/audio/transcriptions", wav, language="ab")
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "language"
    assert "de, el, en" in error["message"]
    # not a language at all: refused at the API boundary (ISO 639-1)
    bogus = post(server, "/v1/audio/transcriptions", wav, language="xx")
    assert bogus.status_code == 400
    assert bogus.json()["error"]["param"] == "language"
    assert "ISO 639-1" in bogus.json()["error"]["message"]


def test_sse_deltas_join_to_the_upload_text(multilingual, wav: bytes) -> None:
    server, _ = multilingual
    plain = post(server, "/v1/audio/transcriptions", wav).json()["text"]
    with httpx.stream(
        "POST",
        server.url + "/v1/audio/transcriptions",
        files={"file": ("a.wav", wav)},
        data={"stream": "true"},
        timeout=60,
    ) as response:
        events = [
            json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")
        ]
    deltas = "".join(e["delta"] for e in events if e["type"] == "transcript.text.delta")
    assert events[-1]["type"] == "transcript.text.done"
    assert events[-1]["text"] == plain
    assert events[-1]["usage"]["input_tokens"] > 0
    assert deltas.strip() == plain


def test_long_audio_is_cut_into_windows_of_at_most_30_s(multilingual) -> None:
    server, _ = multilingual
    noise = talk(70)
    result = client(server).audio.transcriptions.create(
        model="tiny",
        file=("long.wav", encode(noise, RATE, "WAV", "PCM_16")),
        response_format="verbose_json",
    )
    assert result.segments is not None
    assert len(result.segments) >= 3  # 70 s in windows of at most 30 s
    assert all(s.end - s.start <= 30.0 + 1e-3 for s in result.segments)
    assert result.segments[-1].end > 69.0


@pytest.mark.parametrize("vad", ["energy", "silero"])
def test_websocket_utterances_are_capped_at_the_window(multilingual, vad: str) -> None:
    """The session asks for 60 s utterances; Whisper's input is 30 s, so continuous sound is
    finalised in pieces of at most 30 s, each transcribed (no error events)."""
    server, _ = multilingual
    noise = talk(45)
    pcm = (np.clip(noise, -1, 1) * 32767).astype("<i2").tobytes()
    url = server.url.replace("http://", "ws://") + "/v1/audio/stream"

    async def scenario() -> list[dict]:
        async with connect(url, max_size=None) as ws:
            config = {"type": "config", "sample_rate": RATE, "partials": False, "vad": vad}
            config["silence_duration_ms"] = 3000  # no turn ends: only the length cuts
            await ws.send(json.dumps({**config, "max_utterance_seconds": 60}))
            for offset in range(0, len(pcm), 32_000):
                await ws.send(pcm[offset : offset + 32_000])
            await ws.send(json.dumps({"type": "end"}))
            return [json.loads(m) async for m in ws]

    events = asyncio.run(scenario())
    assert not [e for e in events if e["type"] == "error"], events
    finals = [e for e in events if e["type"] == "transcript.final"]
    assert len(finals) >= 2
    assert finals[0]["reason"] == "max_length"
    assert all(f["end"] - f["start"] <= 30.0 + 1e-3 for f in finals)
    assert all(f["text"] for f in finals)


def test_english_only_takes_no_task_or_language(english, wav: bytes) -> None:
    server, reference = english
    result = client(server).audio.transcriptions.create(
        model="tiny", file=("a.wav", wav), response_format="verbose_json", language="en"
    )
    _, tokens = reference.generate(wav)  # plain generate: no task, no language
    assert tokens_of(result) == tokens
    assert result.language == "en"
    refused = post(server, "/v1/audio/transcriptions", wav, language="de")
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "language"
    models = httpx.get(server.url + "/v1/models").json()["data"]
    assert models[0]["architecture"] == "whisper"
    cannot = post(server, "/v1/audio/translations", wav)
    assert cannot.status_code == 400
    assert "English-only" in cannot.json()["error"]["message"]


def old_style(checkpoint: Path, folder: Path) -> Path:
    """The checkpoint with a 2022-style generation config: `forced_decoder_ids` only."""
    import shutil

    shutil.copytree(checkpoint, folder)
    path = folder / "generation_config.json"
    config = json.loads(path.read_text())
    for key in ("is_multilingual", "lang_to_id", "task_to_id", "no_timestamps_token_id"):
        config.pop(key, None)
    config["forced_decoder_ids"] = [[1, None], [2, config["decoder_start_token_id"] + 102]]
    path.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("warmup", [False, True])
def test_old_generation_config_fails_at_start_up(
    checkpoints: dict[str, Path], tmp_path: Path, warmup: bool
) -> None:
    folder = old_style(checkpoints["whisper"], tmp_path / "old")
    with pytest.raises(StartupError) as caught:
        Engine.load(settings_for(folder, warmup=warmup, cpu_workers=1))
    message = str(caught.value)
    assert "is_multilingual, no_timestamps_token_id, lang_to_id, task_to_id" in message
    assert "generation_config.json" in message


def test_generation_config_of_another_whisper_fails_at_start_up(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """large-v3 added a language: a v2 config on a v3 tokenizer is off by one from <|yue|> on."""
    folder = old_style(checkpoints["whisper"], tmp_path / "shifted")
    fixed = json.loads((checkpoints["whisper"] / "generation_config.json").read_text())
    fixed["task_to_id"] = {task: i - 1 for task, i in fixed["task_to_id"].items()}
    (folder / "generation_config.json").write_text(json.dumps(fixed))
    with pytest.raises(StartupError, match="does not match its tokenizer") as caught:
        Engine.load(settings_for(folder, warmup=False, cpu_workers=1))
    assert "<|transcribe|>=50359 (the tokenizer has 50360)" in str(caught.value)


def test_engine_refuses_a_window_longer_than_the_model_takes(
    checkpoints: dict[str, Path],
) -> None:
    settings = settings_for(checkpoints["whisper"], warmup=False, cpu_workers=1)
    engine = Engine.load(settings)
    engine.start()
    try:

        async def run() -> None:
            with pytest.raises(BadAudio, match="at most 30 s"):
                engine.submit(np.zeros(31 * RATE, np.float32), GenerationParams())

        asyncio.run(run())
    finally:
        engine.stop()


def test_features_are_padded_to_30_s(checkpoints: dict[str, Path]) -> None:
    adapter = ModelAdapter(checkpoints["whisper"], "tiny")
    feats = adapter.features([np.zeros(RATE, np.float32), np.zeros(3 * RATE, np.float32)])
    assert feats["input_features"].shape == (2, 80, 3000)


def test_beam_search_equals_generate(multilingual, wav: bytes) -> None:
    """Whisper hands back each row's own beam: the service's tokens are still generate's."""
    server, reference = multilingual
    response = post(
        server, "/v1/audio/transcriptions", wav, response_format="verbose_json", num_beams="3"
    )
    assert response.status_code == 200, response.text
    _, tokens = reference.generate(wav, task="transcribe", num_beams=3)
    assert [t for s in response.json()["segments"] for t in s["tokens"]] == tokens
