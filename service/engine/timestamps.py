"""Whisper's timestamp tokens → timed segments: a pure function of the token ids.

Whisper decoding with timestamps (no `<|notimestamps|>` in the prompt, Whisper's timestamp rules
applied while decoding: transformers' `WhisperTimeStampLogitsProcessor`) writes each segment as
`<|start|> text tokens <|end|>`, the times counted in `time_precision` steps (0.02 s) from the
window's start: `<|0.00|> Hello world.<|1.24|><|1.24|> How are you?<|2.80|>`. Timestamps come
in pairs except at the edges: a segment's end and the next one's start may be one token or two
(OpenAI's `transcribe.py` cuts at each pair of consecutive timestamps); a lone last timestamp
ends the speech; text after the last timestamp (decoding stopped by `max_new_tokens`) is a last
segment with no end of its own (`end=None`: the caller closes it at the window's end).

Kept apart from any decoding loop: it needs only the ids, which token is the first timestamp,
and the tokenizer's `decode`.
"""

import dataclasses
from collections.abc import Callable, Sequence

TIME_PRECISION = 0.02  # seconds per timestamp step: <|0.00|>, <|0.02|>, ... <|30.00|>


@dataclasses.dataclass(frozen=True)
class TimedSegment:
    """Text between two timestamp tokens; times in seconds from the window's start."""

    start: float
    end: float | None  # None: decoding stopped before the segment's closing timestamp
    text: str
    tokens: list[int]  # the text tokens only
    logprobs: list[float]


def parse_segments(
    tokens: Sequence[int],
    *,
    timestamp_begin: int,
    decode: Callable[[list[int]], str],
    first_special: int | None = None,
    logprobs: Sequence[float] | None = None,
    time_precision: float = TIME_PRECISION,
) -> list[TimedSegment]:
    """The timed segments of one window's generated tokens (after its decoder prompt).

    A timestamp closes the open segment and starts the next one, unless another follows it
    at once, which then is the start (`<|1.24|><|1.30|>`: a pause from 1.24 to 1.30 s).
    `timestamp_begin` is the id of `<|0.00|>` (every id from it on is a timestamp);
    `first_special` the first non-text id (`<|endoftext|>`): ids from it up to the timestamps
    (end of text, language, task) are skipped. `logprobs[i]` belongs to `tokens[i]`. Segments
    with no text (two timestamps in a row that open and close nothing) are left out; text
    before any timestamp starts at 0.
    """
    special = first_special if first_special is not None else timestamp_begin
    scores = list(logprobs) if logprobs is not None else [0.0] * len(tokens)
    segments: list[TimedSegment] = []
    start: float | None = None
    text: list[int] = []
    text_scores: list[float] = []

    def close(end: float | None) -> None:
        if text:
            segments.append(
                TimedSegment(
                    start=start if start is not None else 0.0,
                    end=end,
                    text=decode(list(text)).strip(),
                    tokens=list(text),
                    logprobs=list(text_scores),
                )
            )
        text.clear()
        text_scores.clear()

    for token, score in zip(tokens, scores, strict=True):
        if token >= timestamp_begin:
            seconds = round((token - timestamp_begin) * time_precision, 2)
            if text:  # closes the open segment
                close(seconds)
            # and opens the next: a second timestamp in a row is the next one's start
            start = seconds
        elif token >= special:
            continue
        else:
            text.append(token)
            text_scores.append(score)
    close(None)
    return segments
