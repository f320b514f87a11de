"""Render a transcript in each OpenAI response format: json, text, verbose_json, srt, vtt."""

from typing import Literal

from service.api.schemas import Segment, TranscriptionJSON, TranscriptionVerbose, Usage
from service.engine.types import Task, Transcript

ResponseFormat = Literal["json", "text", "verbose_json", "srt", "vtt"]


def segments(result: Transcript, duration: float, temperature: float) -> list[Segment]:
    """One segment per window (a single window until long-audio splitting lands)."""
    if not result.text:
        return []
    return [
        Segment(
            id=0,
            seek=0,
            start=0.0,
            end=round(duration, 3),
            text=result.text,
            tokens=result.tokens,
            temperature=temperature,
            avg_logprob=round(result.avg_logprob, 4),
        )
    ]


def as_json(result: Transcript, duration: float) -> TranscriptionJSON:
    return TranscriptionJSON(text=result.text, usage=Usage(seconds=round(duration, 3)))


def as_verbose(
    result: Transcript, duration: float, task: Task, language: str, temperature: float
) -> TranscriptionVerbose:
    return TranscriptionVerbose(
        task=task,
        language=language,
        duration=round(duration, 3),
        text=result.text,
        segments=segments(result, duration, temperature),
        usage=Usage(seconds=round(duration, 3)),
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
