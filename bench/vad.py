"""Measure the two voice-activity detectors side by side: energy vs Silero, in the endpointer.

    python -m bench.vad                  # the full table
    python -m bench.vad --phrases 4      # quicker

Speech with known boundaries: espeak-ng phrases (the bundled model's domain, four voices),
each followed by 1.2 s of silence, at 16 kHz; a phrase's true start and end are its first and
last samples louder than 1e-3. The same speech is measured clean and mixed with white noise and
with babble-like noise (white noise shaped by a 4 Hz envelope, as speech is) at several
signal-to-noise ratios. For each detector and condition: how many phrases were found (an
utterance overlapping the phrase), extra utterances, and the start and end errors of the found
ones (utterance start/end minus the true bounds; negative is early).

False triggers: utterances opened on 20 s of audio with no speech at all: digital silence,
white noise at -60 to -20 dBFS, babble-like noise, and a 50 Hz hum with harmonics.

Both detectors run with the service's settings (silence 500 ms, pre-roll 300 ms; energy
threshold -50 dBFS, Silero threshold 0.5); the result does not depend on how audio is chunked.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import soxr

from bench.common import speak
from service.streaming.vad import make_endpointer, release

RATE = 16_000
PAUSE = 1.2
PHRASES = (
    "turn on the lights",
    "three four five",
    "set a timer for five minutes",
    "open the garage",
    "call mom",
    "seven eight nine",
    "play the radio",
    "two zero one six",
)
VOICES = ("en-us", "en", "en-us+f3", "en+m3")
SNRS = (20, 10, 5)
NOISE_LEVELS_DB = (-60, -40, -30, -20)


@dataclass(frozen=True)
class Speech:
    audio: npt.NDArray[np.float32]
    bounds: list[tuple[float, float]]


@dataclass(frozen=True)
class Score:
    found: int
    phrases: int
    extra: int
    start_errors: list[float]
    end_errors: list[float]

    def row(self, kind: str, condition: str) -> str:
        s, e = np.abs(self.start_errors), np.abs(self.end_errors)

        def stat(x: npt.NDArray[np.float64], q: float) -> str:
            return f"{np.percentile(x, q) * 1000:.0f}" if len(x) else "-"

        bias_s = f"{np.mean(self.start_errors) * 1000:+.0f}" if self.start_errors else "-"
        bias_e = f"{np.mean(self.end_errors) * 1000:+.0f}" if self.end_errors else "-"
        return (
            f"| {condition} | {kind} | {self.found}/{self.phrases} | {self.extra} "
            f"| {stat(s, 50)} | {stat(s, 95)} | {bias_s} | {stat(e, 50)} | {stat(e, 95)} "
            f"| {bias_e} |"
        )


def build_speech(count: int, seed: int = 0) -> Speech:
    """`count` phrases in turn, voices rotating, each then PAUSE s of silence."""
    parts = [np.zeros(int(0.5 * RATE), np.float32)]
    at = len(parts[0])
    bounds = []
    for i in range(count):
        voice = speak(PHRASES[i % len(PHRASES)], voice=VOICES[i % len(VOICES)])
        voice = soxr.resample(voice, 22_050, RATE).astype(np.float32)
        loud = np.flatnonzero(np.abs(voice) > 1e-3)
        bounds.append(((at + loud[0]) / RATE, (at + loud[-1]) / RATE))
        parts += [voice, np.zeros(int(PAUSE * RATE), np.float32)]
        at += len(voice) + int(PAUSE * RATE)
    return Speech(np.concatenate(parts), bounds)


def white(seconds: float, level_db: float, rng: np.random.Generator) -> npt.NDArray[np.float32]:
    return (rng.standard_normal(int(seconds * RATE)) * 10 ** (level_db / 20)).astype(np.float32)


def babble(seconds: float, level_db: float, rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """Noise with speech's rhythm: white noise, low-passed, under a random 4 Hz envelope."""
    n = int(seconds * RATE)
    noise = rng.standard_normal(n)
    kernel = np.ones(8) / 8  # a crude low-pass (speech's energy is low)
    noise = np.convolve(noise, kernel, mode="same")
    t = np.arange(n) / RATE
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6.28)) ** 2
    x = noise * envelope
    x *= 10 ** (level_db / 20) / (np.sqrt(np.mean(x**2)) + 1e-12)
    return x.astype(np.float32)


def hum(seconds: float, level_db: float) -> npt.NDArray[np.float32]:
    t = np.arange(int(seconds * RATE)) / RATE
    x = sum(np.sin(2 * np.pi * 50 * k * t) / k for k in (1, 2, 3, 5))
    x *= 10 ** (level_db / 20) / np.sqrt(np.mean(x**2))
    return np.asarray(x, np.float32)


def mix(speech: Speech, noise: npt.NDArray[np.float32], snr_db: float) -> npt.NDArray[np.float32]:
    """Speech plus noise scaled to `snr_db` against the speech's active level."""
    active = np.concatenate([speech.audio[int(a * RATE) : int(b * RATE)] for a, b in speech.bounds])
    gain = np.sqrt(np.mean(active**2)) / np.sqrt(np.mean(noise**2)) / 10 ** (snr_db / 20)
    return (speech.audio + gain * noise[: len(speech.audio)]).astype(np.float32)


def utterances(kind: str, audio: npt.NDArray[np.float32]) -> list[tuple[float, float]]:
    endpointer = make_endpointer(kind, RATE, silence_ms=500, pre_roll_ms=300)  # type: ignore[arg-type]
    found = []
    for i in range(0, len(audio), 320):  # 20 ms chunks, as a live client sends
        found += [(u.start, u.end) for u in endpointer.feed(audio[i : i + 320])]
    last = endpointer.flush()
    if last is not None:
        found.append((last.start, last.end))
    release(endpointer)
    return found


def score(speech: Speech, found: list[tuple[float, float]]) -> Score:
    matched = [False] * len(found)
    starts, ends = [], []
    hits = 0
    for a, b in speech.bounds:
        overlapping = [i for i, (s, e) in enumerate(found) if s < b and e > a]
        if not overlapping:
            continue
        hits += 1
        for i in overlapping:
            matched[i] = True
        starts.append(found[overlapping[0]][0] - a)
        ends.append(found[overlapping[-1]][1] - b)
    return Score(hits, len(speech.bounds), matched.count(False), starts, ends)


def false_triggers(kind: str, seconds: float, seed: int) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    conditions: dict[str, npt.NDArray[np.float32]] = {
        "digital silence": np.zeros(int(seconds * RATE), np.float32)
    }
    for level in NOISE_LEVELS_DB:
        conditions[f"white noise {level} dBFS"] = white(seconds, level, rng)
    for level in (-40, -30):
        conditions[f"babble-like noise {level} dBFS"] = babble(seconds, level, rng)
    conditions["50 Hz hum -30 dBFS"] = hum(seconds, -30)
    return {name: len(utterances(kind, audio)) for name, audio in conditions.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.vad", description=__doc__)
    parser.add_argument("--phrases", type=int, default=16)
    parser.add_argument("--noise-seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    speech = build_speech(args.phrases)
    rng = np.random.default_rng(args.seed)
    conditions = {"clean": speech.audio}
    for snr in SNRS:
        conditions[f"white noise SNR {snr} dB"] = mix(
            speech, white(len(speech.audio) / RATE, -20, rng), snr
        )
        conditions[f"babble-like SNR {snr} dB"] = mix(
            speech, babble(len(speech.audio) / RATE, -20, rng), snr
        )
    print(
        f"\n{args.phrases} phrases ({len(speech.audio) / RATE:.0f} s), 16 kHz, "
        "errors in ms (utterance minus true bound; negative: early)\n"
    )
    print(
        "| condition | detector | phrases found | extra | start abs p50 | start abs p95 "
        "| start mean | end abs p50 | end abs p95 | end mean |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    cost: dict[str, float] = {"energy": 0.0, "silero": 0.0}
    for name, audio in conditions.items():
        for kind in ("energy", "silero"):
            started = time.process_time()
            found = utterances(kind, audio)
            cost[kind] += time.process_time() - started
            print(score(speech, found).row(kind, name))
    audio_seconds = len(speech.audio) / RATE * len(conditions)
    print("\nFalse triggers (utterances opened) on audio with no speech:\n")
    print(f"| {args.noise_seconds:g} s of | energy | silero |")
    print("|---|---|---|")
    energy = false_triggers("energy", args.noise_seconds, args.seed)
    silero = false_triggers("silero", args.noise_seconds, args.seed)
    for name in energy:
        print(f"| {name} | {energy[name]} | {silero[name]} |")
    print(
        f"\nCPU per second of audio (one stream, 20 ms chunks): energy "
        f"{cost['energy'] / audio_seconds * 1000:.2f} ms, "
        f"silero {cost['silero'] / audio_seconds * 1000:.2f} ms"
    )


if __name__ == "__main__":
    main()
