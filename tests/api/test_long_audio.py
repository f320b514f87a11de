"""Long uploads: cut at pauses, windows batched as one request, segments with timestamps,
subtitles that parse back, segment events when streamed."""

import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import srt
import webvtt

from service.api.app import create_app
from service.settings import Settings
from tests.conftest import LiveServer, encode, speak

RATE = 22_050
TRANSCRIBE = "/v1/audio/transcriptions"
PHRASES = (
    "turn on the lights",
    "three four five",
    "open the garage",
    "seven eight nine",
    "call mom",
    "play the radio",
    "two zero one six",
    "set a timer for five minutes",
)


@dataclass
class Recording:
    audio: np.ndarray
    bounds: list[tuple[float, float]]  # where each utterance's voice starts and ends (s)
    utterances: list[np.ndarray]


def record(seconds: float, seed: int = 0) -> Recording:
    """Spoken phrases separated by pauses of 0.8-2 s, until `seconds` of audio."""
    rng = np.random.default_rng(seed)
    voices = {p: speak(p) for p in PHRASES}
    parts, bounds, utterances, at = [], [], [], 0
    while at < seconds * RATE:
        voice = voices[PHRASES[len(bounds) % len(PHRASES)]]
        loud = np.flatnonzero(np.abs(voice) > 1e-3)
        bounds.append(((at + loud[0]) / RATE, (at + loud[-1]) / RATE))
        utterances.append(voice)
        pause = np.zeros(int(rng.uniform(0.8, 2.0) * RATE), np.float32)
        parts += [voice, pause]
        at += len(voice) + len(pause)
    return Recording(np.concatenate(parts), bounds, utterances)


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer(create_app(Settings(max_window_seconds=20))) as live:
        yield live


@pytest.fixture(scope="module")
def three_minutes() -> Recording:
    return record(180)


def post(server: LiveServer, audio: np.ndarray, **data: str) -> httpx.Response:
    response = httpx.post(
        server.url + TRANSCRIBE,
        files={"file": ("long.wav", encode(audio, RATE))},
        data=data,
        timeout=300,
    )
    assert response.status_code == 200, response.text
    return response


def alone(server: LiveServer, voice: np.ndarray) -> str:
    """One utterance uploaded on its own, with half a second of quiet around it."""
    quiet = np.zeros(RATE // 2, np.float32)
    return str(post(server, np.concatenate([quiet, voice, quiet])).json()["text"])


def test_three_minutes_give_one_segment_per_utterance(
    server: LiveServer, three_minutes: Recording
) -> None:
    verbose = post(server, three_minutes.audio, response_format="verbose_json").json()
    segments = verbose["segments"]
    assert verbose["duration"] == pytest.approx(len(three_minutes.audio) / RATE, abs=0.01)
    assert len(segments) == len(three_minutes.bounds) > 60
    for segment, (start, end) in zip(segments, three_minutes.bounds, strict=True):
        assert abs(segment["start"] - start) <= 0.5
        assert abs(segment["end"] - end) <= 0.5
    expected = [alone(server, voice) for voice in three_minutes.utterances]
    # each segment as its utterance uploaded alone, for >= 95% of them (issue 21's agreement
    # target: the second-edition bundled model still depends a little on the silence around
    # speech; the first edition agreed on all of these)
    same = sum(s["text"] == e for s, e in zip(segments, expected, strict=True))
    assert same >= 0.95 * len(expected), [
        (s["text"], e) for s, e in zip(segments, expected, strict=True) if s["text"] != e
    ]
    assert verbose["text"] == " ".join(s["text"] for s in segments)
    assert post(server, three_minutes.audio).json()["text"] == verbose["text"]


def test_subtitles_parse_back_to_the_segments(server: LiveServer) -> None:
    recording = record(45, seed=1)
    segments = post(server, recording.audio, response_format="verbose_json").json()["segments"]
    cues = list(srt.parse(post(server, recording.audio, response_format="srt").text))
    assert [c.content for c in cues] == [s["text"] for s in segments]
    assert [c.index for c in cues] == list(range(1, len(segments) + 1))
    for cue, segment in zip(cues, segments, strict=True):
        assert cue.start.total_seconds() == pytest.approx(segment["start"], abs=0.001)
        assert cue.end.total_seconds() == pytest.approx(segment["end"], abs=0.001)
    vtt = post(server, recording.audio, response_format="vtt").text
    captions = webvtt.from_string(vtt, strict=True).captions  # type: ignore[call-arg]
    assert [c.text for c in captions] == [s["text"] for s in segments]
    assert [c.start_in_seconds for c in captions] == [int(s["start"]) for s in segments]


def test_streamed_long_audio_sends_segments_in_order(server: LiveServer) -> None:
    recording = record(60, seed=2)
    plain = post(server, recording.audio, response_format="verbose_json").json()
    with httpx.stream(
        "POST",
        server.url + TRANSCRIBE,
        files={"file": ("long.wav", encode(recording.audio, RATE))},
        data={"stream": "true"},
        timeout=300,
    ) as response:
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.iter_lines() if line]
    segments = [e for e in events if e["type"] == "transcript.text.segment"]
    assert [s["text"] for s in segments] == [s["text"] for s in plain["segments"]]
    assert [s["start"] for s in segments] == [s["start"] for s in plain["segments"]]
    deltas = "".join(e["delta"] for e in events if e["type"] == "transcript.text.delta")
    assert deltas == plain["text"]
    assert events[-1]["type"] == "transcript.text.done"
    assert events[-1]["text"] == plain["text"]
    assert events[-1]["usage"]["output_tokens"] == sum(len(s["tokens"]) for s in plain["segments"])


def test_silence_only_long_audio_is_an_empty_transcript(server: LiveServer) -> None:
    quiet = np.random.default_rng(0).normal(0, 1e-4, 30 * RATE).astype(np.float32)
    verbose = post(server, quiet, response_format="verbose_json").json()
    assert verbose["text"] == ""
    assert verbose["segments"] == []
