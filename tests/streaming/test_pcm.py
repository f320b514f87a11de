"""PcmDecoder: frame checks, conversion, and resampling that does not depend on chunking."""

import numpy as np
import pytest
import soxr

from service.streaming.pcm import BadFrame, PcmDecoder, PcmEncoding


def speechy(n: int, rate: int, seed: int = 0) -> np.ndarray:
    """A chirp plus noise, float32 in [-1, 1]: energy across the band, so resampling shows."""
    t = np.arange(n) / rate
    noise = np.random.default_rng(seed).normal(size=n)
    x = 0.5 * np.sin(2 * np.pi * (100 + 1500 * t) * t) + 0.1 * noise
    return np.clip(x, -1, 1).astype(np.float32)


def encode(x: np.ndarray, encoding: PcmEncoding) -> tuple[bytes, np.ndarray]:
    """The bytes a client sends for `x`, and the float32 samples they stand for."""
    if encoding == "pcm_s16le":
        ints = np.round(x * 32767).astype("<i2")
        return ints.tobytes(), ints.astype(np.float32) / 32768
    return x.astype("<f4").tobytes(), x


def feed_in_chunks(decoder: PcmDecoder, data: bytes, rng: np.random.Generator) -> np.ndarray:
    """Feed `data` in random whole-sample chunks (empty ones too), then flush."""
    width = 2 if decoder.encoding == "pcm_s16le" else 4
    parts = []
    i = 0
    while i < len(data):
        n = int(rng.integers(0, 700)) * width
        parts.append(decoder.feed(data[i : i + n]))
        i += n
    parts.append(decoder.flush())
    return np.concatenate(parts)


def test_s16_is_scaled_to_plus_minus_one() -> None:
    decoder = PcmDecoder("pcm_s16le", 16_000, 16_000)
    out = decoder.feed(np.array([0, 16384, -32768, 32767, -1], dtype="<i2").tobytes())
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [0.0, 0.5, -1.0, 32767 / 32768, -1 / 32768])
    assert decoder.flush().size == 0


def test_f32_passes_through_at_the_same_rate() -> None:
    decoder = PcmDecoder("f32le", 16_000, 16_000)
    x = speechy(1000, 16_000)
    out = decoder.feed(x.astype("<f4").tobytes())
    np.testing.assert_array_equal(out, x)
    out[0] = 5.0  # the result is the caller's to keep and change
    empty = decoder.feed(b"")
    assert empty.dtype == np.float32
    assert empty.size == 0


@pytest.mark.parametrize(
    ("encoding", "rate"), [("pcm_s16le", 44_100), ("f32le", 8_000), ("pcm_s16le", 48_000)]
)
def test_chunked_stream_equals_whole_stream(encoding: PcmEncoding, rate: int) -> None:
    data, samples = encode(speechy(rate * 2 + 13, rate), encoding)
    decoder = PcmDecoder(encoding, rate, 16_000)
    whole = np.concatenate([decoder.feed(data), decoder.flush()])
    assert abs(whole.size - samples.size * 16_000 / rate) <= 1
    # the same signal as the upload path's one-shot resampling (soxr HQ)
    reference = soxr.resample(samples, rate, 16_000, quality="HQ")
    np.testing.assert_allclose(whole, reference, rtol=0, atol=1e-6)
    for seed in range(3):
        chunked = feed_in_chunks(
            PcmDecoder(encoding, rate, 16_000), data, np.random.default_rng(seed)
        )
        assert chunked.dtype == np.float32
        np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-6)


def test_flush_resets_for_a_new_stream() -> None:
    decoder = PcmDecoder("f32le", 22_050, 16_000)
    data, _ = encode(speechy(22_050, 22_050), "f32le")
    first = np.concatenate([decoder.feed(data), decoder.flush()])
    second = np.concatenate([decoder.feed(data), decoder.flush()])
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize(
    ("encoding", "frame", "message"),
    [
        ("pcm_s16le", b"\x00\x01\x02", r"3 bytes.*pcm_s16le"),
        ("f32le", b"\x00" * 6, r"6 bytes.*f32le"),
        ("f32le", np.array([0.0, np.nan], "<f4").tobytes(), r"NaN"),
        ("f32le", np.array([np.inf], "<f4").tobytes(), r"infinity"),
        ("f32le", np.array([0.5, -1000.0], "<f4").tobytes(), r"up to 1000"),
    ],
)
def test_bad_frames_are_refused_and_the_stream_goes_on(
    encoding: PcmEncoding, frame: bytes, message: str
) -> None:
    good, _ = encode(speechy(1600, 16_000), encoding)
    clean = PcmDecoder(encoding, 16_000, 8_000)
    expected = np.concatenate([clean.feed(good), clean.feed(good), clean.flush()])
    decoder = PcmDecoder(encoding, 16_000, 8_000)
    first = decoder.feed(good)
    with pytest.raises(BadFrame, match=message):
        decoder.feed(frame)
    out = np.concatenate([first, decoder.feed(good), decoder.flush()])
    np.testing.assert_array_equal(out, expected)
    assert issubclass(BadFrame, ValueError)


def test_float_overshoot_up_to_the_limit_is_accepted() -> None:
    decoder = PcmDecoder("f32le", 16_000, 16_000)
    out = decoder.feed(np.array([1.5, -16.0], "<f4").tobytes())
    np.testing.assert_array_equal(out, [1.5, -16.0])


@pytest.mark.parametrize(
    ("encoding", "rate", "target", "message"),
    [
        ("pcm_s16le", 3_999, 16_000, "sample rate is 3999 Hz"),
        ("pcm_s16le", 192_001, 16_000, "sample rate is 192001 Hz"),
        ("f32le", 16_000, 0, "target_rate"),
        ("mp3", 16_000, 16_000, "unknown PCM encoding 'mp3'"),
    ],
)
def test_invalid_configuration(encoding: str, rate: int, target: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PcmDecoder(encoding, rate, target)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("encoding", "codes", "linear"),
    [  # ITU-T G.711 reference points: zero, the smallest steps, full scale
        ("g711_ulaw", [0xFF, 0x7F, 0xFE, 0x7E, 0x80, 0x00], [0, 0, 8, -8, 32124, -32124]),
        ("g711_alaw", [0xD5, 0x55, 0xD4, 0xAA, 0x2A], [8, -8, 24, 32256, -32256]),
    ],
)
def test_g711_codes_decode_to_the_standard_levels(
    encoding: PcmEncoding, codes: list[int], linear: list[int]
) -> None:
    decoder = PcmDecoder(encoding, 8_000, 8_000)
    out = decoder.feed(bytes(codes))
    assert out.tolist() == [v / 32768 for v in linear]
    every = decoder.feed(bytes(range(256))) * 32768
    assert len(set(every.tolist())) == (255 if encoding == "g711_ulaw" else 256)  # mu-law: +-0
    positive = np.sort(every[every > 0])
    assert np.all(np.diff(positive) > 0)
    assert np.array_equal(np.sort(-every[every < 0]), positive)  # symmetric
