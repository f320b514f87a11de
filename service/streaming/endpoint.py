"""Cut a live audio stream into utterances: an energy-based voice-activity endpointer.

The endpointer sees the stream in frames (20 ms by default). A frame is speech when its RMS
level is above both an absolute floor (`threshold_db`, in dBFS) and the noise floor plus
NOISE_MARGIN_DB, so a steady background hiss does not count as speech however loud it is. An
utterance starts after `min_speech_ms` of consecutive speech frames (a click is not an utterance)
and ends after `silence_ms` of consecutive non-speech frames, or when its audio reaches
`max_utterance_seconds`. The endpointer owns the open utterance's audio, from a short pre-roll
before the first speech frame (onsets quieter than the threshold are not clipped) to the end of
the last speech frame plus a short tail (nor are word endings).

The noise floor is the third-lowest frame level of the last three seconds, as in
minimum-statistics noise estimation (R. Martin, "Noise power spectral density estimation based on
optimal smoothing and minimum statistics", IEEE Trans. Speech and Audio Processing 9(5), 2001):
speech dips between words and at stop consonants many times in three seconds, so it never lifts
the floor to its own level, while a louder noise is learnt within three seconds. (The third-
lowest, not the lowest, so that one or two frames of zeros from a lost packet do not drop it.)
Two refinements make it work from the first frame and learn steady noise at once:

- For the first second, the window also holds a quiet-room prior (`threshold_db -
  NOISE_MARGIN_DB`), so speech at the very start of a stream is detected.
- A run of `min_speech_ms` of frames whose levels stay within STEADY_RANGE_DB of each other is
  noise, not speech (speech is never that steady): the floor is raised to it at once and the
  prior is dropped. A hiss present from the start, or switched on later, therefore never opens
  an utterance. The price: a sound as steady as hiss (a held pure tone) is taken for noise.

Memory is bounded: one buffer of `max_utterance_seconds` of audio, allocated once, holds the
open utterance, or between utterances the pre-roll, however long the stream runs. Everything is
counted in samples; times are seconds from the start of the stream.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass
from typing import Final, Literal, Protocol

import numpy as np
import numpy.typing as npt

__all__ = [
    "NOISE_MARGIN_DB",
    "STEADY_RANGE_DB",
    "TAIL_MS",
    "EndReason",
    "Endpointer",
    "SpeechDetector",
    "Utterance",
]

EndReason = Literal["silence", "max_length", "end_of_stream"]


class SpeechDetector(Protocol):
    """A frame classifier that replaces the energy rule (e.g. `service.streaming.vad`'s Silero).

    `frame_samples` is the frame length it needs at the endpointer's rate; `classify` takes
    consecutive frames of the stream (one per row) and says which are speech. It may keep state
    from frame to frame (a recurrent model does), so it sees every frame exactly once, in order.
    """

    frame_samples: int

    def classify(self, frames: npt.NDArray[np.float32]) -> list[bool]: ...

    def reset(self) -> None:
        """Forget the stream so far (the audio before this point is gone)."""


NOISE_MARGIN_DB: Final = 12.0
"""How far above the noise floor a frame must be to count as speech."""

STEADY_RANGE_DB: Final = 2.0
"""Frame levels that stay within this range for `min_speech_ms` are noise. The level of white
noise in 20 ms frames at 16 kHz has a standard deviation of 0.34 dB (4.34 * sqrt(2 / 320)), so
eight frames of it span about 1 dB; speech usually moves by several dB within 150 ms."""

TAIL_MS: Final = 150
"""Trailing audio kept after the last speech frame: word endings (a final "s" or "t") are often
quieter than the threshold, and the recogniser needs them."""

_NOISE_WINDOW_SECONDS: Final = 3.0
"""How far back the noise floor looks: long enough that fluent speech always has a few quiet
frames in it, short enough that a rising noise that is not steady is learnt within seconds."""

_PRIOR_SECONDS: Final = 1.0
"""How long the quiet-room prior stays in the noise window, unless steady noise displaces it."""

_NOISE_RANK: Final = 3
"""The floor is the third-lowest level in the window."""

_SILENT_DB: Final = -100.0
"""The level given to digital silence and anything quieter: all-zero frames have a finite level."""


@dataclass(frozen=True)
class Utterance:
    """One stretch of speech cut from the stream.

    `audio` (float32, mono, at the endpointer's rate) runs from up to `pre_roll_ms` before
    `start` (less at the start of the stream, and never back into the previous utterance's
    audio) to at most TAIL_MS after `end`; `start` is the start of the first speech frame and
    `end` the end of the last one, in seconds from the start of the stream.
    """

    audio: npt.NDArray[np.float32]
    start: float
    end: float
    reason: EndReason


class Endpointer:
    """Split one audio stream into utterances as it arrives; see the module docstring.

    Feed it float32 mono chunks of any size; it returns each utterance as soon as its end is
    known (`silence_ms` after its last speech frame). Results do not depend on how the stream is
    chunked. An utterance's audio never exceeds `max_utterance_seconds`; one that reaches it is
    cut (reason "max_length") and, if speech goes on, the next starts right there, so the pieces
    of a long utterance are contiguous and do not overlap.
    """

    def __init__(
        self,
        sample_rate: int,
        *,
        silence_ms: int = 600,
        min_speech_ms: int = 150,
        pre_roll_ms: int = 300,
        max_utterance_seconds: float = 15.0,
        frame_ms: int = 20,
        threshold_db: float = -50.0,
        detector: SpeechDetector | None = None,
        tail_ms: int = TAIL_MS,
    ) -> None:
        """Set up for a stream at `sample_rate` Hz.

        Args:
            silence_ms: non-speech that ends an utterance.
            min_speech_ms: consecutive speech that starts one (shorter sounds are clicks).
            pre_roll_ms: audio kept before the first speech frame.
            max_utterance_seconds: longest utterance audio, pre-roll included.
            frame_ms: analysis frame length.
            threshold_db: the quietest frame level (RMS, dBFS) that can be speech.
            detector: classifies frames instead of the energy rule (`threshold_db` and the noise
                floor are then unused); its `frame_samples` sets the frame length and
                `frame_ms` is ignored.
            tail_ms: audio kept after the last speech frame (at most `silence_ms`).

        Raises:
            ValueError: a duration is not positive (`pre_roll_ms` may be 0), a frame is shorter
                than one sample, or `max_utterance_seconds` cannot hold the pre-roll,
                `min_speech_ms` and one more frame.
        """
        if sample_rate <= 0 or frame_ms <= 0 or silence_ms <= 0 or min_speech_ms <= 0:
            raise ValueError(
                "sample_rate, frame_ms, silence_ms and min_speech_ms must be positive; got "
                f"{sample_rate}, {frame_ms}, {silence_ms}, {min_speech_ms}"
            )
        if pre_roll_ms < 0:
            raise ValueError(f"pre_roll_ms must not be negative; got {pre_roll_ms}")
        if detector is not None:
            frame_ms = max(1, round(detector.frame_samples * 1000 / sample_rate))
        frame = (
            detector.frame_samples if detector is not None else round(sample_rate * frame_ms / 1000)
        )
        if frame < 1:
            raise ValueError(f"a {frame_ms} ms frame is less than one sample at {sample_rate} Hz")
        self.sample_rate: Final = sample_rate
        self.threshold_db: Final = float(threshold_db)
        self.detector: Final = detector
        self._frame = frame
        self._silence_frames = math.ceil(silence_ms / frame_ms)
        self._min_speech_frames = math.ceil(min_speech_ms / frame_ms)
        self._pre_roll = round(sample_rate * pre_roll_ms / 1000)
        self._tail = min(round(sample_rate * tail_ms / 1000), self._silence_frames * frame)
        self._max = int(max_utterance_seconds * sample_rate)
        # Between utterances the buffer holds the pre-roll and the run of speech frames that may
        # open an utterance; an utterance that opens must have room for one more frame.
        self._keep = self._pre_roll + self._min_speech_frames * frame
        if self._max < self._keep + frame:
            raise ValueError(
                f"max_utterance_seconds ({max_utterance_seconds:g}) must exceed pre_roll_ms + "
                f"min_speech_ms + frame_ms"
            )

        # noise floor: the last `window` levels, oldest first and sorted; the prior comes first
        self._window = max(_NOISE_RANK + 1, round(_NOISE_WINDOW_SECONDS * 1000 / frame_ms))
        self._steady = max(3, self._min_speech_frames)
        self._prior = _NOISE_RANK  # prior levels still in the window (the oldest ones)
        self._prior_frames = round(_PRIOR_SECONDS * 1000 / frame_ms)  # frames until it goes
        prior_db = self.threshold_db - NOISE_MARGIN_DB
        self._levels: deque[float] = deque([prior_db] * self._prior)
        self._sorted_levels: list[float] = [prior_db] * self._prior
        self._recent: deque[float] = deque(maxlen=self._steady)

        # audio: the open utterance, or between utterances the most recent audio
        self._buf = np.zeros(self._max, dtype=np.float32)
        self._buf_len = 0  # valid samples at the front of _buf
        self._buf_start = 0  # stream position of _buf[0]
        self._partial = np.zeros(frame, dtype=np.float32)  # less than a frame, not yet framed
        self._partial_len = 0
        self._pos = 0  # stream position just after the last framed sample

        self._speech_run = 0  # consecutive speech frames while no utterance is open
        self._silence_run = 0  # consecutive non-speech frames while one is open
        self._open_start: int | None = None  # stream position of its first speech frame
        self._last_speech_end = 0  # stream position of the end of its last speech frame
        self._emitted_end = 0  # stream position of the end of the last utterance's audio

    # ----------------------------------------------------------------------------- public API

    @property
    def in_speech(self) -> bool:
        """Whether an utterance is open (its speech started and has not ended yet)."""
        return self._open_start is not None

    @property
    def open_start(self) -> float | None:
        """Start (seconds) of the open utterance's first speech frame; None if none is open."""
        return None if self._open_start is None else self._open_start / self.sample_rate

    @property
    def open_audio(self) -> npt.NDArray[np.float32]:
        """A copy of the open utterance's audio so far, pre-roll included (empty if none)."""
        if self._open_start is None:
            return np.zeros(0, dtype=np.float32)
        return self._buf[: self._buf_len].copy()

    @property
    def samples_seen(self) -> int:
        """How many samples have been fed since the stream started."""
        return self._pos + self._partial_len

    def feed(self, samples: npt.NDArray[np.float32]) -> list[Utterance]:
        """Take the next chunk of the stream (float32 mono, any length); return the utterances
        that ended within it, in order. Raises ValueError if the chunk is not 1-D or holds NaN
        or infinity (a caller bug: `PcmDecoder` never produces them)."""
        x = np.asarray(samples, dtype=np.float32)
        if x.ndim != 1 or not np.isfinite(x).all():
            raise ValueError("audio chunk must be 1-D (mono) and finite")
        frame = self._frame
        if self._partial_len + x.size < frame:
            self._partial[self._partial_len : self._partial_len + x.size] = x
            self._partial_len += x.size
            return []
        ended: list[Utterance] = []
        if self._partial_len:
            take = frame - self._partial_len
            self._partial[self._partial_len :] = x[:take]
            x = x[take:]
            self._partial_len = 0
            self._frames(self._partial.reshape(1, frame), ended)
        whole = x.size // frame * frame
        if whole:
            self._frames(x[:whole].reshape(-1, frame), ended)
        rest = x.size - whole
        self._partial[:rest] = x[whole:]
        self._partial_len = rest
        return ended

    def flush(self) -> Utterance | None:
        """End the open utterance as if the stream ended here (reason "end_of_stream"); None if
        none is open. Samples short of a frame become audio but are not classified.

        Feeding may go on afterwards, times still counted from the start of the stream, so a
        client's explicit "end of utterance" can be served by `flush` too.
        """
        if self._partial_len:
            self._append(self._partial[: self._partial_len])
            self._partial_len = 0
        self._speech_run = 0
        if self._open_start is None:
            return None
        return self._close("end_of_stream")

    def clear(self) -> None:
        """Drop the buffered audio, an open utterance's included, as if the stream had been
        silent so far (the position still counts on). The noise floor is kept: the room is the
        same room."""
        if self._partial_len:  # counted as stream time, as `flush` does
            self._append(self._partial[: self._partial_len])
            self._partial_len = 0
        self._drop_before(self._pos)
        self._emitted_end = self._pos
        self._open_start = None
        self._speech_run = 0
        self._silence_run = 0
        if self.detector is not None:
            self.detector.reset()

    # ------------------------------------------------------------------------------- framing

    def _frames(self, frames: npt.NDArray[np.float32], ended: list[Utterance]) -> None:
        """Classify and consume whole frames (one per row)."""
        if self.detector is not None:
            flags = self.detector.classify(frames)
        else:
            power = np.einsum("ij,ij->i", frames, frames, dtype=np.float64) / frames.shape[1]
            levels = 10.0 * np.log10(np.maximum(power, 10.0 ** (_SILENT_DB / 10)))
            flags = [self._is_speech(level) for level in levels.tolist()]
        for frame, speech in zip(frames, flags, strict=True):
            self._append(frame)
            utterance = self._step(speech)
            if utterance is not None:
                ended.append(utterance)

    def _is_speech(self, level: float) -> bool:
        """Classify one frame by its level (dBFS); the frame joins the noise window first."""
        self._levels.append(level)
        bisect.insort(self._sorted_levels, level)
        if len(self._levels) > self._window:
            self._forget_oldest_level()
        self._recent.append(level)
        steady = (
            len(self._recent) == self._steady
            and max(self._recent) - min(self._recent) <= STEADY_RANGE_DB
        )
        self._prior_frames -= 1
        if self._prior and (steady or self._prior_frames <= 0):
            while self._prior:
                self._forget_oldest_level()
        noise = self._sorted_levels[_NOISE_RANK - 1]
        if steady:
            noise = max(noise, min(self._recent))
        return level > max(self.threshold_db, noise + NOISE_MARGIN_DB)

    def _forget_oldest_level(self) -> None:
        oldest = self._levels.popleft()
        del self._sorted_levels[bisect.bisect_left(self._sorted_levels, oldest)]
        self._prior = max(0, self._prior - 1)

    def _step(self, speech: bool) -> Utterance | None:
        """Advance the state machine by the frame just appended; return an ended utterance."""
        frame = self._frame
        if self._open_start is None:
            self._speech_run = self._speech_run + 1 if speech else 0
            if self._speech_run >= self._min_speech_frames:
                self._open(self._pos - self._speech_run * frame, pre_roll=self._pre_roll)
            return None
        if speech:
            self._silence_run = 0
            self._last_speech_end = self._pos
        else:
            self._silence_run += 1
        if self._silence_run >= self._silence_frames:
            return self._close("silence")
        if self._buf_len + frame > self._max:
            continues = self._silence_run == 0
            utterance = self._close("max_length")
            if continues:  # speech goes on: the next utterance starts where this one was cut
                self._open(self._pos, pre_roll=0)
            return utterance
        return None

    # --------------------------------------------------------------------------- utterances

    def _open(self, start: int, *, pre_roll: int) -> None:
        """Open an utterance whose first speech frame starts at `start`; its audio starts up to
        `pre_roll` earlier, but never within the previous utterance's audio."""
        self._drop_before(max(self._buf_start, start - pre_roll, self._emitted_end))
        self._open_start = start
        self._last_speech_end = self._pos
        self._silence_run = 0
        self._speech_run = 0

    def _close(self, reason: EndReason) -> Utterance | None:
        """End the open utterance. One without a speech frame (opened at a max_length cut just
        as the speech stopped) is dropped."""
        start = self._open_start
        assert start is not None
        end = self._last_speech_end
        self._open_start = None
        self._silence_run = 0
        if end <= start:
            return None
        audio_end = min(self._pos, end + self._tail)
        self._emitted_end = audio_end
        audio = self._buf[: audio_end - self._buf_start].copy()
        rate = self.sample_rate
        return Utterance(audio=audio, start=start / rate, end=end / rate, reason=reason)

    # ------------------------------------------------------------------------------- buffer

    def _append(self, x: npt.NDArray[np.float32]) -> None:
        """Add samples to the buffer. Between utterances, when it is full, keep only the audio
        that may yet become part of an utterance; an open utterance never overflows it (it is
        cut at max_length first)."""
        if self._buf_len + x.size > self._buf.size:
            assert self._open_start is None, "an open utterance outgrew its buffer"
            self._drop_before(self._pos - self._keep)
        self._buf[self._buf_len : self._buf_len + x.size] = x
        self._buf_len += x.size
        self._pos += x.size

    def _drop_before(self, position: int) -> None:
        """Forget the buffered audio before stream position `position`."""
        drop = min(max(0, position - self._buf_start), self._buf_len)
        if drop:
            self._buf_len -= drop
            self._buf[: self._buf_len] = self._buf[drop : drop + self._buf_len]
            self._buf_start += drop
