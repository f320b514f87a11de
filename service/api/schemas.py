"""Response bodies, in OpenAI's shapes (plus the error body, for the OpenAPI document)."""

from typing import Literal

from pydantic import BaseModel


class Usage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: float


class TokenLogprob(BaseModel):
    """One generated token's text, its UTF-8 bytes and its log-probability (OpenAI's shape)."""

    token: str
    logprob: float
    bytes: list[int]


class InputTokenDetails(BaseModel):
    audio_tokens: int
    text_tokens: int = 0


class TokenUsage(BaseModel):
    """Usage in tokens, as OpenAI reports it on `transcript.text.done`: the audio's encoder
    frames (what the decoder attends to) as input tokens, generated tokens as output."""

    type: Literal["tokens"] = "tokens"
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_token_details: InputTokenDetails


class TranscriptionJSON(BaseModel):
    text: str
    usage: Usage
    logprobs: list[TokenLogprob] | None = None


class Segment(BaseModel):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float = 1.0
    no_speech_prob: float = 0.0


class Word(BaseModel):
    word: str
    start: float
    end: float


class TranscriptionVerbose(BaseModel):
    task: str
    language: str
    duration: float
    text: str
    segments: list[Segment]
    usage: Usage
    words: list[Word] | None = None
    logprobs: list[TokenLogprob] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "speech-serve"
    architecture: str
    sampling_rate: int
    can_translate: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    request_id: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def _event(kind: str, **fields: dict[str, object]) -> dict[str, object]:
    """JSON schema of one stream event's payload: `{"type": kind, **fields}`."""
    return {
        "type": "object",
        "properties": {"type": {"const": kind}, **fields},
        "required": ["type", *fields],
    }


_STRING: dict[str, object] = {"type": "string"}
_NUMBER: dict[str, object] = {"type": "number"}

TRANSCRIPT_EVENT: dict[str, object] = {
    "type": "object",
    "description": "One Server-Sent Event of a `stream=true` transcription. Its `data` is JSON: "
    "`transcript.text.delta` events as tokens are generated (long audio: a "
    "`transcript.text.segment` and a delta per window), then one `transcript.text.done`; or an "
    "`error` in the error shape if the request fails after the stream has begun.",
    "properties": {
        "event": _STRING,
        "id": _STRING,
        "retry": {"type": "integer"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {
                "oneOf": [
                    _event("transcript.text.delta", delta=_STRING),
                    # with include[]=logprobs, deltas and done carry `logprobs` too
                    _event(
                        "transcript.text.segment",
                        id=_STRING,
                        start=_NUMBER,
                        end=_NUMBER,
                        text=_STRING,
                    ),
                    _event(
                        "transcript.text.done",
                        text=_STRING,
                        usage=TokenUsage.model_json_schema(ref_template="#/$defs/{model}"),
                    ),
                    _event("error", error=ErrorDetail.model_json_schema()),
                ]
            },
        },
    },
    "required": ["data"],
}
"""Schema of each event of a transcription stream (`text/event-stream`, with `stream=true`).
Before OpenAPI 3.2 (`itemSchema`), the schema of an event-stream media type describes one event,
not the whole body as a string; clients and schemathesis validate each event against it."""

ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody, "description": what}
    for status, what in (
        (
            400,
            "Invalid or unsupported field, or undecodable audio (bad_audio, "
            "unsupported_media_type)",
        ),
        (401, "Missing or invalid API key (when keys are configured)"),
        (404, "Unknown model"),
        (413, "Upload or audio too large"),
        (429, "Overloaded: retry after the Retry-After header's seconds"),
        (500, "The model failed on this request's batch"),
        (503, "Not ready, shutting down, or no worker alive"),
        (504, "Deadline exceeded"),
    )
}
