"""Long uploads cut into windows at the speech Silero finds (`STT_LONG_AUDIO_VAD=silero`)."""

from pathlib import Path

import httpx
import numpy as np

from bench.vad import RATE, build_speech, mix, white
from service.api.app import create_app
from tests.conftest import LiveServer, encode, settings_for


def test_silero_windows_follow_the_phrases_in_a_noisy_upload(checkpoints: dict[str, Path]) -> None:
    speech = build_speech(6)
    noisy = mix(speech, white(len(speech.audio) / RATE, -20, np.random.default_rng(3)), 10)
    settings = settings_for(
        checkpoints["wav2vec2-bert"], long_audio_vad="silero", max_window_seconds=4
    )
    with LiveServer(create_app(settings)) as server:
        response = httpx.post(
            server.url + "/v1/audio/transcriptions",
            files={"file": ("a.wav", encode(noisy, RATE))},
            data={"response_format": "verbose_json"},
            timeout=120,
        )
    assert response.status_code == 200, response.text
    segments = response.json()["segments"]
    assert len(segments) == len(speech.bounds) == 6  # one window per phrase, none on the noise
    for segment, (start, end) in zip(segments, speech.bounds, strict=True):
        assert abs(segment["start"] - start) <= 0.15
        assert abs(segment["end"] - end) <= 0.2
