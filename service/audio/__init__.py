"""Audio input: decode uploaded files to the float32 mono signal the models take."""

from service.audio.decode import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, decode_audio, probe_duration

__all__ = ["MAX_SAMPLE_RATE", "MIN_SAMPLE_RATE", "decode_audio", "probe_duration"]
