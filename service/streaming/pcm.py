"""Turn the raw PCM frames a streaming client sends into float32 mono samples at the model's rate.

A streaming client sends headerless little-endian PCM (16-bit integers or 32-bit floats), or
G.711 (8-bit mu-law or A-law, as telephony and the OpenAI Realtime API's `audio/pcmu` and
`audio/pcma` send), at its own sample rate, in frames of any size. `PcmDecoder` checks each
frame, converts it and resamples it with one `soxr.ResampleStream` for the whole stream, so the
output of a stream fed in any chunking is the same signal as the stream resampled whole: no
clicks at frame boundaries.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

import numpy as np
import numpy.typing as npt
import soxr

from service.audio.decode import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE

__all__ = ["MAX_FLOAT_MAGNITUDE", "BadFrame", "PcmDecoder", "PcmEncoding"]

PcmEncoding = Literal["pcm_s16le", "f32le", "g711_ulaw", "g711_alaw"]
"""The sample formats a client may stream: 16-bit signed integers or 32-bit floats, little-endian,
or G.711 mu-law / A-law bytes; one channel."""

MAX_FLOAT_MAGNITUDE: Final = 16.0
"""Largest |sample| accepted in f32le. Float audio lives in [-1, 1]; a little overshoot is real
(mixes before limiting), but values far beyond it mean integers or garbage were sent as floats."""

_DTYPES: Final[dict[str, str]] = {
    "pcm_s16le": "<i2",
    "f32le": "<f4",
    "g711_ulaw": "u1",
    "g711_alaw": "u1",
}


def _ulaw_table() -> npt.NDArray[np.float32]:
    """The 256 mu-law codes as linear samples (ITU-T G.711; the decoder of Sun's g711.c)."""
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    magnitude = (((u & 0x0F) << 3) + 0x84) << exponent
    linear = np.where(u & 0x80, 0x84 - magnitude, magnitude - 0x84)
    return (linear / 32768.0).astype(np.float32)


def _alaw_table() -> npt.NDArray[np.float32]:
    """The 256 A-law codes as linear samples (ITU-T G.711; the decoder of Sun's g711.c)."""
    a = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (a >> 4) & 0x07
    mantissa = (a & 0x0F) << 4
    magnitude = np.where(exponent == 0, mantissa + 8, (mantissa + 0x108) << (exponent - 1))
    linear = np.where(a & 0x80, magnitude, -magnitude)
    return (linear / 32768.0).astype(np.float32)


_G711: Final = {"g711_ulaw": _ulaw_table(), "g711_alaw": _alaw_table()}


class BadFrame(ValueError):
    """A client frame is not valid PCM in the declared encoding; the stream state is untouched."""


class PcmDecoder:
    """Decode one client's PCM stream, frame by frame, to float32 mono at `target_rate` Hz.

    One instance per stream: the resampler keeps a few milliseconds of history between frames.
    When the client's rate equals `target_rate` there is no resampler and no delay; otherwise the
    resampler holds back a short tail (soxr's filter delay) that `flush` returns at the end.
    """

    def __init__(self, encoding: PcmEncoding, sample_rate: int, target_rate: int) -> None:
        """Raises ValueError for an unknown encoding, a `sample_rate` outside
        MIN_SAMPLE_RATE..MAX_SAMPLE_RATE, or a non-positive `target_rate`."""
        if encoding not in get_args(PcmEncoding):
            raise ValueError(
                f"unknown PCM encoding {encoding!r}; expected one of {get_args(PcmEncoding)}"
            )
        if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
            raise ValueError(
                f"sample rate is {sample_rate} Hz; it must be between {MIN_SAMPLE_RATE} and "
                f"{MAX_SAMPLE_RATE} Hz"
            )
        if target_rate <= 0:
            raise ValueError(f"target_rate must be positive; got {target_rate}")
        self.encoding: Final = encoding
        self.sample_rate: Final = sample_rate
        self.target_rate: Final = target_rate
        self._dtype = np.dtype(_DTYPES[encoding])
        self._resampler = (
            None
            if sample_rate == target_rate
            else soxr.ResampleStream(sample_rate, target_rate, 1, dtype="float32", quality="HQ")
        )

    def feed(self, data: bytes) -> npt.NDArray[np.float32]:
        """Decode one frame; return the samples at `target_rate` that it completes (maybe none).

        Raises:
            BadFrame: the byte count is not a whole number of samples, or (f32le) a sample is
                NaN, infinite or larger in magnitude than MAX_FLOAT_MAGNITUDE. The frame is
                dropped before it reaches the resampler, so the stream can go on.
        """
        samples = self._decode(data)
        if self._resampler is None or samples.size == 0:
            return samples
        return np.asarray(self._resampler.resample_chunk(samples), dtype=np.float32)

    def flush(self) -> npt.NDArray[np.float32]:
        """End the stream: return the resampler's remaining output (empty without a resampler).

        The decoder is then ready for a new stream, as if just constructed.
        """
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        tail = np.asarray(
            self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True),
            dtype=np.float32,
        )
        self._resampler.clear()
        return tail

    def _decode(self, data: bytes) -> npt.NDArray[np.float32]:
        """Check and convert one frame to float32 at the client's rate."""
        width = self._dtype.itemsize
        if len(data) % width:
            raise BadFrame(
                f"audio frame has {len(data)} bytes, not a whole number of {self.encoding} "
                f"samples ({width} bytes each)"
            )
        raw = np.frombuffer(data, dtype=self._dtype)
        if self.encoding in _G711:
            return _G711[self.encoding][raw]
        if self._dtype.kind == "i":
            return raw.astype(np.float32) / np.float32(32768.0)
        samples = raw.astype(np.float32)  # a writable copy, in native byte order
        if not np.isfinite(samples).all():
            raise BadFrame(f"audio frame of {self.encoding} samples contains NaN or infinity")
        if samples.size and float(np.abs(samples).max()) > MAX_FLOAT_MAGNITUDE:
            raise BadFrame(
                f"audio frame has {self.encoding} samples of magnitude up to "
                f"{float(np.abs(samples).max()):g}; float samples must lie in [-1, 1] (values "
                f"beyond {MAX_FLOAT_MAGNITUDE:g} are refused): were integers sent as floats?"
            )
        return samples
