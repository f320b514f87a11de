"""Cut long audio into windows a speech encoder-decoder can take, at pauses.

An encoder-decoder sees a bounded window (wav2vec2's attention is quadratic in length; the
decoder has a maximum length; Whisper takes 30 s), so a long recording is transcribed window by
window. Where the cuts fall decides the quality: a cut inside a word loses it on both sides.

`plan_windows` finds the stretches of speech first (frame energy against a noise floor estimated
from the file itself), so every pause of at least `min_pause` seconds separates two windows and
each window's speech bounds give its segment's timestamps. A stretch of speech longer than
`max_window` seconds (no pause long enough) is cut at the quietest point of the last
`search` seconds before the limit, as vLLM cuts long audio: the lowest-energy spot near the
boundary is usually a pause between words.

Pure numpy, no copies of the audio: windows are sample ranges into the caller's array.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = ["Window", "frame_levels", "plan_windows"]

FRAME_SECONDS: Final = 0.02
ABSOLUTE_FLOOR_DB: Final = -50.0  # quieter than this is never speech
NOISE_MARGIN_DB: Final = 12.0  # speech stands this far above the file's noise floor
MIN_SPEECH_SECONDS: Final = 0.1  # shorter bursts are clicks
PAD_BEFORE: Final = 0.3  # context kept before the first speech frame (soft onsets)
PAD_AFTER: Final = 0.3  # and after the last (quiet word endings)
QUIET_SPAN: Final = 0.16  # a cut goes in the middle of the quietest span this long


@dataclass(frozen=True)
class Window:
    """One window: samples `[start, end)` of the audio to transcribe, and where its speech is.

    `speech_start`/`speech_end` (samples) bound the voiced part; they become the segment's
    timestamps. For a window cut out of continuous speech they equal the cut points.
    """

    start: int
    end: int
    speech_start: int
    speech_end: int


def frame_levels(audio: npt.NDArray[np.float32], frame: int) -> npt.NDArray[np.float64]:
    """RMS level of each whole frame of `frame` samples, in dBFS (digital silence: -100)."""
    count = len(audio) // frame
    if count == 0:
        return np.zeros(0)
    frames = audio[: count * frame].reshape(count, frame)
    power = np.einsum("ij,ij->i", frames, frames, dtype=np.float64) / frame
    return np.asarray(10 * np.log10(np.maximum(power, 1e-10)))


def plan_windows(
    audio: npt.NDArray[np.float32],
    rate: int,
    *,
    max_window: float,
    min_pause: float = 0.3,
    search: float = 5.0,
    speech: npt.NDArray[np.bool_] | None = None,
) -> list[Window]:
    """Windows covering every stretch of speech in `audio`, each at most `max_window` seconds.

    Silence-only audio gives no windows. Windows never overlap and come in time order.
    `speech`, if given, says which FRAME_SECONDS frames are speech (from another voice-activity
    detector, e.g. `service.streaming.vad.silero_speech_frames`) instead of the energy rule;
    cuts inside long speech still go at the quietest frames.
    """
    if max_window <= 0 or min_pause <= 0 or search <= 0:
        raise ValueError("max_window, min_pause and search must be positive")
    frame = max(1, round(rate * FRAME_SECONDS))
    levels = frame_levels(audio, frame)
    if levels.size == 0:
        return []
    if speech is None:
        speech = _speech_frames(levels)
    elif len(speech) != len(levels):
        raise ValueError(f"speech has {len(speech)} frames; the audio has {len(levels)}")
    min_gap = round(min_pause / FRAME_SECONDS)
    regions = _regions(speech, min_gap, round(MIN_SPEECH_SECONDS / FRAME_SECONDS))
    limit = int(max_window * rate)
    pad_before, pad_after = int(PAD_BEFORE * rate), int(PAD_AFTER * rate)
    windows: list[Window] = []
    for index, (first, last) in enumerate(regions):
        lo = first * frame
        hi = min(len(audio), (last + 1) * frame)
        # padding stops halfway to the neighbouring stretches of speech
        prev_hi = regions[index - 1][1] * frame + frame if index else 0
        next_lo = regions[index + 1][0] * frame if index + 1 < len(regions) else len(audio)
        start = max(lo - pad_before, (prev_hi + lo) // 2, 0)
        end = min(hi + pad_after, (hi + next_lo) // 2, len(audio))
        windows.extend(_split(levels, frame, rate, start, end, lo, hi, limit, search))
    return windows


def _speech_frames(levels: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Frames loud enough to be speech: above the absolute floor and the file's noise floor.

    The noise floor is a low percentile of the frame levels: a recording of speech has pauses,
    and the quietest tenth of its frames is the room, not the talker.
    """
    floor = float(np.percentile(levels, 10))
    return np.asarray(levels > max(ABSOLUTE_FLOOR_DB, floor + NOISE_MARGIN_DB))


def _regions(speech: npt.NDArray[np.bool_], min_gap: int, min_length: int) -> list[tuple[int, int]]:
    """(first, last) frame of each run of speech; gaps shorter than `min_gap` frames are
    bridged, and runs shorter than `min_length` frames dropped."""
    padded = np.concatenate([[False], speech, [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    runs = [(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2], strict=True)]
    merged: list[tuple[int, int]] = []
    for first, last in runs:
        if merged and first - merged[-1][1] - 1 < min_gap:
            merged[-1] = (merged[-1][0], last)
        else:
            merged.append((first, last))
    return [(a, b) for a, b in merged if b - a + 1 >= min_length]


def _split(
    levels: npt.NDArray[np.float64],
    frame: int,
    rate: int,
    start: int,
    end: int,
    lo: int,
    hi: int,
    limit: int,
    search: float,
) -> list[Window]:
    """Cut [start, end) into windows of at most `limit` samples at the quietest frames."""
    windows = []
    span = max(1, round(QUIET_SPAN / FRAME_SECONDS))
    # mean level of each run of `span` frames: a pause between words is quiet for longer than
    # the closure of a stop consonant inside a word, which a single-frame minimum could pick
    smooth = np.convolve(levels, np.ones(span) / span, mode="valid")
    while end - start > limit:
        # the quietest span that lies in the last `search` seconds before the limit
        first = max(start + int(limit - search * rate), start + frame) // frame
        last = (start + limit) // frame - span
        if last < first or last >= len(smooth):
            cut = start + limit
        else:
            quietest = first + int(np.argmin(smooth[first : last + 1]))
            cut = (quietest * frame) + (span * frame) // 2
        windows.append(Window(start, cut, max(lo, start), min(hi, cut)))
        start = lo = cut
    windows.append(Window(start, end, max(lo, start), min(hi, end)))
    return windows
