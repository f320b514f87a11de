"""Whisper segment timestamps from its timestamp tokens, end to end through the OpenAI client.

What this proves, and what it does not: the test checkpoint is a tiny random-weight Whisper,
so its times mean nothing about the audio. It still writes timestamp tokens, and that is what
the path needs: with `timestamp_granularities=["segment"]` the service decodes without
`<|notimestamps|>` under Whisper's timestamp rules (transformers'
`WhisperTimeStampLogitsProcessor`, which forces a timestamp whenever the timestamp tokens
together outweigh the best text token, as they do for a near-uniform random model), and the
segments it answers must be exactly those that transformers' own `generate(...,
return_timestamps=True)` tokens delimit, read by transformers' own offset rule
(`WhisperTokenizer._compute_offsets`), capped at the audio's end. Whether a trained Whisper's
timestamps are accurate is Whisper's business, not measured here.
"""

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import soundfile as sf
import torch

from service.api.app import create_app
from tests.api.test_reference import Reference, clip
from tests.conftest import LiveServer, encode, settings_for

pytestmark = pytest.mark.slow
RATE = 16_000


@pytest.fixture(scope="module")
def server(checkpoints: dict[str, Path]) -> Iterator[tuple[LiveServer, Reference]]:
    settings = settings_for(checkpoints["whisper"], cpu_workers=1, cpu_threads=1)
    with LiveServer(create_app(settings)) as live:
        yield live, Reference(checkpoints["whisper"])


def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(api_key="unused", base_url=server.url + "/v1", max_retries=0)


def generate_with_timestamps(reference: Reference, wav: bytes) -> list[int]:
    """transformers' Whisper `generate` with its timestamp rules: the generated ids (after the
    decoder prompt), timestamps included, up to end of text."""
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    feats = reference.extractor([audio], sampling_rate=rate, return_tensors="pt")
    with torch.inference_mode():
        out = reference.model.generate(
            input_features=feats["input_features"],
            task="transcribe",
            return_timestamps=True,
            force_unique_generate_call=True,
            return_dict_in_generate=True,
            output_scores=True,
        )
    sequence = out.sequences[0].tolist()
    generated = sequence[len(sequence) - len(out.scores) :]
    eos = reference.model.generation_config.eos_token_id
    return generated[: generated.index(eos)] if eos in generated else generated


def offsets(reference: Reference, ids: list[int], monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """transformers' reading of timestamp tokens (the test tokenizer registers only
    <|endoftext|> as special; its real last special token, <|notimestamps|>, is given)."""
    tok = reference.tokenizer
    specials = [tok.eos_token_id, tok.convert_tokens_to_ids("<|notimestamps|>")]
    with monkeypatch.context() as patch:
        patch.setattr(type(tok), "all_special_ids", property(lambda self: specials))
        return list(tok._compute_offsets(ids))


def test_segments_are_those_the_timestamp_tokens_delimit(
    server: tuple[LiveServer, Reference], monkeypatch: pytest.MonkeyPatch
) -> None:
    live, reference = server
    wav = encode(clip("turn on the lights", 0), RATE, "WAV", "PCM_16")
    duration = 2.0
    result = client(live).audio.transcriptions.create(
        model="tiny",
        file=("a.wav", wav),
        response_format="verbose_json",
        timestamp_granularities=["segment"],
    )
    ids = generate_with_timestamps(reference, wav)
    begin = reference.tokenizer.convert_tokens_to_ids("<|0.00|>")
    assert sum(t >= begin for t in ids) >= 2, "no timestamp tokens: nothing is proven"
    expected = [
        (
            min(round(o["timestamp"][0], 2), duration),
            min(round(o["timestamp"][1], 2), duration),
            o["text"].strip(),
        )
        for o in offsets(reference, ids, monkeypatch)
    ]
    assert result.segments is not None
    got = [(s.start, s.end, s.text) for s in result.segments]
    # transformers' rule keeps only closed segments; text the token limit cut after the last
    # timestamp is one more segment here, so that the segments hold the whole text
    assert got[: len(expected)] == expected
    assert len(got) >= 2
    text_ids = [t for t in ids if t < reference.tokenizer.eos_token_id]
    assert [t for s in result.segments for t in s.tokens] == text_ids
    assert all(s.start <= s.end <= duration for s in result.segments)
    # subtitles get the same cues
    srt = client(live).audio.transcriptions.create(
        model="tiny",
        file=("a.wav", wav),
        response_format="srt",
        timestamp_granularities=["segment"],
    )
    assert str(srt).count(" --> ") == len(result.segments)
    # without `segment` named, decoding is as before: <|notimestamps|>, one segment per window
    plain = client(live).audio.transcriptions.create(
        model="tiny", file=("a.wav", wav), response_format="verbose_json"
    )
    assert plain.segments is not None
    assert len(plain.segments) == 1
    _, tokens = reference.generate(wav, task="transcribe")
    assert plain.segments[0].tokens == tokens


def test_long_audio_counts_each_windows_times_from_its_start(
    server: tuple[LiveServer, Reference],
) -> None:
    live, _ = server
    speech = clip("turn on the lights", 0)
    gap = np.zeros(24 * RATE, np.float32)  # the windows (at most 20 s) split at the gap
    audio = np.concatenate([speech, gap, clip("three four five", 1)])
    result = client(live).audio.transcriptions.create(
        model="tiny",
        file=("a.wav", encode(audio, RATE, "WAV", "PCM_16")),
        response_format="verbose_json",
        timestamp_granularities=["segment"],
    )
    assert result.segments is not None
    seeks = sorted({s.seek for s in result.segments})
    assert len(seeks) == 2, seeks  # two windows
    later = seeks[1] / 100
    assert later > 20  # the second window starts after the gap
    for segment in result.segments:
        window = segment.seek / 100
        assert window <= segment.start <= segment.end <= len(audio) / RATE
    # the second window's segments are timed after its start, never from the file's start
    assert min(s.start for s in result.segments if s.seek == seeks[1]) >= later
