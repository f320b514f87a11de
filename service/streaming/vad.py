"""Voice-activity detectors behind the endpointer: energy (the default rule of
`service.streaming.endpoint`) or Silero VAD, a small neural detector.

Silero VAD (https://github.com/snakers4/silero-vad, MIT) is a 2 MB recurrent network that gives
the probability of speech for every 32 ms of 16 kHz audio (512 samples; 256 at 8 kHz). Its PyPI
wheel ships the TorchScript model, so it runs on the torch the service already has, with no
download. The energy rule takes a steady loud noise for silence (it learns the noise floor) but
takes any non-steady sound above the floor (music, a door, babble) for speech; Silero is trained
on speech against such noise. Measured side by side by `python -m bench.vad`.

The model file is loaded from the installed package without importing `silero_vad`, whose
import calls `torch.set_num_threads(1)` for the whole process (the model workers would lose
their threads). Each live stream needs its own recurrent state, hence its own model instance:
`SileroPool` keeps loaded instances for reuse (loading one takes about 60-90 ms).

For whole files (long-audio windowing) `silero_speech_frames` runs the model over the audio in
parallel lanes and returns per-frame decisions on the windowing's 20 ms grid.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from service.audio.windows import FRAME_SECONDS, Window, plan_windows
from service.streaming.endpoint import Endpointer

__all__ = [
    "SILERO_RATES",
    "SileroDetector",
    "SileroPool",
    "VadKind",
    "make_endpointer",
    "plan_speech_windows",
    "silero_available",
    "silero_speech_frames",
]

VadKind = Literal["energy", "silero"]

SILERO_RATES: Final = {16_000: 512, 8_000: 256}
"""The sample rates Silero VAD takes, and its frame (samples) at each."""

NEGATIVE_OFFSET: Final = 0.15
"""Hysteresis, as in Silero's own `VADIterator`: once in speech, a frame stays speech until its
probability falls below `threshold - NEGATIVE_OFFSET`, so a soft syllable does not end it."""


def _model_path() -> Path | None:
    """The TorchScript model inside the installed `silero-vad` wheel (None if not installed)."""
    spec = importlib.util.find_spec("silero_vad")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.jit"
    return path if path.is_file() else None


def silero_available() -> bool:
    """Whether the Silero model can be loaded (the `silero-vad` package is installed)."""
    return _model_path() is not None


class SileroPool:
    """Loaded Silero models, lent out one per stream and returned when it ends."""

    def __init__(self) -> None:
        self._free: list[Any] = []
        self._lock = threading.Lock()

    def acquire(self) -> Any:
        """A model with fresh state (loads one if none is free; blocking: ~0.1 s)."""
        with self._lock:
            model = self._free.pop() if self._free else None
        if model is None:
            path = _model_path()
            if path is None:
                raise RuntimeError("silero-vad is not installed: pip install silero-vad")
            import torch

            model = torch.jit.load(str(path), map_location="cpu")
            model.eval()
        model.reset_states()
        return model

    def release(self, model: Any) -> None:
        with self._lock:
            self._free.append(model)


POOL: Final = SileroPool()


class SileroDetector:
    """`SpeechDetector` for `Endpointer`: Silero speech probability per frame, with hysteresis.

    `threshold` is OpenAI's `server_vad.threshold` (0-1, default 0.5): a frame whose probability
    reaches it starts speech. Call `close` when the stream ends (the model goes back to the pool).
    """

    def __init__(self, sample_rate: int, threshold: float = 0.5, pool: SileroPool = POOL) -> None:
        if sample_rate not in SILERO_RATES:
            raise ValueError(
                f"Silero VAD takes 8 or 16 kHz audio; the model's rate is {sample_rate} Hz"
            )
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be between 0 and 1; got {threshold}")
        self.sample_rate: Final = sample_rate
        self.frame_samples = SILERO_RATES[sample_rate]
        self.threshold: Final = threshold
        self.negative: Final = max(0.01, threshold - NEGATIVE_OFFSET)
        self._pool = pool
        self._model: Any = pool.acquire()
        self._speech = False
        self.probabilities: list[float] = []  # of the last `classify` call (for measurements)

    def classify(self, frames: npt.NDArray[np.float32]) -> list[bool]:
        import torch

        flags = []
        probabilities = []
        with torch.inference_mode():
            for frame in frames:
                x = torch.from_numpy(np.ascontiguousarray(frame))
                p = float(self._model(x, self.sample_rate))
                probabilities.append(p)
                self._speech = p >= (self.negative if self._speech else self.threshold)
                flags.append(self._speech)
        self.probabilities = probabilities
        return flags

    def reset(self) -> None:
        self._model.reset_states()
        self._speech = False

    def close(self) -> None:
        """Return the model to the pool; the detector must not be used afterwards."""
        if self._model is not None:
            self._pool.release(self._model)
            self._model = None


def make_endpointer(
    kind: VadKind,
    sample_rate: int,
    *,
    threshold: float = 0.5,
    threshold_db: float = -50.0,
    silence_ms: int = 600,
    pre_roll_ms: int = 300,
    max_utterance_seconds: float = 15.0,
) -> Endpointer:
    """An endpointer with the energy rule (`threshold_db`) or Silero (`threshold`, 0-1).

    Blocking for Silero when no model is free in the pool (a load takes about 0.1 s): call it
    off the event loop. Raises ValueError if Silero cannot serve this rate or is not installed.
    """
    if kind == "silero":
        if not silero_available():
            raise ValueError("vad 'silero' needs the silero-vad package; use 'energy'")
        return Endpointer(
            sample_rate,
            silence_ms=silence_ms,
            pre_roll_ms=pre_roll_ms,
            max_utterance_seconds=max_utterance_seconds,
            detector=SileroDetector(sample_rate, threshold),
        )
    return Endpointer(
        sample_rate,
        silence_ms=silence_ms,
        pre_roll_ms=pre_roll_ms,
        max_utterance_seconds=max_utterance_seconds,
        threshold_db=threshold_db,
    )


def release(endpointer: Endpointer) -> None:
    """Give an endpointer's Silero model back to the pool (no-op for the energy rule)."""
    if isinstance(endpointer.detector, SileroDetector):
        endpointer.detector.close()


def silero_probabilities(
    audio: npt.NDArray[np.float32], sample_rate: int, lanes: int = 32, pool: SileroPool = POOL
) -> npt.NDArray[np.float32]:
    """Speech probability of every whole Silero frame of `audio` (8 or 16 kHz).

    The audio is cut into `lanes` contiguous pieces run side by side as one batch (the model
    keeps a state per batch row), which is several times faster than one frame at a time on a
    long file; each lane's first 0.5 s warms its state up from the previous lane's audio, so
    a cut does not reset the model in the middle of speech.
    """
    import torch

    frame = SILERO_RATES[sample_rate]
    count = len(audio) // frame
    if count == 0:
        return np.zeros(0, np.float32)
    lanes = max(1, min(lanes, count // 64 or 1))
    per_lane = -(-count // lanes)
    warm = min(per_lane, round(0.5 * sample_rate / frame))
    frames = np.zeros((lanes, warm + per_lane, frame), np.float32)
    whole = audio[: count * frame].reshape(count, frame)
    for lane in range(lanes):
        lo, hi = lane * per_lane, min(count, (lane + 1) * per_lane)
        if lo >= hi:
            continue
        frames[lane, warm : warm + hi - lo] = whole[lo:hi]
        if lane and warm:
            frames[lane, :warm] = whole[lo - warm : lo]
    model = pool.acquire()
    out = np.zeros((lanes, warm + per_lane), np.float32)
    try:
        with torch.inference_mode():
            for k in range(warm + per_lane):
                out[:, k] = model(torch.from_numpy(frames[:, k]), sample_rate)[:, 0].numpy()
    finally:
        model.reset_states()
        pool.release(model)
    return out[:, warm:].reshape(-1)[:count]


def silero_speech_frames(
    audio: npt.NDArray[np.float32], sample_rate: int, grid_seconds: float, threshold: float = 0.5
) -> npt.NDArray[np.bool_]:
    """Speech decisions (with Silero's hysteresis) on a grid of `grid_seconds` frames, for the
    long-audio windowing: grid frame i is speech when the Silero frame holding its middle is."""
    probabilities = silero_probabilities(audio, sample_rate)
    speech = np.zeros(len(probabilities), bool)
    state = False
    negative = max(0.01, threshold - NEGATIVE_OFFSET)
    for i, p in enumerate(probabilities.tolist()):
        state = p >= (negative if state else threshold)
        speech[i] = state
    grid = max(1, round(sample_rate * grid_seconds))
    count = len(audio) // grid
    middles = (np.arange(count) * grid + grid // 2) // SILERO_RATES[sample_rate]
    return (
        speech[np.minimum(middles, max(0, len(speech) - 1))]
        if len(speech)
        else np.zeros(count, bool)
    )


def plan_speech_windows(
    audio: npt.NDArray[np.float32], rate: int, *, max_window: float, vad: VadKind
) -> list[Window]:
    """`plan_windows` with the chosen detector finding the speech (Silero only at 8 or 16 kHz
    and when installed; otherwise the energy rule, as `Settings.long_audio_vad` documents).
    Blocking (Silero runs at about 50x real time on one core): call it off the event loop."""
    speech = None
    if vad == "silero" and rate in SILERO_RATES and silero_available():
        speech = silero_speech_frames(audio, rate, FRAME_SECONDS)
    return plan_windows(audio, rate, max_window=max_window, speech=speech)
