"""Length buckets for models whose output changes with padding.

Such a model (group-norm wav2vec2, Speech2Text) may only share a batch with inputs of the same
length. Rather than batch only exact equals, every input, alone or batched, is padded with
silence up to the next length on a geometric ladder (steps of about 25%, rounded to 0.25 s):
batching then never changes a transcript, because a request's padded input is the same in any
batch, and inputs of similar length share batches with at most 25% padding.
"""

import math

_STEP = 1.25
_QUANTUM_S = 0.25


def bucket_seconds(seconds: float) -> float:
    """The smallest ladder length >= `seconds` (0.25 s, 0.5 s, ..., 1, 1.25, 1.5, 2, 2.5, ...)."""
    if seconds <= 1.0:
        return max(_QUANTUM_S, math.ceil(seconds / _QUANTUM_S) * _QUANTUM_S)
    rung = 1.0
    while rung < seconds:
        rung = max(rung + _QUANTUM_S, round(rung * _STEP / _QUANTUM_S) * _QUANTUM_S)
    return rung


def bucket_samples(samples: int, sampling_rate: int) -> int:
    """`bucket_seconds` in samples."""
    exact = samples / sampling_rate
    return max(samples, round(bucket_seconds(exact) * sampling_rate))
