"""Streaming transcription building blocks, free of HTTP and of the engine.

`PcmDecoder` turns a client's raw PCM frames into model-rate samples; `Endpointer` cuts the
stream into utterances; `LocalAgreement` decides which words of a growing transcript are final;
`IncrementalDetokenizer` turns generated tokens into text deltas. The websocket session composes
them.
"""

from service.streaming.agreement import Hypothesis, LocalAgreement
from service.streaming.detok import IncrementalDetokenizer
from service.streaming.endpoint import Endpointer, EndReason, Utterance
from service.streaming.pcm import BadFrame, PcmDecoder, PcmEncoding

__all__ = [
    "BadFrame",
    "EndReason",
    "Endpointer",
    "Hypothesis",
    "IncrementalDetokenizer",
    "LocalAgreement",
    "PcmDecoder",
    "PcmEncoding",
    "Utterance",
]
