"""Render a transcript in each OpenAI response format: json, text, verbose_json, srt, vtt."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from service.api.schemas import (
    InputTokenDetails,
    Segment,
    TokenLogprob,
    TokenUsage,
    TranscriptionJSON,
    TranscriptionVerbose,
    Usage,
    Word,
)
from service.engine.types import Task, Transcript

ResponseFormat = Literal["json", "text", "verbose_json", "srt", "vtt"]


@dataclass(frozen=True)
class Piece:
    """The transcript of one window of the audio and where its speech lies (seconds)."""

    start: float
    end: float
    transcript: Transcript
    offset: float = 0.0  # where the transcribed audio begins: its word times count from here


def joined_text(pieces: list[Piece]) -> str:
    return " ".join(p.transcript.text for p in pieces if p.transcript.text)


def segments(
    pieces: list[Piece], temperature: float, duration: float | None = None
) -> list[Segment]:
    """One segment per window that produced text; a window that Whisper decoded with
    timestamps gives the segments its timestamp tokens delimit (`timed_segments`)."""
    out: list[Segment] = []
    for piece in (p for p in pieces if p.transcript.text):
        if piece.transcript.segments:
            out.extend(timed_segments(len(out), piece, temperature, duration))
        else:
            out.append(segment(len(out), piece, temperature))
    return out


def timed_segments(
    first: int, piece: Piece, temperature: float, duration: float | None
) -> list[Segment]:
    """A Whisper window's segments: times from its timestamp tokens, counted from the window's
    start (`offset`), never past the audio's end; a last segment that decoding cut before its
    closing timestamp ends where the window's speech does."""
    limit = duration if duration is not None else float("inf")
    out = []
    for index, timed in enumerate(piece.transcript.segments or [], start=first):
        start = min(piece.offset + timed.start, limit)
        end = piece.offset + timed.end if timed.end is not None else max(start, piece.end)
        out.append(
            Segment(
                id=index,
                seek=round(piece.offset * 100),
                start=round(start, 3),
                end=round(max(start, min(end, limit)), 3),
                text=timed.text,
                tokens=timed.tokens,
                temperature=temperature,
                avg_logprob=round(float(np.mean(timed.logprobs)) if timed.logprobs else 0.0, 4),
            )
        )
    return out


def segment(index: int, piece: Piece, temperature: float) -> Segment:
    return Segment(
        id=index,
        seek=round(piece.start * 100),  # Whisper's seek: the window's offset in 10 ms frames
        start=round(piece.start, 3),
        end=round(piece.end, 3),
        text=piece.transcript.text,
        tokens=piece.transcript.tokens,
        temperature=temperature,
        avg_logprob=round(piece.transcript.avg_logprob, 4),
    )


def token_logprobs(
    tokenizer: Any, tokens: list[int], logprobs: list[float], context: Sequence[int] = ()
) -> list[TokenLogprob]:
    """Each token's share of the text (what decoding it adds to the tokens before it, so
    a WordPiece `##s` is `s` and a word-level token carries its leading space) with its
    log-probability. `context`: the tokens before these (a stream's earlier deltas).

    The shares of a sequence join to its decoded text (before stripping).
    """
    items: list[TokenLogprob] = []
    ids = list(context[-_CONTEXT:])
    before = str(tokenizer.decode(ids, skip_special_tokens=True)) if ids else ""
    for token, logprob in zip(tokens, logprobs, strict=True):
        ids.append(token)
        text = str(tokenizer.decode(ids, skip_special_tokens=True))
        share = text[len(before) :] if text.startswith(before) else text
        if not context and not items:
            share = share.lstrip()  # the text of a sequence starts with no space
        before = text
        items.append(TokenLogprob(token=share, logprob=logprob, bytes=list(share.encode())))
    return items


_CONTEXT = 8  # tokens of context enough for a decoder to place spaces and join pieces


def token_usage(audio_tokens: int, output_tokens: int) -> TokenUsage:
    return TokenUsage(
        input_tokens=audio_tokens,
        output_tokens=output_tokens,
        total_tokens=audio_tokens + output_tokens,
        input_token_details=InputTokenDetails(audio_tokens=audio_tokens),
    )


def word_timings(pieces: list[Piece]) -> list[Word]:
    """Every window's word timings, moved to the whole audio's clock."""
    return [
        Word(
            word=w.word,
            start=round(p.offset + w.start, 3),
            end=round(p.offset + w.end, 3),
        )
        for p in pieces
        for w in p.transcript.words or []
    ]


def as_json(
    pieces: list[Piece], duration: float, logprobs: list[TokenLogprob] | None = None
) -> TranscriptionJSON:
    return TranscriptionJSON(
        text=joined_text(pieces), usage=Usage(seconds=round(duration, 3)), logprobs=logprobs
    )


def as_verbose(
    pieces: list[Piece],
    duration: float,
    task: Task,
    language: str,
    temperature: float,
    *,
    words: bool = False,
    logprobs: list[TokenLogprob] | None = None,
) -> TranscriptionVerbose:
    return TranscriptionVerbose(
        task=task,
        language=language,
        duration=round(duration, 3),
        text=joined_text(pieces),
        segments=segments(pieces, temperature, duration),
        usage=Usage(seconds=round(duration, 3)),
        words=word_timings(pieces) if words else None,
        logprobs=logprobs,
    )


def _timestamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def as_srt(items: list[Segment]) -> str:
    """SubRip: numbered cues, `HH:MM:SS,mmm` times, blank line between cues."""
    cues = [
        f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text}\n"
        for i, s in enumerate(items, start=1)
    ]
    return "\n".join(cues)


def as_vtt(items: list[Segment]) -> str:
    """WebVTT: header, then cues with `HH:MM:SS.mmm` times."""
    cues = [f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text}\n" for s in items]
    return "WEBVTT\n\n" + "\n".join(cues)
