"""Silero VAD behind the endpointer, measured against speech with known boundaries (the
functions of `bench.vad`), and as the long-audio windowing's speech finder."""

import numpy as np
import pytest

from bench.vad import RATE, Speech, build_speech, false_triggers, mix, score, utterances, white
from service.streaming.endpoint import Endpointer
from service.streaming.vad import (
    SileroDetector,
    make_endpointer,
    plan_speech_windows,
    silero_probabilities,
)


@pytest.fixture(scope="module")
def speech() -> Speech:
    return build_speech(6)


def test_silero_finds_each_phrase_on_time_clean_and_in_loud_noise(speech: Speech) -> None:
    noisy = mix(speech, white(len(speech.audio) / RATE, -20, np.random.default_rng(0)), 5)
    for audio in (speech.audio, noisy):
        silero = score(speech, utterances("silero", audio))
        assert silero.found == silero.phrases == 6
        assert silero.extra == 0
        # starts within 150 ms, ends within 200 ms of the true bounds (32 ms frames, hysteresis)
        assert max(np.abs(silero.start_errors)) <= 0.15, silero.start_errors
        assert max(np.abs(silero.end_errors)) <= 0.2, silero.end_errors
    # side by side at 5 dB SNR the energy rule loses the phrases in the noise floor
    assert score(speech, utterances("energy", noisy)).found < 6


def test_silero_opens_nothing_on_silence_noise_or_hum() -> None:
    triggers = false_triggers("silero", 6.0, seed=1)
    assert len(triggers) == 8  # silence, white noise -60..-20 dBFS, babble-like, hum
    assert triggers == dict.fromkeys(triggers, 0), triggers


def test_results_do_not_depend_on_chunking(speech: Speech) -> None:
    def run(chunk: int) -> list[tuple[float, float]]:
        endpointer = make_endpointer("silero", RATE, silence_ms=500)
        found = []
        for i in range(0, len(speech.audio), chunk):
            found += [(u.start, u.end) for u in endpointer.feed(speech.audio[i : i + chunk])]
        return found

    assert run(320) == run(7_777) == run(len(speech.audio))
    assert len(run(320)) == 6


def test_streaming_and_batched_probabilities_agree(speech: Speech) -> None:
    detector = SileroDetector(RATE)
    frames = speech.audio[: len(speech.audio) // 512 * 512].reshape(-1, 512)
    detector.classify(frames)
    batched = silero_probabilities(speech.audio, RATE, lanes=4)
    assert len(batched) == len(frames)
    # lanes start from the 0.5 s before them, not from the stream's start: close, not equal
    assert np.mean(np.abs(batched - np.array(detector.probabilities)) < 0.05) > 0.98


def test_clear_drops_the_open_utterance(speech: Speech) -> None:
    endpointer = make_endpointer("silero", RATE, silence_ms=500)
    first_end = int(speech.bounds[0][1] * RATE) - RATE // 4  # inside the first phrase
    assert endpointer.feed(speech.audio[:first_end]) == []
    assert endpointer.in_speech
    endpointer.clear()
    assert not endpointer.in_speech
    assert endpointer.samples_seen == first_end  # time goes on
    rest = endpointer.feed(speech.audio[first_end:])
    # what is left of the first phrase is heard afresh, then every later phrase
    assert rest[0].start >= first_end / RATE
    assert len(rest) == len(speech.bounds)
    for utterance, (start, _) in zip(rest[1:], speech.bounds[1:], strict=True):
        assert abs(utterance.start - start) <= 0.15


def test_silero_needs_8_or_16_khz() -> None:
    with pytest.raises(ValueError, match="8 or 16 kHz"):
        SileroDetector(22_050)
    assert isinstance(make_endpointer("energy", 22_050), Endpointer)


def test_long_audio_windows_follow_speech_found_by_silero(speech: Speech) -> None:
    noisy = mix(speech, white(len(speech.audio) / RATE, -20, np.random.default_rng(2)), 10)
    for vad in ("silero", "energy"):
        windows = plan_speech_windows(noisy, RATE, max_window=4.0, vad=vad)  # type: ignore[arg-type]
        covered = sum(
            any(
                w.speech_start / RATE <= a + 0.15 and w.speech_end / RATE >= b - 0.2
                for w in windows
            )
            for a, b in speech.bounds
        )
        if vad == "silero":
            assert covered == 6
            assert len(windows) == 6  # one per phrase: the pauses separate them
        else:
            assert covered < 6  # at 10 dB SNR the file's noise floor hides the speech
