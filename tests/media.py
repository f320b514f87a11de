"""Recordings in the containers browsers and phones make, encoded at test time with PyAV.

`record_as(audio, rate, kind)` returns the bytes of a file like those MediaRecorder (WebM/Opus,
Ogg/Opus), iOS (M4A/AAC, MP4 video with an AAC track) and Android (ADTS AAC) produce.
"""

import io
from fractions import Fraction

import av
import numpy as np
import soxr

KINDS = {
    # kind: (container format, audio codec, codec rate, with a video track)
    "webm-opus": ("webm", "libopus", 48_000, False),
    "ogg-opus": ("ogg", "libopus", 48_000, False),
    "m4a-aac": ("ipod", "aac", 44_100, False),
    "mp4-video-aac": ("mp4", "aac", 48_000, True),
    "adts-aac": ("adts", "aac", 16_000, False),
}


def record_as(audio: np.ndarray, rate: int, kind: str, *, live: bool = False) -> bytes:
    """`audio` (float32 mono at `rate`) encoded as `kind` (see `KINDS`).

    `live` (WebM only): written as MediaRecorder writes it, with no duration in the header.
    """
    fmt, codec, codec_rate, video = KINDS[kind]
    if rate != codec_rate:
        audio = soxr.resample(audio, rate, codec_rate).astype(np.float32)
    buffer = io.BytesIO()
    options = {"live": "1"} if live else {}
    with av.open(buffer, mode="w", format=fmt, options=options) as out:
        picture = None
        if video:
            picture = out.add_stream("mpeg4", rate=10)
            picture.width, picture.height, picture.pix_fmt = 64, 48, "yuv420p"
        sound = out.add_stream(codec, rate=codec_rate)
        sound.layout = "mono"
        size = sound.codec_context.frame_size or 1024
        pts = 0
        for start in range(0, len(audio), size):
            chunk = audio[start : start + size]
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
            frame.sample_rate = codec_rate
            frame.pts = pts
            frame.time_base = Fraction(1, codec_rate)
            pts += len(chunk)
            out.mux(sound.encode(frame))
        out.mux(sound.encode(None))
        if picture is not None:
            seconds = len(audio) / codec_rate
            for index in range(max(1, int(seconds * 10))):
                image = np.full((48, 64, 3), (index * 7) % 255, np.uint8)
                still = av.VideoFrame.from_ndarray(image, format="rgb24")
                still.pts = index
                out.mux(picture.encode(still))
            out.mux(picture.encode(None))
    return buffer.getvalue()
