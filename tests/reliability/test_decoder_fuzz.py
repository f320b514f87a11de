"""Fuzzing `service.audio.decode_audio` with Hypothesis: random bytes, and valid files in every
supported container with bit flips, truncations, corrupted header fields, splices and junk.

Whatever the bytes, only two outcomes are allowed: a float32 mono signal within the limits, or
one of the service's errors with a 4xx status. Anything else (another exception, a hang, a large
allocation) would be a 500, a stuck worker thread or an out-of-memory kill in the server.
Derandomized with a bounded number of examples, so CI runs the same inputs every time.
"""

import functools
import math
import struct
import time
import tracemalloc

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from service.audio import decode_audio, probe_duration
from service.audio.decode import MAX_SAMPLE_MAGNITUDE
from service.errors import ServiceError
from tests.conftest import encode

TARGET = 16_000
MAX_SECONDS = 5.0
MAX_CHANNELS = 2
CALL_SECONDS = 2.0  # a decode slower than this on a few kB of input is a hang in the making
PEAK_BYTES = 32 * 2**20  # no input here may make the decoder allocate more

FUZZ = settings(
    max_examples=250,
    deadline=None,  # the per-call bound below is explicit, and ignores the first-call warm-up
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@functools.cache
def seeds() -> dict[str, bytes]:
    """Short valid files (0.2 s of a chirp with a little noise) in every supported container."""

    def signal(rate: int, channels: int) -> npt.NDArray[np.float32]:
        t = np.arange(int(0.2 * rate)) / rate
        x = 0.3 * np.sin(2 * np.pi * (200 + 2000 * t) * t)
        x += 0.01 * np.random.default_rng(rate).standard_normal(t.size)
        stacked = np.stack([x * (1 - 0.3 * c) for c in range(channels)], axis=1)
        return stacked.astype(np.float32).squeeze()

    return {
        "wav-pcm16": encode(signal(16_000, 1), 16_000, "WAV", "PCM_16"),
        "wav-pcm24-stereo": encode(signal(44_100, 2), 44_100, "WAV", "PCM_24"),
        "wav-u8": encode(signal(8_000, 1), 8_000, "WAV", "PCM_U8"),
        "wav-float": encode(signal(22_050, 1), 22_050, "WAV", "FLOAT"),
        "wav-double-stereo": encode(signal(16_000, 2), 16_000, "WAV", "DOUBLE"),
        "flac": encode(signal(16_000, 1), 16_000, "FLAC", "PCM_16"),
        "flac-stereo": encode(signal(48_000, 2), 48_000, "FLAC", "PCM_24"),
        "ogg-vorbis": encode(signal(16_000, 1), 16_000, "OGG", "VORBIS"),
        "ogg-opus": encode(signal(48_000, 2), 48_000, "OGG", "OPUS"),
        "mp3": encode(signal(22_050, 1), 22_050, "MP3", "MPEG_LAYER_III"),
    }


def check_outcome(data: bytes) -> str:
    """Decode (and probe) `data`: a good signal or a 4xx `ServiceError`, quickly and in bounded
    memory; nothing else. Returns what happened, for Hypothesis' statistics."""
    audio: npt.NDArray[np.float32] | None = None
    error: ServiceError | None = None
    tracemalloc.start()
    started = time.perf_counter()
    try:
        try:
            audio = decode_audio(
                data, sample_rate=TARGET, max_seconds=MAX_SECONDS, max_channels=MAX_CHANNELS
            )
        except ServiceError as exc:
            error = exc
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < CALL_SECONDS, f"decode took {elapsed:.2f} s"
    assert peak < PEAK_BYTES, f"decode allocated {peak / 2**20:.0f} MiB"
    if error is not None:
        assert 400 <= error.status < 500, (error.status, error.message)
        assert error.message
    else:
        assert isinstance(audio, np.ndarray)
        assert audio.dtype == np.float32
        assert audio.ndim == 1
        assert audio.flags.c_contiguous
        assert 1 <= audio.size <= math.ceil(MAX_SECONDS * TARGET) + 1
        assert np.isfinite(audio).all()
        assert np.abs(audio).max() <= 4 * MAX_SAMPLE_MAGNITUDE  # resampling may overshoot a bit
    probe_error: ServiceError | None = None
    try:
        duration = probe_duration(data)
    except ServiceError as exc:
        probe_error = exc
    if probe_error is not None:
        assert 400 <= probe_error.status < 500, (probe_error.status, probe_error.message)
    else:
        assert duration >= 0  # inf when the header has no length
    return "decoded" if error is None else f"rejected: {error.status} {error.code}"


def test_every_seed_decodes() -> None:
    # the mutations below start from good files: make sure they are
    for name, data in seeds().items():
        audio = decode_audio(data, sample_rate=TARGET, max_seconds=MAX_SECONDS)
        assert abs(audio.size / TARGET - 0.2) < 0.06, name
        assert check_outcome(data) == "decoded", name


MAGIC = (b"RIFF\x24\x00\x00\x00WAVEfmt ", b"fLaC", b"OggS\x00\x02", b"ID3\x03\x00", b"\xff\xfb")


@pytest.mark.timeout(120)
@FUZZ
@given(
    st.one_of(
        st.binary(max_size=4096),
        st.tuples(st.sampled_from(MAGIC), st.binary(max_size=4096)).map(b"".join),
    )
)
def test_random_bytes(data: bytes) -> None:
    event(check_outcome(data))


@st.composite
def mutated(draw: st.DrawFn, seed: str) -> bytes:
    """The `seed` file damaged by one to three of: bit flips (anywhere, or in the header),
    truncation, a 16/32-bit header field overwritten with an edge value, random bytes spliced
    in, a slice duplicated, junk appended."""
    data = bytearray(seeds()[seed])
    for _ in range(draw(st.integers(1, 3))):
        size = len(data)
        kind = draw(
            st.sampled_from(["flip", "header-flip", "truncate", "field", "splice", "dup", "tail"])
        )
        if size == 0:
            kind = "tail"
        if kind in ("flip", "header-flip"):
            top = size if kind == "flip" else min(size, 96)
            for position in draw(st.lists(st.integers(0, top - 1), min_size=1, max_size=16)):
                data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[draw(st.integers(0, size - 1)) :]
        elif kind == "field":
            width = draw(st.sampled_from([2, 4]))
            if size < width:
                continue
            offset = draw(st.integers(0, min(size, 96) - width))
            edge = [0, 1, 2**15 - 1, 2**15, 2 ** (8 * width) - 1, 2 ** (8 * width - 1) - 1]
            value = draw(st.one_of(st.sampled_from(edge), st.integers(0, 2 ** (8 * width) - 1)))
            data[offset : offset + width] = struct.pack("<H" if width == 2 else "<I", value)
        elif kind == "splice":
            at = draw(st.integers(0, size))
            data[at:at] = draw(st.binary(min_size=1, max_size=256))
        elif kind == "dup":
            start = draw(st.integers(0, size - 1))
            end = draw(st.integers(start + 1, min(size, start + 4096)))
            data[end:end] = data[start:end]
        else:
            data += draw(st.binary(min_size=1, max_size=1024))
    return bytes(data)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", sorted(seeds()))
@FUZZ
@given(data=st.data())
def test_mutated_files(seed: str, data: st.DataObject) -> None:
    event(check_outcome(data.draw(mutated(seed), label="file")))
