"""Response bodies, in OpenAI's shapes (plus the error body, for the OpenAPI document)."""

from typing import Literal

from pydantic import BaseModel


class Usage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: float


class TranscriptionJSON(BaseModel):
    text: str
    usage: Usage


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


class TranscriptionVerbose(BaseModel):
    task: str
    language: str
    duration: float
    text: str
    segments: list[Segment]
    usage: Usage


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


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody, "description": what}
    for status, what in (
        (400, "Invalid field or undecodable audio"),
        (404, "Unknown model"),
        (413, "Upload or audio too large"),
        (415, "Not a supported audio format"),
        (429, "Overloaded: retry after the Retry-After header's seconds"),
        (500, "The model failed on this request's batch"),
        (503, "Not ready, shutting down, or no worker alive"),
        (504, "Deadline exceeded"),
    )
}
