"""The endpointer on synthetic speech-like bursts (known boundaries) and on espeak-ng speech."""

import itertools
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from service.streaming.endpoint import TAIL_MS, Endpointer, Utterance

SR = 16_000
PRE_ROLL = 300 * SR // 1000
TAIL = TAIL_MS * SR // 1000


def syllables(n: int, rng: np.random.Generator, level_db: float = -15.0) -> np.ndarray:
    """`n` samples of speech-like sound: voiced syllables of 180-320 ms (a gliding 130 Hz
    harmonic tone, its level wavering by +-3 dB at 6 Hz, with 10 ms attack and release)
    separated by 30-80 ms gaps of silence. It starts and ends with a syllable, so its first and
    last samples are the truth."""
    t = np.arange(n) / SR
    phase = 2 * np.pi * np.cumsum(130 + 25 * np.sin(2 * np.pi * 0.5 * t)) / SR
    tone = sum(np.sin(k * phase) / k for k in range(1, 8))
    tone /= np.sqrt(np.mean(tone**2))
    out = np.zeros(n)
    i = 0
    while i < n:
        length = int(rng.uniform(0.18, 0.32) * SR)
        if n - (i + length) < 0.25 * SR:  # too little room for another: fill to the end
            length = n - i
        env = 1 + 0.35 * np.sin(2 * np.pi * 6 * np.arange(length) / SR + rng.uniform(0, 6.3))
        ramp = min(SR // 100, length // 2)
        env[:ramp] *= np.linspace(0, 1, ramp)
        env[length - ramp :] *= np.linspace(1, 0, ramp)
        out[i : i + length] = tone[i : i + length] * env * rng.uniform(0.7, 1.0)
        i += length + int(rng.uniform(0.03, 0.08) * SR)
    return (out * 10 ** (level_db / 20) / 0.8).astype(np.float32)


def hiss(n: int, rng: np.random.Generator, level_db: float = -40.0) -> np.ndarray:
    return rng.normal(0, 10 ** (level_db / 20), n).astype(np.float32)


def compose(
    spans: list[tuple[float, float]], seconds: float, rng: np.random.Generator
) -> np.ndarray:
    """Silence of `seconds` with speech-like bursts over the (start, end) spans."""
    x = np.zeros(int(seconds * SR), np.float32)
    for a, b in spans:
        x[int(a * SR) : int(b * SR)] = syllables(int(b * SR) - int(a * SR), rng)
    return x


def run(ep: Endpointer, x: np.ndarray, chunk: int | None = None) -> list[Utterance]:
    """Feed `x` in chunks of `chunk` samples (whole if None), then flush."""
    size = chunk or max(1, x.size)
    out = [u for i in range(0, x.size, size) for u in ep.feed(x[i : i + size])]
    last = ep.flush()
    return [*out, last] if last is not None else out


SPANS = [(0.5, 1.2), (2.5, 4.0), (5.0, 5.35), (6.5, 8.0)]


@pytest.mark.parametrize("hiss_db", [None, -40.0])
def test_bursts_are_found_within_50_ms(hiss_db: float | None) -> None:
    rng = np.random.default_rng(0)
    x = compose(SPANS, 10.0, rng)
    if hiss_db is not None:
        x += hiss(x.size, rng, hiss_db)
    utterances = run(Endpointer(SR), x)
    assert [u.reason for u in utterances] == ["silence"] * len(SPANS)
    for u, (a, b) in zip(utterances, SPANS, strict=True):
        assert abs(u.start - a) <= 0.05
        assert abs(u.end - b) <= 0.05
        # audio: the full pre-roll before the first speech frame, the tail after the last one
        first, last = round(u.start * SR), round(u.end * SR)
        assert u.audio.dtype == np.float32
        np.testing.assert_array_equal(u.audio, x[first - PRE_ROLL : last + TAIL])


@pytest.mark.parametrize("hiss_db", [None, -40.0])
def test_a_60_ms_click_is_ignored_but_a_200_ms_burst_is_not(hiss_db: float | None) -> None:
    rng = np.random.default_rng(1)
    x = np.zeros(4 * SR, np.float32)
    x[SR : SR + 60 * SR // 1000] = rng.normal(0, 0.3, 60 * SR // 1000)  # a loud 60 ms click
    x[int(2.5 * SR) : int(2.7 * SR)] = syllables(int(0.2 * SR), rng)
    if hiss_db is not None:
        x += hiss(x.size, rng, hiss_db)
    utterances = run(Endpointer(SR), x)
    assert len(utterances) == 1
    assert abs(utterances[0].start - 2.5) <= 0.05


def test_max_length_cuts_a_long_burst_into_contiguous_pieces() -> None:
    rng = np.random.default_rng(2)
    x = compose([(1.0, 8.0)], 9.5, rng) + hiss(int(9.5 * SR), rng)
    utterances = run(Endpointer(SR, max_utterance_seconds=3.0), x)
    assert [u.reason for u in utterances] == ["max_length", "max_length", "silence"]
    assert all(u.audio.size <= 3 * SR for u in utterances)
    assert abs(utterances[0].start - 1.0) <= 0.05
    assert abs(utterances[-1].end - 8.0) <= 0.05
    for before, after in itertools.pairwise(utterances):
        assert before.end <= after.start <= before.end + 0.1  # a cut may fall in a short gap
    # no audio is lost or repeated at a cut: the pieces' audio is the stream's
    first = round(utterances[0].start * SR) - PRE_ROLL
    joined = np.concatenate([u.audio for u in utterances])
    np.testing.assert_array_equal(joined, x[first : first + joined.size])


def test_chunking_does_not_change_anything() -> None:
    rng = np.random.default_rng(3)
    x = compose([(0.4, 1.5), (2.3, 3.6)], 3.9, rng) + hiss(int(3.9 * SR), rng)
    reference = run(Endpointer(SR, max_utterance_seconds=1.0), x)
    assert [u.reason for u in reference] == ["max_length", "silence", "max_length", "end_of_stream"]
    for chunk in (1, 333, 4096):
        other = run(Endpointer(SR, max_utterance_seconds=1.0), x, chunk)
        assert [(u.start, u.end, u.reason) for u in other] == [
            (u.start, u.end, u.reason) for u in reference
        ]
        for a, b in zip(other, reference, strict=True):
            np.testing.assert_array_equal(a.audio, b.audio)


def test_memory_stays_bounded_over_ten_minutes() -> None:
    """Ten minutes of bursts (some longer than max_utterance_seconds) and pauses over hiss, fed
    in random chunk sizes: the buffer is allocated once and never holds more than the bound,
    and every burst is still found."""
    rng = np.random.default_rng(4)
    max_seconds = 5.0
    ep = Endpointer(SR, max_utterance_seconds=max_seconds)
    buffer = ep._buf
    bound = int(max_seconds * SR) + PRE_ROLL
    truth: list[tuple[float, float]] = []
    found: list[Utterance] = []

    def stream() -> Iterator[np.ndarray]:
        t = 0
        while t < 600 * SR:
            pause = int(rng.uniform(0.7, 4.0) * SR)
            burst = int(rng.uniform(0.3, 12.0) * SR)
            truth.append(((t + pause) / SR, (t + pause + burst) / SR))
            x = np.concatenate([np.zeros(pause, np.float32), syllables(burst, rng)])
            yield x + hiss(x.size, rng)
            t += x.size
        yield hiss(SR, rng)

    for x in stream():
        i = 0
        while i < x.size:
            n = int(rng.integers(1, 8000))
            found.extend(ep.feed(x[i : i + n]))
            i += n
            assert ep._buf is buffer
            assert buffer.size <= bound
            assert ep._buf_len <= bound
            assert len(ep._sorted_levels) <= 3 * SR // 320  # three seconds of frame levels
            assert ep.open_audio.size <= max_seconds * SR
    assert ep.samples_seen >= 600 * SR
    assert all(u.audio.size <= max_seconds * SR for u in found)
    assert ep.flush() is None
    for a, b in truth:  # each burst found; a burst's last piece may end at a max_length cut
        assert min(abs(u.start - a) for u in found) <= 0.05
        assert min(abs(u.end - b) for u in found) <= 0.05
    for u in found:  # and nothing else
        assert any(a - 0.05 <= u.start and u.end <= b + 0.05 for a, b in truth)


@pytest.mark.filterwarnings("error")
def test_digital_silence_steady_noise_and_a_pure_tone_are_not_speech() -> None:
    rng = np.random.default_rng(5)
    zeros = np.zeros(3 * SR, np.float32)
    assert run(Endpointer(SR), zeros) == []
    # a hiss switched on after silence, with one- and two-frame dropouts (lost packets)
    noise = np.concatenate([zeros, hiss(10 * SR, rng)])
    noise[6 * SR : 6 * SR + 320] = 0
    noise[8 * SR : 8 * SR + 640] = 0
    assert run(Endpointer(SR), noise) == []
    t = np.arange(10 * SR) / SR
    tone = np.concatenate([zeros, (0.1 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)])
    assert run(Endpointer(SR), tone) == []


def test_state_while_an_utterance_is_open_and_flush() -> None:
    rng = np.random.default_rng(6)
    x = compose([(1.0, 2.0)], 2.0, rng)  # the stream ends mid-speech
    ep = Endpointer(SR)
    assert ep.feed(x[: SR // 2]) == []
    assert not ep.in_speech
    assert ep.open_start is None
    assert ep.open_audio.size == 0
    assert ep.feed(x[SR // 2 : int(1.5 * SR) + 7]) == []
    assert ep.in_speech
    assert ep.open_start is not None
    assert abs(ep.open_start - 1.0) <= 0.05
    assert ep.samples_seen == int(1.5 * SR) + 7
    open_audio = ep.open_audio
    start = round(ep.open_start * SR)
    np.testing.assert_array_equal(open_audio, x[start - PRE_ROLL : int(1.5 * SR)])
    assert ep.feed(x[int(1.5 * SR) + 7 :]) == []
    last = ep.flush()
    assert last is not None
    assert last.reason == "end_of_stream"
    assert abs(last.end - 2.0) <= 0.05
    np.testing.assert_array_equal(last.audio, x[start - PRE_ROLL :])
    assert not ep.in_speech
    assert ep.flush() is None
    # the stream may go on after a flush, its clock running on
    y = compose([(0.5, 1.5)], 2.5, rng)
    later = run(ep, y)
    assert len(later) == 1
    assert abs(later[0].start - 2.5) <= 0.05


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="positive"):
        Endpointer(0)
    with pytest.raises(ValueError, match="positive"):
        Endpointer(SR, silence_ms=0)
    with pytest.raises(ValueError, match="pre_roll_ms"):
        Endpointer(SR, pre_roll_ms=-1)
    with pytest.raises(ValueError, match="max_utterance_seconds"):
        Endpointer(SR, max_utterance_seconds=0.4)
    ep = Endpointer(SR)
    with pytest.raises(ValueError, match="1-D"):
        ep.feed(np.zeros((320, 2), np.float32))
    with pytest.raises(ValueError, match="finite"):
        ep.feed(np.full(10, np.nan, np.float32))


# --------------------------------------------------------------------------- real speech


def espeak(text: str, tmp_path: Path) -> np.ndarray:
    """espeak-ng speech resampled from its 22.05 kHz to 16 kHz."""
    out = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(out), "-s", "160", text], check=True)
    audio, rate = sf.read(out, dtype="float32")
    return np.asarray(soxr.resample(audio, rate, SR), np.float32)


def speech_bounds(x: np.ndarray) -> tuple[float, float]:
    """First and last sample of `x` louder than 1e-3, in seconds."""
    loud = np.flatnonzero(np.abs(x) > 1e-3)
    return loud[0] / SR, (loud[-1] + 1) / SR


def test_two_spoken_commands_are_two_utterances(tmp_path: Path) -> None:
    first = espeak("turn on the lights", tmp_path)
    second = espeak("play some music in the kitchen", tmp_path)
    gap = np.zeros(SR, np.float32)
    x = np.concatenate([first, gap, second, gap])
    offset = (first.size + gap.size) / SR
    truth = [speech_bounds(first), tuple(t + offset for t in speech_bounds(second))]
    utterances = run(Endpointer(SR), x)
    assert [u.reason for u in utterances] == ["silence", "silence"]
    for u, (a, b) in zip(utterances, truth, strict=True):
        assert abs(u.start - a) <= 0.15
        assert abs(u.end - b) <= 0.15


def test_speech_at_the_very_start_of_the_stream(tmp_path: Path) -> None:
    speech = espeak("turn on the lights", tmp_path)
    a, b = speech_bounds(speech)
    speech = speech[round(a * SR) :]
    utterances = run(Endpointer(SR), np.concatenate([speech, np.zeros(SR, np.float32)]))
    assert len(utterances) == 1
    assert utterances[0].start <= 0.05
    assert abs(utterances[0].end - (b - a)) <= 0.15
