"""Voice-activity detectors behind the endpointer: energy (the default rule of
`service.streaming.endpoint`) or Silero VAD, a small neural detector.

Silero VAD (https://github.com/snakers4/silero-vad, MIT) is a 2 MB recurrent network that gives
the probability of speech for every 32 ms of 16 kHz audio (512 samples; 256 at 8 kHz). Its PyPI
wheel ships the model (TorchScript and ONNX), so nothing is downloaded; it runs here on
onnxruntime, on one thread (see `SileroModel`). The energy rule takes a steady loud noise for
silence (it learns the noise floor) but takes any non-steady sound above the floor (music, a
door, babble) for speech, and loses speech in loud noise; Silero is trained on speech against
such noise. Measured side by side by `python -m bench.vad`.

The model file is found in the installed package without importing `silero_vad`, whose
import calls `torch.set_num_threads(1)` for the whole process (the model workers would lose
their threads). Each live stream keeps its own recurrent state; all share one model.

For whole files (long-audio windowing) `silero_speech_frames` runs the model over the audio in
parallel lanes and returns per-frame decisions on the windowing's 20 ms grid.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from service.audio.windows import FRAME_SECONDS, Window, plan_windows
from service.streaming.endpoint import Endpointer

__all__ = [
    "SILERO_RATES",
    "SileroDetector",
    "SileroModel",
    "VadKind",
    "make_endpointer",
    "plan_speech_windows",
    "release",
    "silero_available",
    "silero_speech_frames",
]

VadKind = Literal["energy", "silero"]

SILERO_RATES: Final = {16_000: 512, 8_000: 256}
"""The sample rates Silero VAD takes, and its frame (samples) at each."""

TAIL_MS: Final = 300
"""Audio kept after Silero's last speech frame. Silero ends speech on the last voiced frame,
often before a final fricative ("lights" lost its "s" by 140 ms in a test); the bundled model
also needs some quiet after the last word. The endpoint waits `silence_ms` anyway, so a
longer tail costs no latency."""

NEGATIVE_OFFSET: Final = 0.15
"""Hysteresis, as in Silero's own `VADIterator`: once in speech, a frame stays speech until its
probability falls below `threshold - NEGATIVE_OFFSET`, so a soft syllable does not end it."""


def _model_path() -> Path | None:
    """The ONNX model inside the installed `silero-vad` wheel (None if not installed)."""
    spec = importlib.util.find_spec("silero_vad")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    return path if path.is_file() else None


def silero_available() -> bool:
    """Whether Silero can run: the `silero-vad` wheel (the model) and onnxruntime are here."""
    return _model_path() is not None and importlib.util.find_spec("onnxruntime") is not None


class SileroModel:
    """The Silero ONNX model in one onnxruntime session, shared by every stream.

    The network is stateless from onnxruntime's side: each call takes the stream's recurrent
    state and audio context and returns the new state, so one session (thread-safe, one
    thread, loaded once, about 0.1 s) serves any number of streams, each keeping its own
    state. One thread, because a 32 ms frame is far too small to split, and torch's
    intra-op pool, shared with the model workers, made the TorchScript variant 10-50 times
    slower on a busy two-core machine (0.5-0.8 ms a frame on one thread, 10-15 ms on two).
    """

    _instance: SileroModel | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        import onnxruntime

        path = _model_path()
        if path is None:
            raise RuntimeError("silero-vad is not installed: pip install silero-vad")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )

    @classmethod
    def get(cls) -> SileroModel:
        """The process's model (loaded on first use; blocking)."""
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def run(
        self,
        frames: npt.NDArray[np.float32],
        context: npt.NDArray[np.float32],
        state: npt.NDArray[np.float32],
        sample_rate: int,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """One step for a batch of streams: `frames` (batch, frame), `context` (batch, the
        last CONTEXT samples before them), `state` (2, batch, 128). Returns the speech
        probabilities (batch,) and the new state."""
        x = np.concatenate([context, frames], axis=1)
        out, new_state = self.session.run(
            None, {"input": x, "state": state, "sr": np.array(sample_rate, dtype=np.int64)}
        )
        return np.asarray(out[:, 0], np.float32), np.asarray(new_state, np.float32)


_CONTEXT: Final = {16_000: 64, 8_000: 32}
"""Samples of the previous frame Silero v5 sees with each frame."""


class SileroDetector:
    """`SpeechDetector` for `Endpointer`: Silero speech probability per frame, with hysteresis.

    `threshold` is OpenAI's `server_vad.threshold` (0-1, default 0.5): a frame whose probability
    reaches it starts speech.
    """

    def __init__(self, sample_rate: int, threshold: float = 0.5) -> None:
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
        self._model = SileroModel.get()
        self.probabilities: list[float] = []  # of the last `classify` call (for measurements)
        self._state = np.zeros((2, 1, 128), np.float32)
        self._context = np.zeros((1, _CONTEXT[sample_rate]), np.float32)
        self._speech = False

    def classify(self, frames: npt.NDArray[np.float32]) -> list[bool]:
        flags = []
        probabilities = []
        for frame in frames:
            p, self._state = self._model.run(
                frame[None, :], self._context, self._state, self.sample_rate
            )
            self._context = frame[None, -self._context.shape[1] :].copy()
            probability = float(p[0])
            probabilities.append(probability)
            self._speech = probability >= (self.negative if self._speech else self.threshold)
            flags.append(self._speech)
        self.probabilities = probabilities
        return flags

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), np.float32)
        self._context = np.zeros((1, _CONTEXT[self.sample_rate]), np.float32)
        self._speech = False


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

    Blocking for Silero the first time (loading the model takes about 0.1 s): call it off the
    event loop. Raises ValueError if Silero cannot serve this rate or is not installed.
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
            tail_ms=min(TAIL_MS, silence_ms),
        )
    return Endpointer(
        sample_rate,
        silence_ms=silence_ms,
        pre_roll_ms=pre_roll_ms,
        max_utterance_seconds=max_utterance_seconds,
        threshold_db=threshold_db,
    )


def release(endpointer: Endpointer) -> None:
    """Give back what an endpointer's detector holds (nothing at present: Silero streams share
    one model); the sessions call it when they end, so a detector with resources can."""
    close = getattr(endpointer.detector, "close", None)
    if callable(close):
        close()


def silero_probabilities(
    audio: npt.NDArray[np.float32], sample_rate: int, lanes: int = 32
) -> npt.NDArray[np.float32]:
    """Speech probability of every whole Silero frame of `audio` (8 or 16 kHz).

    The audio is cut into `lanes` contiguous pieces run side by side as one batch (each with
    its own state), several times faster than one frame at a time on a long file; each lane
    first runs over the 0.5 s before its piece, so a cut does not start the model cold in the
    middle of speech.
    """
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
    model = SileroModel.get()
    state = np.zeros((2, lanes, 128), np.float32)
    context = np.zeros((lanes, _CONTEXT[sample_rate]), np.float32)
    out = np.zeros((lanes, warm + per_lane), np.float32)
    for k in range(warm + per_lane):
        out[:, k], state = model.run(frames[:, k], context, state, sample_rate)
        context = frames[:, k, -context.shape[1] :]
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
