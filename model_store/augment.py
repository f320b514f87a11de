"""Recording-condition augmentation for the second-edition corpus: each function takes and returns
float32 mono audio at 16 kHz (peak within [-1, 1] unless stated) and is deterministic given its
`numpy.random.Generator`.

Synthetic speech is clean, close-miked and perfectly level; speech a service receives is not.
These transforms cover what differs: other speakers (speed / vocal-tract-length resampling),
rooms (reverberation from simulated impulse responses), background noise (coloured noise, mains
hum, babble made from other utterances), channels (telephone band and mu-law, lossy MP3 / Opus
round trips), levels (gain, clipping) and the silence or noise around an utterance.
`augment` draws a random chain of them; everything here runs at corpus time (the expensive parts:
codecs and convolution) so training reads finished audio.
"""

import io
from collections.abc import Sequence
from typing import cast

import av
import numpy as np
import numpy.typing as npt
import soxr
from av.audio.stream import AudioStream
from scipy import signal

SAMPLE_RATE = 16_000
Audio = npt.NDArray[np.float32]


def _f32(x: npt.ArrayLike) -> Audio:
    return np.ascontiguousarray(x, dtype=np.float32)


def rms(audio: Audio) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0


def resample_perturb(audio: Audio, factor: float) -> Audio:
    """Play the clip `factor` times faster: tempo, pitch and formants all scale together, like a
    speaker with a shorter (factor > 1) or longer vocal tract. The cheapest way to new voices."""
    if factor <= 0:
        raise ValueError("factor must be positive")
    return _f32(soxr.resample(audio, SAMPLE_RATE * factor, SAMPLE_RATE))


def room_impulse_response(rng: np.random.Generator, rt60: float) -> Audio:
    """A synthetic room: a direct path, a few early reflections and an exponentially decaying
    noise tail reaching -60 dB after `rt60` seconds, with a direct-to-reverberant ratio of -5 to
    +10 dB, low-passed a little (walls absorb the highs)."""
    length = max(int(rt60 * SAMPLE_RATE), 64)
    t = np.arange(length) / SAMPLE_RATE
    tail = rng.normal(0, 1, length) * np.exp(-6.9 * t / rt60)
    tail[: int(0.003 * SAMPLE_RATE)] = 0.0  # the tail starts after the direct sound
    drr_db = rng.uniform(-5, 10)
    ir = tail * np.sqrt(10 ** (-drr_db / 10) / float(np.sum(tail**2)))
    ir[0] = 1.0
    for _ in range(rng.integers(2, 6)):
        at = rng.integers(int(0.002 * SAMPLE_RATE), min(length, int(0.03 * SAMPLE_RATE)))
        ir[at] += rng.uniform(-0.6, 0.6)
    b, a = signal.butter(1, rng.uniform(3000, 7500), fs=SAMPLE_RATE)
    return _f32(signal.lfilter(b, a, ir))


def reverberate(audio: Audio, ir: Audio) -> Audio:
    """Convolve with an impulse response; the level is restored to the dry peak."""
    wet = signal.fftconvolve(audio, ir)[: len(audio) + len(ir) // 2]
    peak = float(np.abs(wet).max()) or 1.0
    return _f32(wet * (float(np.abs(audio).max()) / peak))


def coloured_noise(rng: np.random.Generator, n: int, colour: str) -> Audio:
    """Unit-RMS noise: `white`, `pink` (1/f), `brown` (1/f²) or `hum` (mains 50/60 Hz and
    harmonics with a little white noise)."""
    if n <= 0:
        return np.zeros(0, np.float32)
    if colour == "hum":
        t = np.arange(n) / SAMPLE_RATE
        base = rng.choice((50.0, 60.0))
        out = sum(
            rng.uniform(0.2, 1.0) / k * np.sin(2 * np.pi * base * k * t + rng.uniform(0, 6.3))
            for k in range(1, 6)
        )
        out = np.asarray(out) + rng.normal(0, 0.05, n)
    else:
        spectrum = np.fft.rfft(rng.normal(0, 1, n))
        freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
        freqs[0] = freqs[1] if n > 1 else 1.0
        power = {"white": 0.0, "pink": 0.5, "brown": 1.0}[colour]
        out = np.fft.irfft(spectrum / freqs**power, n)
    level = rms(_f32(out)) or 1.0
    return _f32(out / level)


def babble(rng: np.random.Generator, n: int, others: Sequence[Audio], talkers: int) -> Audio:
    """Unit-RMS babble: `talkers` other utterances, looped and offset at random, summed."""
    out = np.zeros(n, np.float64)
    usable = [o for o in others if len(o) > SAMPLE_RATE // 10]
    if not usable:
        return coloured_noise(rng, n, "pink")
    for _ in range(talkers):
        source = usable[rng.integers(len(usable))]
        tiled = np.tile(source, n // len(source) + 2)
        start = int(rng.integers(len(source)))
        out += tiled[start : start + n] / (rms(source) or 1.0)
    level = rms(_f32(out)) or 1.0
    return _f32(out / level)


def add_noise(audio: Audio, noise: Audio, snr_db: float, reference: float | None = None) -> Audio:
    """Mix `noise` (same length) at `snr_db` below `reference` (default: the clip's own RMS)."""
    level = reference if reference is not None else rms(audio)
    return _f32(audio + noise * (level / 10 ** (snr_db / 20)))


def telephone(audio: Audio, rng: np.random.Generator) -> Audio:
    """A narrow-band phone channel: 300-3400 Hz, 8 kHz, 8-bit mu-law, back to 16 kHz."""
    sos = signal.butter(
        4,
        (rng.uniform(200, 400), rng.uniform(3000, 3500)),
        "bandpass",
        fs=SAMPLE_RATE,
        output="sos",
    )
    narrow = soxr.resample(signal.sosfilt(sos, audio), SAMPLE_RATE, 8000)
    peak = float(np.abs(narrow).max()) or 1.0
    x = np.clip(narrow / peak, -1, 1)
    mu = 255.0
    code = np.round((np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu) + 1) / 2 * 255)
    y = code / 255 * 2 - 1
    decoded = np.sign(y) * ((1 + mu) ** np.abs(y) - 1) / mu * peak
    return _f32(soxr.resample(decoded, 8000, SAMPLE_RATE))


def band_limit(audio: Audio, cutoff: float) -> Audio:
    """Low-pass at `cutoff` Hz (a cheap microphone, a narrow-band resampling on the way)."""
    sos = signal.butter(6, cutoff, fs=SAMPLE_RATE, output="sos")
    return _f32(signal.sosfilt(sos, audio))


def codec_round_trip(audio: Audio, codec: str, bit_rate: int) -> Audio:
    """Encode with `codec` (`mp3` or `opus`) at `bit_rate` bits/s through PyAV and decode back
    to 16 kHz mono of the same length (codec delay trimmed by cross-correlation-free padding)."""
    container, encoder, rate = {
        "mp3": ("mp3", "libmp3lame", 16_000),
        "opus": ("ogg", "libopus", 48_000),
    }[codec]
    source = soxr.resample(audio, SAMPLE_RATE, rate) if rate != SAMPLE_RATE else audio
    pcm = np.clip(source, -1, 1)
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = cast(AudioStream, out.add_stream(encoder, rate=rate))
        stream.bit_rate = bit_rate
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(_f32(pcm)[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    buf.seek(0)
    chunks = []
    with av.open(buf, "r") as inp:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        for frame in inp.decode(audio=0):
            for res in resampler.resample(frame):
                chunks.append(res.to_ndarray().reshape(-1))
        for res in resampler.resample(None):
            chunks.append(res.to_ndarray().reshape(-1))
    decoded = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    out_audio = np.zeros(len(audio), np.float32)
    # encoder priming delays the signal a few ms; keep the tail aligned to the original length
    delay = max(0, len(decoded) - len(audio)) if codec == "mp3" else 0
    delay = min(delay, int(0.06 * SAMPLE_RATE))
    piece = decoded[delay : delay + len(audio)]
    out_audio[: len(piece)] = piece
    return out_audio


def clip(audio: Audio, level: float) -> Audio:
    """Hard clipping at `level` × the peak (an overdriven input)."""
    peak = float(np.abs(audio).max()) or 1.0
    return _f32(np.clip(audio, -level * peak, level * peak))


def pad(audio: Audio, lead: Audio, tail: Audio) -> Audio:
    return _f32(np.concatenate([lead, audio, tail]))


def surround(
    audio: Audio, rng: np.random.Generator, max_seconds: float = 2.0, long_p: float = 0.4
) -> Audio:
    """Leading and trailing silence: usually short (50-400 ms), with probability `long_p` on
    each side up to `max_seconds`; digital zeros or a faint noise floor."""

    def side() -> Audio:
        seconds = rng.uniform(0.4, max_seconds) if rng.random() < long_p else rng.uniform(0.05, 0.4)
        n = int(seconds * SAMPLE_RATE)
        if rng.random() < 0.5:
            return np.zeros(n, np.float32)
        return coloured_noise(rng, n, "white") * float(10 ** rng.uniform(-5, -3.3))

    return pad(audio, side(), side())


def level(audio: Audio, peak: float) -> Audio:
    """Scale to the given peak (gain)."""
    current = float(np.abs(audio).max()) or 1.0
    return _f32(audio * (peak / current))


def augment(
    audio: Audio, rng: np.random.Generator, others: Sequence[Audio]
) -> tuple[Audio, list[str]]:
    """A random chain of recording conditions; returns the audio and the names applied.

    Order follows the physics: speaker (resampling), room (reverb), surrounding silence,
    background noise (over the whole clip, silence included), channel (band, phone, codec),
    level (gain, clipping). About a fifth of clips stay near-clean.
    """
    applied: list[str] = []
    clean = rng.random() < 0.2
    if rng.random() < 0.6:
        factor = float(rng.uniform(0.88, 1.14))
        audio = resample_perturb(audio, factor)
        applied.append(f"speed{factor:.2f}")
    if not clean and rng.random() < 0.4:
        rt60 = float(rng.uniform(0.15, 0.9))
        audio = reverberate(audio, room_impulse_response(rng, rt60))
        applied.append(f"reverb{rt60:.2f}")
    speech_level = rms(audio)
    audio = surround(audio, rng)
    if clean:
        audio = add_noise(
            audio, coloured_noise(rng, len(audio), "white"), rng.uniform(30, 50), speech_level
        )
    elif rng.random() < 0.75:
        kind = str(rng.choice(["white", "pink", "brown", "hum", "babble", "babble"]))
        noise = (
            babble(rng, len(audio), others, int(rng.integers(1, 7)))
            if kind == "babble"
            else coloured_noise(rng, len(audio), kind)
        )
        snr = float(rng.uniform(8, 30) if kind == "babble" else rng.uniform(3, 30))
        audio = add_noise(audio, noise, snr, speech_level)
        applied.append(f"{kind}{snr:.0f}dB")
    if not clean:
        channel = rng.random()
        if channel < 0.12:
            audio = telephone(audio, rng)
            applied.append("telephone")
        elif channel < 0.22:
            audio = band_limit(audio, float(rng.uniform(2500, 5500)))
            applied.append("lowpass")
        elif channel < 0.32:
            audio = codec_round_trip(audio, "mp3", int(rng.choice([16_000, 24_000, 32_000])))
            applied.append("mp3")
        elif channel < 0.42:
            audio = codec_round_trip(audio, "opus", int(rng.choice([6_000, 8_000, 12_000, 16_000])))
            applied.append("opus")
        if rng.random() < 0.06:
            audio = clip(level(audio, 1.0), float(rng.uniform(0.3, 0.7)))
            applied.append("clip")
    peak = float(10 ** rng.uniform(-1.6, -0.05))  # about -32 to -0.4 dBFS
    return level(audio, peak), applied


def noise_only(rng: np.random.Generator, seconds: float, others: Sequence[Audio]) -> Audio:
    """A clip with no speech: digital silence, a noise floor, coloured noise, hum or far babble
    (so quiet and dense that no word is intelligible); trained and scored as an empty text."""
    n = int(seconds * SAMPLE_RATE)
    kind = str(rng.choice(["zeros", "white", "pink", "brown", "hum", "babble"]))
    if kind == "zeros":
        return np.zeros(n, np.float32)
    noise = babble(rng, n, others, 8) if kind == "babble" else coloured_noise(rng, n, kind)
    if kind == "babble":
        noise = band_limit(noise, 1500.0)
    return level(noise, float(10 ** rng.uniform(-3.5, -0.5)))
