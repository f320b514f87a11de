"""Where long audio is cut: at pauses, never inside a word when a pause is near."""

import numpy as np
import pytest
import soxr

from service.audio.windows import plan_windows
from tests.conftest import speak

RATE = 16_000
PHRASES = ("turn on the lights", "three four five", "open the garage", "set a timer")


def spoken(pauses: list[float]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Phrases separated by the given pauses; returns the audio and each phrase's samples."""
    parts, spans, at = [], [], 0
    for i, pause in enumerate(pauses):
        voice = soxr.resample(speak(PHRASES[i % len(PHRASES)]), 22_050, RATE).astype(np.float32)
        loud = np.flatnonzero(np.abs(voice) > 1e-3)
        spans.append((at + int(loud[0]), at + int(loud[-1])))
        parts += [voice, np.zeros(int(pause * RATE), np.float32)]
        at += len(voice) + int(pause * RATE)
    return np.concatenate(parts), spans


def test_pauses_separate_windows_with_speech_bounds() -> None:
    audio, spans = spoken([1.0, 0.6, 1.5, 0.5])
    windows = plan_windows(audio, RATE, max_window=20)
    assert len(windows) == len(spans)
    for window, (lo, hi) in zip(windows, spans, strict=True):
        assert abs(window.speech_start - lo) <= 0.05 * RATE
        assert abs(window.speech_end - hi) <= 0.05 * RATE
        assert window.start <= lo
        assert window.end >= hi
    starts = [w.start for w in windows]
    ends = [w.end for w in windows]
    assert starts == sorted(starts)
    assert all(e <= s for e, s in zip(ends, starts[1:], strict=False))  # no overlap


def test_continuous_speech_is_cut_in_a_pause_not_in_a_word() -> None:
    # 0.2 s pauses are too short to end a window, so the speech runs on for about a minute
    audio, spans = spoken([0.2] * 40)
    windows = plan_windows(audio, RATE, max_window=12, search=4)
    assert len(windows) >= len(audio) / RATE / 12
    assert all(w.end - w.start <= 12 * RATE for w in windows)
    cuts = [w.end for w in windows[:-1]]
    assert cuts == [w.start for w in windows[1:]]  # continuous speech: the windows abut
    for cut in cuts:
        inside = [(lo, hi) for lo, hi in spans if lo < cut < hi]
        assert not inside, f"cut at {cut / RATE:.2f} s falls inside a phrase {inside}"
    assert windows[0].speech_start <= spans[0][0]
    assert windows[-1].speech_end >= spans[-1][1] - 0.05 * RATE


def test_without_a_pause_the_cut_goes_to_the_quietest_spot() -> None:
    rng = np.random.default_rng(0)
    audio = rng.normal(0, 1e-4, 36 * RATE).astype(np.float32)  # a quiet room, 3 s each side
    audio[3 * RATE : 33 * RATE] = rng.normal(0, 0.3, 30 * RATE)  # 30 s without a pause
    dip = int(20.3 * RATE)
    audio[dip : dip + int(0.1 * RATE)] *= 0.05  # a quieter 100 ms inside the search range
    windows = plan_windows(audio, RATE, max_window=20, search=5)
    assert len(windows) == 2
    assert abs(windows[0].end - (dip + 0.05 * RATE)) <= 0.1 * RATE
    assert windows[0].speech_start == pytest.approx(3 * RATE, abs=0.03 * RATE)


def test_silence_and_clicks_give_no_windows() -> None:
    quiet = np.random.default_rng(1).normal(0, 1e-4, 20 * RATE).astype(np.float32)
    assert plan_windows(quiet, RATE, max_window=10) == []
    quiet[5 * RATE : 5 * RATE + 800] = 0.5  # a 50 ms click
    assert plan_windows(quiet, RATE, max_window=10) == []
    with pytest.raises(ValueError, match="positive"):
        plan_windows(quiet, RATE, max_window=0)
