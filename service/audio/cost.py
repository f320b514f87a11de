"""What decoding an upload will cost, read from its container header before any sample is.

Admission needs two figures before it decodes: how many seconds of audio the upload will hold
in memory once decoded (`seconds`), and how long decoding will take (`work_seconds`), which
decides its decode lane and the wait it adds for the uploads behind it. A 2.4 MB FLAC of
silence can declare an hour at 192 kHz: 13 s of decoding and 230 MB decoded, which its size
alone would never suggest. Where the header says nothing (a format libsndfile does not read,
an MP3 without a length), the size gives a bound instead.
"""

import dataclasses
import io
from typing import BinaryIO, Final

import soundfile as sf

_UNKNOWN_FRAMES: Final = 0x7FFF_FFFF_FFFF_FFFF  # libsndfile's frame count for "unknown"
MIN_BITRATE: Final = 6_000
"""Lowest bit rate (bit/s) assumed for a file whose header gives no length (Opus goes to 6 kbit/s):
its duration is at most size * 8 / MIN_BITRATE seconds."""
SAMPLES_PER_BYTE: Final = 12
"""Decoded samples per encoded byte assumed without a header (MP3 at 128 kbit/s, 44.1 kHz stereo
gives 5.5; 12 leaves room)."""
# Decoding time on the 2-core CI machine (service/audio/decode.py, 0.25 s blocks): about 0.9 ms
# per second of audio (the per-block work) plus 1 s per 80 M input samples; the gate corrects
# these by what it measures.
SECONDS_PER_AUDIO_SECOND: Final = 0.0009
SECONDS_PER_SAMPLE: Final = 1 / 80e6


@dataclasses.dataclass(frozen=True)
class DecodeEstimate:
    """An upload's expected decoded duration (capped by the duration limit) and decode time."""

    seconds: float
    input_samples: int
    from_header: bool

    @property
    def work_seconds(self) -> float:
        """Expected decoding time (before the gate's measured correction)."""
        return self.seconds * SECONDS_PER_AUDIO_SECOND + self.input_samples * SECONDS_PER_SAMPLE


def estimate_decode(file: BinaryIO, max_seconds: float) -> DecodeEstimate:
    """Read the header of `file` (a seekable upload) and estimate; leaves it at offset 0.

    Never raises for a bad file: decoding reports that properly; the estimate then falls back
    to the file's size.
    """
    file.seek(0, io.SEEK_END)
    size = file.tell()
    file.seek(0)
    try:
        with sf.SoundFile(file) as f:
            frames, rate, channels = int(f.frames), int(f.samplerate), int(f.channels)
    except Exception:  # unreadable here means "no header figures", not an error
        frames, rate, channels = _UNKNOWN_FRAMES, 0, 0
    finally:
        file.seek(0)
    if frames != _UNKNOWN_FRAMES and rate > 0:
        seconds = min(frames / rate, max_seconds)
        return DecodeEstimate(seconds, int(seconds * rate) * max(1, channels), True)
    seconds = min(size * 8 / MIN_BITRATE, max_seconds)
    return DecodeEstimate(seconds, size * SAMPLES_PER_BYTE, False)
