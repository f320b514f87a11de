"""Tests for `service.audio.decode`: real files in every supported container, made in the test.

The source signal is speech from espeak-ng when it is installed (a deterministic synthetic
vowel-like signal otherwise), so correlations are measured on broadband audio, not one tone.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
import soxr

from service.audio import decode_audio, probe_duration
from service.audio.decode import sniff
from service.errors import BadAudio, PayloadTooLarge, ServiceError, UnsupportedMediaType
from tests import media

TARGET = 16000
F32 = npt.NDArray[np.float32]


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> tuple[F32, int]:
    """About 1 s of speech (espeak-ng, 22.05 kHz) or, without espeak-ng, a synthetic stand-in."""
    espeak = shutil.which("espeak-ng")
    if espeak is not None:
        path = tmp_path_factory.mktemp("speech") / "hello.wav"
        subprocess.run([espeak, "-w", str(path), "hello world"], check=True, timeout=30)
        x, rate = sf.read(path, dtype="float32")
        if x.ndim == 2:
            x = x.mean(axis=1)
        return np.ascontiguousarray(x, dtype=np.float32), int(rate)
    rate = 22050
    t = np.arange(rate) / rate
    env = 0.5 * (1 - np.cos(2 * np.pi * 3 * t))
    x = env * sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((150, 700, 1200, 2500), 1))
    return (0.3 * x).astype(np.float32), rate


def at_rate(x: F32, rate_in: int, rate_out: int) -> F32:
    """`x` resampled from `rate_in` to `rate_out` (identity when equal)."""
    if rate_in == rate_out:
        return x
    return np.asarray(soxr.resample(x, rate_in, rate_out, quality="HQ"), dtype=np.float32)


def encode(x: npt.NDArray[Any], rate: int, fmt: str, subtype: str | None = None) -> bytes:
    """`x` written with soundfile into an in-memory file."""
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def encode_mp3(x: F32, rate: int, tmp_path: Path) -> bytes:
    """`x` as MP3 (the soundfile wheel's libsndfile writes MP3 since 1.1)."""
    return encode(x, rate, "MP3", "MPEG_LAYER_III")


def decode(data: bytes, **kwargs: Any) -> F32:
    """`decode_audio` at 16 kHz with a generous 30 s limit unless overridden."""
    args: dict[str, Any] = {"sample_rate": TARGET, "max_seconds": 30.0} | kwargs
    return decode_audio(data, **args)


def rejects(data: bytes, error: type[ServiceError], status: int, **kwargs: Any) -> str:
    """Assert decoding `data` raises `error` with HTTP `status`; return the message."""
    with pytest.raises(error) as info:
        decode(data, **kwargs)
    assert type(info.value) is error
    assert info.value.status == status
    return info.value.message


def corr(a: F32, b: F32) -> float:
    """Pearson correlation of the common prefix of `a` and `b`."""
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


def aligned(y: F32, ref: F32, max_lag: int) -> tuple[float, int]:
    """The Pearson correlation of `y` and `ref` at the lag (|lag| <= `max_lag` samples) that
    maximises their cross-correlation, and that lag (positive: `y` starts later). Lossy codecs
    add priming samples (MP3's encoder delay and decoder padding), which a correlation of
    unaligned prefixes would take for distortion."""
    size = 1 << int(np.ceil(np.log2(len(y) + len(ref))))
    cross = np.fft.irfft(np.fft.rfft(y, size) * np.conj(np.fft.rfft(ref, size)), size)
    lags = np.r_[np.arange(0, max_lag + 1), np.arange(-max_lag, 0)]
    lag = int(lags[np.argmax(cross[lags])])
    shifted = (y[lag:], ref) if lag >= 0 else (y, ref[-lag:])
    return corr(*shifted), lag


def check_shape(y: F32) -> None:
    """The output contract: float32, 1-D, C-contiguous, non-empty, finite."""
    assert y.dtype == np.float32
    assert y.ndim == 1
    assert y.flags.c_contiguous
    assert y.size > 0
    assert np.isfinite(y).all()


def wav_with_data_size(x: F32, rate: int, claimed: int, *, riff_too: bool) -> bytes:
    """A 16-bit WAV whose data chunk (and optionally RIFF chunk) claims `claimed` bytes."""
    data = bytearray(encode(x, rate, "WAV", "PCM_16"))
    pos = data.index(b"data")
    struct.pack_into("<I", data, pos + 4, claimed)
    if riff_too:
        struct.pack_into("<I", data, 4, claimed + pos + 8 - 8)
    return bytes(data)


# ---------------------------------------------------------------------------------------------
# formats


@pytest.mark.parametrize(
    ("fmt", "subtype"),
    [
        ("WAV", "PCM_U8"),
        ("WAV", "PCM_16"),
        ("WAV", "PCM_24"),
        ("WAV", "PCM_32"),
        ("WAV", "FLOAT"),
        ("WAV", "DOUBLE"),
        ("FLAC", "PCM_16"),
        ("FLAC", "PCM_24"),
    ],
)
def test_lossless_formats_round_trip(speech: tuple[F32, int], fmt: str, subtype: str) -> None:
    x, rate = speech
    y = decode(encode(x, rate, fmt, subtype))
    check_shape(y)
    ref = at_rate(x, rate, TARGET)
    assert abs(len(y) - len(ref)) <= 1
    assert corr(y, ref) > 0.99


@pytest.mark.parametrize(
    ("fmt", "subtype", "rate"),
    [("OGG", "VORBIS", 22050), ("OGG", "OPUS", 48000), ("MP3", None, 22050)],
)
def test_lossy_formats_decode(
    speech: tuple[F32, int], tmp_path: Path, fmt: str, subtype: str | None, rate: int
) -> None:
    x, rate_x = speech
    src = at_rate(x, rate_x, rate)
    data = encode_mp3(src, rate, tmp_path) if fmt == "MP3" else encode(src, rate, fmt, subtype)
    y = decode(data)
    check_shape(y)
    ref = at_rate(src, rate, TARGET)
    # Codec padding/priming may add up to ~0.1 s; the rest must match within 3 %.
    assert abs(len(y) - len(ref)) <= 0.03 * len(ref) + 0.1 * TARGET
    rms_ratio = float(np.sqrt(np.mean(y**2)) / np.sqrt(np.mean(ref**2)))
    assert 0.7 < rms_ratio < 1.4
    similarity, lag = aligned(y, ref, max_lag=TARGET // 10)
    assert abs(lag) <= 0.06 * TARGET  # priming: MP3's ~1100-sample encoder delay at most
    assert similarity > 0.9
    if fmt != "MP3":  # Vorbis and Opus trim their priming: samples line up as they are
        assert lag == 0


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_resampling_gives_the_right_length(speech: tuple[F32, int], rate: int) -> None:
    x, rate_x = speech
    src = at_rate(x, rate_x, rate)
    y = decode(encode(src, rate, "WAV", "FLOAT"))
    check_shape(y)
    expected = len(src) * TARGET / rate
    assert abs(len(y) - expected) <= 1
    assert corr(y, at_rate(src, rate, TARGET)) > 0.999


def test_same_rate_is_not_resampled(speech: tuple[F32, int]) -> None:
    x, rate = speech
    y = decode(encode(x, rate, "WAV", "FLOAT"), sample_rate=rate)
    np.testing.assert_array_equal(y, x)


def test_stereo_identical_channels_downmix_to_the_signal(speech: tuple[F32, int]) -> None:
    x, rate = speech
    y = decode(encode(np.stack([x, x], axis=1), rate, "WAV", "FLOAT"), sample_rate=rate)
    check_shape(y)
    np.testing.assert_allclose(y, x, atol=1e-6)


def test_stereo_opposite_channels_cancel(speech: tuple[F32, int]) -> None:
    x, rate = speech
    y = decode(encode(np.stack([x, -x], axis=1), rate, "WAV", "FLOAT"))
    check_shape(y)
    assert float(np.abs(y).max()) < 1e-6


def test_more_channels_allowed_when_the_limit_allows(speech: tuple[F32, int]) -> None:
    x, rate = speech
    y = decode(encode(np.tile(x[:, None], (1, 8)), rate, "WAV", "PCM_16"), max_channels=8)
    check_shape(y)
    assert corr(y, at_rate(x, rate, TARGET)) > 0.99


def test_probe_duration_reads_the_header(speech: tuple[F32, int]) -> None:
    x, rate = speech
    assert probe_duration(encode(x, rate, "FLAC")) == pytest.approx(len(x) / rate)
    with pytest.raises(UnsupportedMediaType):
        probe_duration(b"not audio at all " * 10)
    with pytest.raises(BadAudio):
        probe_duration(b"")


# ---------------------------------------------------------------------------------------------
# bad input


def test_empty_input_is_bad_audio() -> None:
    assert "empty" in rejects(b"", BadAudio, 400)


def test_random_bytes_are_unsupported() -> None:
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    message = rejects(noise, UnsupportedMediaType, 400)
    assert "not audio in a supported format" in message
    assert "WAV" in message
    assert "MP3" in message


def test_text_file_is_unsupported() -> None:
    text = b"Minutes of the meeting\n\n1. Budget approved.\n2. Next meeting Tuesday.\n" * 20
    rejects(text, UnsupportedMediaType, 400)


def test_truncated_wav_header_is_bad_audio(speech: tuple[F32, int]) -> None:
    # RIFF/WAVE is recognised, so a cut-off header is corrupt audio (400), not a wrong type.
    x, rate = speech
    wav = encode(x, rate, "WAV", "PCM_16")
    assert "corrupt" in rejects(wav[:20], BadAudio, 400)


def test_wav_with_no_frames_is_bad_audio(speech: tuple[F32, int]) -> None:
    x, rate = speech
    assert "no samples" in rejects(encode(x[:0], rate, "WAV", "PCM_16"), BadAudio, 400)


@pytest.mark.parametrize("riff_too", [False, True])
def test_header_claiming_gigabytes_does_not_allocate_them(
    speech: tuple[F32, int], riff_too: bool
) -> None:
    x, rate = speech
    short = x[: rate // 10]
    data = wav_with_data_size(short, rate, 0x7FFFFFF0, riff_too=riff_too)
    outcome: F32 | ServiceError
    tracemalloc.start()
    try:
        try:
            outcome = decode(data)
        except (BadAudio, PayloadTooLarge) as exc:  # acceptable; MemoryError etc. are not
            outcome = exc
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20
    # libsndfile 1.2 clamps the claim to the bytes present, so the 0.1 s that is there decodes;
    # another libsndfile may refuse the file instead, which is fine as long as it is 400/413.
    if isinstance(outcome, ServiceError):
        assert outcome.status in (400, 413)
    else:
        check_shape(outcome)
        assert abs(len(outcome) - len(short) * TARGET / rate) <= 1


def test_nan_samples_are_bad_audio(speech: tuple[F32, int]) -> None:
    x, rate = speech
    y = x.copy()
    y[len(y) // 2] = np.nan
    assert "NaN or infinite" in rejects(encode(y, rate, "WAV", "FLOAT"), BadAudio, 400)


def test_infinite_samples_in_one_channel_are_bad_audio(speech: tuple[F32, int]) -> None:
    x, rate = speech
    stereo = np.stack([x, x], axis=1).astype(np.float64)
    stereo[100, 1] = np.inf
    rejects(encode(stereo, rate, "WAV", "DOUBLE"), BadAudio, 400)


@pytest.mark.parametrize("rate", [1, 384000])
def test_sample_rate_out_of_range_is_bad_audio(speech: tuple[F32, int], rate: int) -> None:
    x, _ = speech
    message = rejects(encode(x[:4000], rate, "WAV", "PCM_16"), BadAudio, 400)
    assert f"{rate} Hz" in message
    assert "between 4000 and 192000 Hz" in message


def test_too_many_channels_is_bad_audio(speech: tuple[F32, int]) -> None:
    x, rate = speech
    data = encode(np.tile(x[:, None], (1, 8)), rate, "WAV", "PCM_16")
    assert "8 channels" in rejects(data, BadAudio, 400, max_channels=2)


def test_single_sample_at_the_target_rate_decodes() -> None:
    # One frame is valid audio: at the target rate it decodes to a one-sample array.
    y = decode(encode(np.array([0.25], np.float32), TARGET, "WAV", "FLOAT"))
    check_shape(y)
    assert y.tolist() == [0.25]


def test_single_sample_that_resamples_to_nothing_is_bad_audio() -> None:
    # At 48 kHz one frame is shorter than one 16 kHz sample: nothing to return, so 400.
    data = encode(np.array([0.25], np.float32), 48000, "WAV", "FLOAT")
    assert "too short" in rejects(data, BadAudio, 400)


def test_audio_over_the_limit_is_payload_too_large(speech: tuple[F32, int]) -> None:
    x, rate = speech
    three_s = np.resize(x, 3 * rate)
    message = rejects(encode(three_s, rate, "FLAC"), PayloadTooLarge, 413, max_seconds=2)
    assert message == "audio is 3.0 s long; the limit is 2 s"


def test_audio_exactly_at_the_limit_is_accepted(speech: tuple[F32, int]) -> None:
    x, rate = speech
    y = decode(encode(np.resize(x, 2 * rate), rate, "FLAC"), max_seconds=2)
    assert len(y) == 2 * TARGET


def test_length_is_rechecked_while_decoding(
    speech: tuple[F32, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A header that under-reports the length must not get past the limit.
    x, rate = speech
    data = encode(np.resize(x, 3 * rate), rate, "WAV", "PCM_16")
    monkeypatch.setattr(sf.SoundFile, "frames", property(lambda self: 1))
    message = rejects(data, PayloadTooLarge, 413, max_seconds=2)
    assert message.startswith("audio is at least 2.")
    assert message.endswith("the limit is 2 s")


def test_mp3_with_garbage_tail_keeps_the_audio(
    speech: tuple[F32, int], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # mpg123 resyncs past (or stops at) the junk: the original audio decodes.
    x, rate = speech
    mp3 = encode_mp3(x, rate, tmp_path)
    clean = decode(mp3)
    junk = np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    y = decode(mp3 + junk)
    check_shape(y)
    assert abs(len(y) - len(clean)) <= 0.05 * len(clean)
    assert corr(y, clean) > 0.99
    capfd.readouterr()  # mpg123 complains on stderr; keep it out of the test report


def test_flac_with_damaged_tail_keeps_what_decoded(speech: tuple[F32, int]) -> None:
    x, rate = speech
    long = np.resize(x, 2 * rate)
    flac = encode(long, rate, "FLAC")
    y = decode(flac[: len(flac) // 2])
    check_shape(y)
    assert 0 < len(y) < 2 * TARGET
    assert corr(y, at_rate(long, rate, TARGET)) > 0.99


def test_flac_with_garbage_body_is_bad_audio(speech: tuple[F32, int]) -> None:
    x, rate = speech
    flac = encode(x, rate, "FLAC")
    first_frame = flac.index(b"\xff\xf8")  # frame sync code: everything before is metadata
    garbage = os.urandom(len(flac) - first_frame).replace(b"\xff", b"\x00")
    rejects(flac[:first_frame] + garbage, BadAudio, 400)


def test_bad_arguments_are_a_caller_bug() -> None:
    calls: list[Callable[[], object]] = [
        lambda: decode_audio(b"x", sample_rate=0, max_seconds=1),
        lambda: decode_audio(b"x", sample_rate=16000, max_seconds=0),
        lambda: decode_audio(b"x", sample_rate=16000, max_seconds=1, max_channels=0),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="need sample_rate"):
            call()


# ---------------------------------------------------------------------------------------------
# recorded containers (PyAV) and the allow-list


@pytest.mark.parametrize("kind", sorted(media.KINDS))
def test_recorded_containers_decode(speech: tuple[F32, int], kind: str) -> None:
    x, rate = speech
    y = decode(media.record_as(x, rate, kind))
    check_shape(y)
    ref = at_rate(x, rate, TARGET)
    lag = int(np.argmax(np.correlate(y[: len(ref) // 2], ref[: len(ref) // 4], mode="valid")))
    assert lag <= 2048 * TARGET // 16000  # at most two AAC frames of priming
    n = min(len(ref), len(y) - lag)
    assert n >= 0.95 * len(ref)
    assert corr(y[lag : lag + n], ref[:n]) > 0.98


def test_container_duration_is_checked_before_decoding(
    speech: tuple[F32, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    x, rate = speech
    mp4 = media.record_as(np.resize(x, 3 * rate), rate, "mp4-video-aac")

    def no_decoding(*_: object) -> None:
        raise AssertionError("decoded a file whose container declares it too long")

    monkeypatch.setattr(av.Packet, "decode", no_decoding)
    message = rejects(mp4, PayloadTooLarge, 413, max_seconds=2)
    assert message.startswith("audio is 3.")  # the declared length, not "at least"
    assert probe_duration(mp4) == pytest.approx(3.0, abs=0.1)


def test_stream_without_a_length_is_capped_while_decoding(speech: tuple[F32, int]) -> None:
    # MediaRecorder's WebM (written live) declares no duration: the limit holds while decoding
    x, rate = speech
    live = media.record_as(np.resize(x, 4 * rate), rate, "webm-opus", live=True)
    assert probe_duration(live) == float("inf")
    message = rejects(live, PayloadTooLarge, 413, max_seconds=2)
    assert message.startswith("audio is at least 2.")
    assert len(decode(live, max_seconds=5)) == pytest.approx(4 * TARGET, abs=0.03 * TARGET)


def test_decoding_holds_the_result_not_the_source(speech: tuple[F32, int]) -> None:
    # 40 s of 48 kHz Opus with no declared length: the result at 16 kHz is 2.6 MB, the decoded
    # source would be 7.7 MB; decoding holds the result's chunks and their join (2x) at most
    x, rate = speech
    data = media.record_as(np.resize(x, 40 * rate), rate, "webm-opus", live=True)
    tracemalloc.start()
    try:
        y = decode(data, max_seconds=60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < y.nbytes * 2 + 2**20


def test_damaged_webm_tail_keeps_what_decoded(speech: tuple[F32, int]) -> None:
    x, rate = speech
    webm = media.record_as(np.resize(x, 2 * rate), rate, "webm-opus")
    y = decode(webm[: len(webm) // 2])
    check_shape(y)
    assert 0.5 * TARGET < len(y) < 1.5 * TARGET


@pytest.mark.parametrize(
    "fmt", ["AIFF", "AU", "NIST", "IRCAM", "HTK", "MAT5", "MAT4", "VOC", "W64", "CAF", "PAF"]
)
def test_containers_off_the_allow_list_reach_no_parser(
    speech: tuple[F32, int], fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, rate = speech
    data = encode(x, rate, fmt, "PCM_16")

    def parser(*_: object, **__: object) -> None:
        raise AssertionError(f"{fmt} was handed to a parser")

    monkeypatch.setattr(sf, "SoundFile", parser)
    monkeypatch.setattr(av, "open", parser)
    assert "not audio in a supported format" in rejects(data, UnsupportedMediaType, 400)


def test_sniffing_names_each_allowed_container(speech: tuple[F32, int], tmp_path: Path) -> None:
    x, rate = speech
    found = {
        kind: sniff(io.BytesIO(media.record_as(x, rate, kind))) for kind in sorted(media.KINDS)
    }
    assert found == {
        "adts-aac": "aac",
        "m4a-aac": "mp4",
        "mp4-video-aac": "mp4",
        "ogg-opus": "ogg",
        "webm-opus": "webm",
    }
    assert sniff(io.BytesIO(encode(x, rate, "WAV", "PCM_16"))) == "wav"
    assert sniff(io.BytesIO(encode(x, rate, "FLAC"))) == "flac"
    assert sniff(io.BytesIO(encode_mp3(x, rate, tmp_path))) == "mp3"
