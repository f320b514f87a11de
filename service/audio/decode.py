"""Turn an uploaded audio file (bytes) into the float32 mono signal the models expect.

Every container libsndfile reads is accepted; the service promises WAV (8/16/24/32-bit PCM,
32/64-bit float), FLAC, OGG/Vorbis, OGG/Opus and MP3. Decoding is bounded before any sample is
read: the header's sample rate, channel count and duration are checked first, and the samples
are then read in short blocks, so a header that claims gigabytes can never make us allocate
them. Every failure is reported as one of the service's errors (400 `BadAudio`, 413
`PayloadTooLarge`, 415 `UnsupportedMediaType`) with a message the client can act on.

The functions here are pure: bytes in, array out, no I/O beyond the in-memory buffer.
"""

from __future__ import annotations

import io
import math
import threading
from typing import BinaryIO, Final

import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

from service.errors import BadAudio, PayloadTooLarge, UnsupportedMediaType

__all__ = [
    "MAX_SAMPLE_RATE",
    "MIN_SAMPLE_RATE",
    "DecodeStopped",
    "decode_audio",
    "probe_duration",
]

MIN_SAMPLE_RATE: Final = 4000
"""Lowest input sample rate accepted (Hz); below it there is no usable speech band."""

MAX_SAMPLE_RATE: Final = 192000
"""Highest input sample rate accepted (Hz); above it the header is almost surely bogus."""

_BLOCK_SECONDS: Final = 0.25
"""Length of one read block. Bounds the memory a lying header can make us take, and how much
audio is lost when a damaged tail makes libsndfile fail mid-block (the failing block's frames are
not returned to us, so smaller blocks salvage more)."""

MAX_SAMPLE_MAGNITUDE: Final = 2.0**31
"""Largest |sample| accepted. Float files hold [-1, 1], or integer-scaled values (up to 2^31) from
tools that write integer samples as floats; anything larger is garbage (a corrupt float file), and
would overflow float32 arithmetic (channel mean, resampling, feature normalisation) to inf/NaN."""

_SF_ERR_UNRECOGNISED_FORMAT: Final = 1
"""libsndfile's error code for 'Format not recognised': the bytes are in no container it knows."""

_SF_COUNT_MAX: Final = 0x7FFF_FFFF_FFFF_FFFF
"""libsndfile's frame count when a stream's length is unknown."""

_SUPPORTED: Final = "WAV, FLAC, OGG/Vorbis, OGG/Opus, MP3"


class DecodeStopped(Exception):
    """Decoding was stopped by its caller (`stop` was set: the deadline passed)."""


def decode_audio(
    data: bytes | BinaryIO,
    *,
    sample_rate: int,
    max_seconds: float,
    max_channels: int = 2,
    stop: threading.Event | None = None,
) -> npt.NDArray[np.float32]:
    """Decode `data` (a whole audio file, as bytes or a seekable binary file) to float32 mono
    at `sample_rate` Hz.

    Channels are averaged; the signal is resampled (soxr, HQ, as a stream) when the file's rate
    differs. Memory: the result, plus one short block; the file's own samples at their rate are
    never held whole (an hour at 44.1 kHz would be 635 MB), and given a file object (an upload
    spooled to disk) the encoded bytes are not held either.
    The result is 1-D, C-contiguous and non-empty. The duration limit is checked against the
    header before decoding and again while decoding, since some headers (MP3 without a length
    tag, a hand-made WAV) do not tell the truth. If the file breaks part-way (a damaged tail),
    the audio decoded up to the break is kept; if nothing decoded, it is `BadAudio`.

    Raises:
        BadAudio: empty, corrupt or unreadable data, no samples, NaN/Inf samples or samples
            beyond MAX_SAMPLE_MAGNITUDE, a sample rate outside MIN_SAMPLE_RATE..MAX_SAMPLE_RATE,
            more than `max_channels` channels, or audio too short to yield one sample at
            `sample_rate`.
        UnsupportedMediaType: the bytes are in no audio format libsndfile recognises.
        PayloadTooLarge: the audio lasts longer than `max_seconds`.
        ValueError: a non-positive `sample_rate`, `max_seconds` or `max_channels` (a caller bug).
        DecodeStopped: `stop` was set (checked between blocks, so decoding stops within one).
    """
    if sample_rate <= 0 or max_seconds <= 0 or max_channels < 1:
        raise ValueError(
            f"need sample_rate > 0, max_seconds > 0, max_channels >= 1; got {sample_rate}, "
            f"{max_seconds}, {max_channels}"
        )
    with _open(data) as f:
        rate_in = int(f.samplerate)
        channels = int(f.channels)
        _check_sample_rate(rate_in)
        if channels > max_channels:
            raise BadAudio(f"audio has {channels} channels; at most {max_channels} are supported")
        header_frames = int(f.frames)
        known = header_frames != _SF_COUNT_MAX
        if known and header_frames > max_seconds * rate_in:
            raise PayloadTooLarge(_too_long(header_frames / rate_in, max_seconds))
        mono = _read_mono(
            f, rate_in, channels, max_seconds, sample_rate, header_frames if known else None, stop
        )
    if mono.size == 0:
        raise BadAudio(f"audio is too short: it does not last one sample at {sample_rate} Hz")
    return mono


def probe_duration(data: bytes) -> float:
    """Return the duration in seconds that the header of `data` declares, without decoding.

    Cheap (reads the header only) and as trustworthy as the header: `decode_audio` re-checks
    the length while decoding. Raises the same errors as `decode_audio` for empty data,
    unrecognised or corrupt headers, and unsupported sample rates.
    """
    with _open(data) as f:
        rate = int(f.samplerate)
        _check_sample_rate(rate)
        frames = int(f.frames)
        return float("inf") if frames == _SF_COUNT_MAX else frames / rate


def _open(data: bytes | BinaryIO) -> sf.SoundFile:
    """Open `data` as a sound file, translating libsndfile's refusal into the service's errors."""
    if isinstance(data, bytes | bytearray | memoryview):
        data = io.BytesIO(data)
    data.seek(0, io.SEEK_END)
    empty = data.tell() == 0
    data.seek(0)
    if empty:
        raise BadAudio("audio file is empty (0 bytes)")
    try:
        return sf.SoundFile(data)
    except sf.LibsndfileError as exc:
        if exc.code == _SF_ERR_UNRECOGNISED_FORMAT:
            raise UnsupportedMediaType(
                f"file is not audio in a supported format ({_SUPPORTED})"
            ) from exc
        raise BadAudio(f"audio file is corrupt or unreadable: {_reason(exc)}") from exc
    except (sf.SoundFileError, RuntimeError, ValueError) as exc:
        raise BadAudio(f"audio file is corrupt or unreadable: {exc}") from exc


def _check_sample_rate(rate: int) -> None:
    """Reject sample rates no real recording has (they also make the duration meaningless)."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise BadAudio(
            f"audio sample rate is {rate} Hz; it must be between {MIN_SAMPLE_RATE} and "
            f"{MAX_SAMPLE_RATE} Hz"
        )


class _Samples:
    """An append-only float32 buffer: sized once when the length is known, else doubling."""

    def __init__(self, capacity: int) -> None:
        self.data = np.empty(max(1, capacity), dtype=np.float32)
        self.size = 0

    def append(self, x: npt.NDArray[np.float32]) -> None:
        if self.size + len(x) > len(self.data):
            grown = np.empty(max(2 * len(self.data), self.size + len(x)), dtype=np.float32)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[self.size : self.size + len(x)] = x
        self.size += len(x)

    def result(self) -> npt.NDArray[np.float32]:
        if len(self.data) - self.size > self.size // 8:  # do not keep a mostly empty buffer
            return self.data[: self.size].copy()
        return self.data[: self.size]


def _read_mono(
    f: sf.SoundFile,
    rate: int,
    channels: int,
    max_seconds: float,
    target_rate: int,
    header_frames: int | None,
    stop: threading.Event | None = None,
) -> npt.NDArray[np.float32]:
    """Read every frame of `f`, averaging channels and resampling block by block.

    One reusable (block, channels) buffer holds the raw frames; each block is downmixed,
    resampled by a streaming resampler (the same output as resampling the whole signal at
    once) and appended to the result, which is allocated once from the header's length.
    `buffer_read_into` reads until libsndfile reports the end of the stream, not just the
    frames the header declared, so the duration limit is enforced on what actually decodes and
    decoding stops as soon as it is exceeded.
    """
    block = max(1, int(rate * _BLOCK_SECONDS))
    buf = np.empty((block, channels), dtype=np.float32)
    limit_frames = max_seconds * rate
    resampler = (
        soxr.ResampleStream(rate, target_rate, 1, dtype="float32", quality="HQ")
        if rate != target_rate
        else None
    )
    expected = header_frames if header_frames is not None else block
    out = _Samples(math.ceil(expected * target_rate / rate) + 16)
    total = 0
    while True:
        if stop is not None and stop.is_set():
            raise DecodeStopped
        try:
            n = int(f.buffer_read_into(buf, dtype="float32"))
        except (sf.SoundFileError, RuntimeError) as exc:
            if total > 0:
                break  # damaged tail: keep what decoded before it
            raise BadAudio(f"audio data is corrupt: {_reason(exc)}") from exc
        if n <= 0:
            break
        frames = buf[:n]
        magnitude = np.abs(frames)
        if not (magnitude <= MAX_SAMPLE_MAGNITUDE).all():  # NaN compares false too
            if not np.isfinite(frames).all():
                raise BadAudio("audio contains NaN or infinite samples")
            raise BadAudio(
                f"audio contains samples of magnitude {magnitude.max():.3g}; float samples "
                f"must lie within ±{MAX_SAMPLE_MAGNITUDE:.0f} (normally [-1, 1])"
            )
        mono = frames[:, 0].copy() if channels == 1 else frames.mean(axis=1, dtype=np.float32)
        total += n
        if total > limit_frames:
            raise PayloadTooLarge(_too_long(total / rate, max_seconds, at_least=True))
        out.append(mono if resampler is None else resampler.resample_chunk(mono))
    if total == 0:
        raise BadAudio("audio contains no samples")
    if resampler is not None:
        out.append(resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
    return out.result()


def _too_long(seconds: float, limit: float, *, at_least: bool = False) -> str:
    """The 413 message: how long the audio is and what the limit is."""
    qualifier = "at least " if at_least else ""
    return f"audio is {qualifier}{seconds:.1f} s long; the limit is {limit:g} s"


def _reason(exc: BaseException) -> str:
    """libsndfile's own explanation, without soundfile's 'Error opening <BytesIO ...>' prefix."""
    reason = getattr(exc, "error_string", None)
    text = reason if isinstance(reason, str) and reason else str(exc)
    return text.strip().rstrip(".")
