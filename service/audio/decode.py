"""Turn an uploaded audio file (bytes) into the float32 mono signal the models expect.

Accepted: the containers people record speech in, an allow-list decided from the file's first
bytes (`sniff`) before any parser sees it:

| container | as recorded by | decoded by |
|---|---|---|
| WAV (RIFF/RF64: PCM 8-32 bit, float) | everything | libsndfile |
| FLAC | recorders, exports | libsndfile |
| Ogg (Opus, Vorbis, FLAC) | Firefox's MediaRecorder, WhatsApp, Telegram | libsndfile |
| MP3 | recorders, exports | libsndfile (mpg123) |
| WebM/Matroska (Opus, Vorbis) | Chrome's and Firefox's MediaRecorder | PyAV (FFmpeg) |
| MP4/M4A/MOV/3GP (AAC, ALAC, ...): audio track only | iOS, Android, Safari | PyAV |
| ADTS AAC | Android recorders | PyAV |

Anything else (AIFF, AU, NIST, IRCAM, HTK, MAT5, VOC, W64, CAF, text, ...) is refused as
`UnsupportedMediaType` without being handed to a parser: parsers of formats nobody records
speech in are attack surface, not features. libsndfile keeps the formats it reads (tested
header-level checks, exact PCM); PyAV (FFmpeg's demuxers and decoders, bundled in its wheel,
maintained upstream) takes the containers libsndfile lacks, each opened with its one demuxer
named, never probed.

Decoding is bounded before any sample is read: the sample rate, channel count and the
container's duration (where it has one) are checked first, and the samples are then decoded in
short blocks (libsndfile) or codec frames (PyAV) and counted against the limit, so a header
that claims gigabytes, or a stream with no length (a live WebM), can never make us allocate
more than the limit. Every failure is one of the service's errors (400 `BadAudio`, 400
`UnsupportedMediaType`, 413 `PayloadTooLarge`) with a message the client can act on.

The functions here are pure: bytes (or a file) in, array out.
"""

from __future__ import annotations

import io
import math
import threading
from typing import BinaryIO, Final

import av
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

_SUPPORTED: Final = "WAV, FLAC, Ogg (Opus, Vorbis), MP3, WebM, MP4/M4A (AAC), ADTS AAC"

_LIBSNDFILE: Final = frozenset({"wav", "flac", "ogg", "mp3"})
"""Containers decoded by libsndfile; the others in `sniff`'s answers by PyAV."""

_AV_DEMUXERS: Final = {"webm": "matroska", "mp4": "mov", "aac": "aac"}
"""Our container name → the one FFmpeg demuxer that opens it."""

_AV_CODECS: Final = frozenset(
    {"aac", "aac_latm", "opus", "libopus", "vorbis", "libvorbis", "flac", "alac", "mp3",
     "mp3float", "mp2", "mp2float"}
)  # fmt: skip
"""Audio codecs taken from PyAV containers (plus any `pcm_*`)."""

_SNIFF_BYTES: Final = 64


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
        UnsupportedMediaType: the bytes are in no container of the allow-list (`sniff`), or
            the track's codec is not one we take.
        PayloadTooLarge: the audio lasts longer than `max_seconds`.
        ValueError: a non-positive `sample_rate`, `max_seconds` or `max_channels` (a caller bug).
        DecodeStopped: `stop` was set (checked between blocks, so decoding stops within one).
    """
    if sample_rate <= 0 or max_seconds <= 0 or max_channels < 1:
        raise ValueError(
            f"need sample_rate > 0, max_seconds > 0, max_channels >= 1; got {sample_rate}, "
            f"{max_seconds}, {max_channels}"
        )
    data = _seekable(data)
    container = sniff(data)
    if container not in _LIBSNDFILE:
        return _decode_av(data, container, sample_rate, max_seconds, max_channels, stop)
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
    stream = _seekable(data)
    container = sniff(stream)
    if container not in _LIBSNDFILE:
        with _open_av(stream, container) as media:
            audio = _audio_stream(media)
            seconds = _declared_seconds(media, audio)
            return float("inf") if seconds is None else seconds
    with _open(stream) as f:
        rate = int(f.samplerate)
        _check_sample_rate(rate)
        frames = int(f.frames)
        return float("inf") if frames == _SF_COUNT_MAX else frames / rate


def _seekable(data: bytes | BinaryIO) -> BinaryIO:
    """`data` as a seekable binary file; empty data is `BadAudio`."""
    stream: BinaryIO = (
        io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
    )
    stream.seek(0, io.SEEK_END)
    empty = stream.tell() == 0
    stream.seek(0)
    if empty:
        raise BadAudio("audio file is empty (0 bytes)")
    return stream


def sniff(stream: BinaryIO) -> str:
    """The container of `stream`, from its first bytes: one of the allow-list's names
    (`wav`, `flac`, `ogg`, `mp3`, `webm`, `mp4`, `aac`); anything else is
    `UnsupportedMediaType`. The stream is left at its start."""
    head = stream.read(_SNIFF_BYTES)
    skip = 0
    if head[:3] == b"ID3" and len(head) >= 10:  # ID3v2 tag before MP3, FLAC or AAC data
        skip = 10 + _synchsafe(head[6:10]) + (10 if head[5] & 0x10 else 0)
        stream.seek(skip)
        body = stream.read(_SNIFF_BYTES)
    else:
        body = head
    stream.seek(0)
    kind = _kind(head, body, tagged=skip > 0)
    if kind is None:
        raise UnsupportedMediaType(f"file is not audio in a supported format ({_SUPPORTED})")
    return kind


def _synchsafe(four: bytes) -> int:
    return (four[0] & 0x7F) << 21 | (four[1] & 0x7F) << 14 | (four[2] & 0x7F) << 7 | four[3] & 0x7F


def _kind(head: bytes, body: bytes, *, tagged: bool) -> str | None:
    if head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska / WebM
        return "webm"
    if head[4:8] == b"ftyp":  # ISO base media: MP4, M4A, MOV, 3GP
        return "mp4"
    if body[:4] == b"fLaC":
        return "flac"
    if len(body) >= 2 and body[0] == 0xFF and body[1] & 0xE0 == 0xE0:  # MPEG audio frame sync
        layer = (body[1] >> 1) & 0x3
        if layer:  # layers I-III
            return "mp3"
        if body[1] & 0xF6 == 0xF0:  # ADTS: MPEG-2/4 AAC, layer bits 00
            return "aac"
    if tagged:  # an ID3 tag, then audio we did not recognise: let mpg123 resync
        return "mp3"
    return None


def _open_av(stream: BinaryIO, container: str) -> av.container.InputContainer:
    """Open `stream` with the one FFmpeg demuxer for `container` (never FFmpeg's probing)."""
    try:
        return av.open(stream, mode="r", format=_AV_DEMUXERS[container])
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise BadAudio(f"audio file is corrupt or unreadable: {_av_reason(exc)}") from exc


def _audio_stream(media: av.container.InputContainer) -> av.AudioStream:
    if not media.streams.audio:
        raise BadAudio("the file has no audio track")
    stream = media.streams.audio[0]
    codec = stream.codec_context.name
    if codec not in _AV_CODECS and not codec.startswith("pcm_"):
        raise UnsupportedMediaType(f"audio codec {codec!r} is not supported ({_SUPPORTED})")
    return stream


def _declared_seconds(media: av.container.InputContainer, stream: av.AudioStream) -> float | None:
    """The duration the container declares for the audio track, if it declares one."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if media.duration is not None:
        return media.duration / av.time_base
    return None


def _decode_av(
    data: BinaryIO,
    container: str,
    sample_rate: int,
    max_seconds: float,
    max_channels: int,
    stop: threading.Event | None = None,
) -> npt.NDArray[np.float32]:
    """Decode the first audio track of a WebM/MP4/AAC file, frame by frame, as `decode_audio`."""
    with _open_av(data, container) as media:
        stream = _audio_stream(media)
        rate = int(stream.codec_context.sample_rate or 0)
        _check_sample_rate(rate)
        channels = int(stream.codec_context.channels or 0)
        if not 1 <= channels <= max_channels:
            raise BadAudio(f"audio has {channels} channels; at most {max_channels} are supported")
        declared = _declared_seconds(media, stream)
        if declared is not None and declared > max_seconds:
            raise PayloadTooLarge(_too_long(declared, max_seconds))
        resampler = (
            soxr.ResampleStream(rate, sample_rate, 1, dtype="float32", quality="HQ")
            if rate != sample_rate
            else None
        )
        planar = av.AudioResampler(format="fltp")  # any sample format → float, planar
        expected = declared if declared is not None else _BLOCK_SECONDS
        out = _Samples(math.ceil(expected * sample_rate) + 16)
        limit = max_seconds * rate
        total = 0
        try:
            for packet in media.demux(stream):  # other tracks (video) are read past, not decoded
                if stop is not None and stop.is_set():
                    raise DecodeStopped
                for frame in packet.decode():
                    for block in planar.resample(frame):
                        samples = block.to_ndarray().astype(np.float32, copy=False)
                        mono = _check_block(samples.T)
                        total += len(mono)
                        if total > limit:
                            raise PayloadTooLarge(
                                _too_long(total / rate, max_seconds, at_least=True)
                            )
                        out.append(mono if resampler is None else resampler.resample_chunk(mono))
        except av.FFmpegError as exc:
            if total == 0:
                raise BadAudio(f"audio data is corrupt: {_av_reason(exc)}") from exc
            # damaged tail: keep what decoded before it
    if total == 0:
        raise BadAudio("audio contains no samples")
    if resampler is not None:
        out.append(resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
    result = out.result()
    if result.size == 0:
        raise BadAudio(f"audio is too short: it does not last one sample at {sample_rate} Hz")
    return result


def _check_block(frames: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """One block of (samples, channels) as mono, refusing NaN, infinite or absurd samples."""
    magnitude = np.abs(frames)
    if not (magnitude <= MAX_SAMPLE_MAGNITUDE).all():  # NaN compares false too
        if not np.isfinite(frames).all():
            raise BadAudio("audio contains NaN or infinite samples")
        raise BadAudio(
            f"audio contains samples of magnitude {magnitude.max():.3g}; float samples "
            f"must lie within ±{MAX_SAMPLE_MAGNITUDE:.0f} (normally [-1, 1])"
        )
    if frames.shape[1] == 1:
        return np.ascontiguousarray(frames[:, 0])
    return frames.mean(axis=1, dtype=np.float32)


def _av_reason(exc: BaseException) -> str:
    """FFmpeg's explanation, without PyAV's errno prefix."""
    reason = getattr(exc, "strerror", None)
    return str(reason or exc).strip().rstrip(".")


def _open(data: BinaryIO) -> sf.SoundFile:
    """Open `data` as a sound file, translating libsndfile's refusal into the service's errors."""
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
    """An append-only float32 buffer: one array sized from the declared length; past it
    (no length declared, or a header that under-declares), a list of chunks joined at the end.

    Peak memory: the result once where the length is known, at most twice otherwise (the
    chunks and their join), never a doubling buffer's three times.
    """

    def __init__(self, capacity: int) -> None:
        self.data = np.empty(max(1, capacity), dtype=np.float32)
        self.size = 0
        self.chunks: list[npt.NDArray[np.float32]] = []

    def append(self, x: npt.NDArray[np.float32]) -> None:
        if not self.chunks and self.size + len(x) <= len(self.data):
            self.data[self.size : self.size + len(x)] = x
            self.size += len(x)
            return
        if not self.chunks:
            self.chunks.append(self.data[: self.size])
        self.chunks.append(np.array(x, dtype=np.float32))  # a copy: callers reuse buffers

    def result(self) -> npt.NDArray[np.float32]:
        if self.chunks:
            joined = np.concatenate(self.chunks)
            self.chunks = []
            return joined
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
