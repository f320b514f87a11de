"""The request of both audio endpoints: one pydantic model, parsed from the multipart form.

Every field of OpenAI's transcription and translation requests is here, implemented or refused
with a 400 that names it; so are our own generation fields. Anything else is a 400
(`invalid_value`, `param` = the field): nothing a client sends is silently ignored.

The form is parsed by hand rather than by FastAPI's `Form()` parameters because the official
clients send lists and objects in a form's bracket notation (`include[]=logprobs`,
`chunking_strategy[type]=server_vad`), which have to be regrouped before validation, and
because unknown fields must be refused by name.
"""

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import Depends, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.datastructures import UploadFile as StarletteUploadFile

from service.engine.engine import Engine
from service.engine.types import GenerationParams, Task
from service.errors import InvalidRequest, ModelNotFound, Unsupported
from service.languages import normalize_language
from service.settings import Settings

__all__ = [
    "ChunkingStrategy",
    "TranscriptionForm",
    "TranscriptionRequest",
    "TranslationForm",
    "request_body_schema",
]

ResponseFormat = Literal["json", "text", "verbose_json", "srt", "vtt"]

REFUSED: dict[str, str] = {
    "keywords": "keyword boosting (gpt-transcribe) is not supported",
    "languages": "a list of candidate languages is not supported; give one `language`",
    "known_speaker_names": "speaker diarization is not supported",
    "known_speaker_references": "speaker diarization is not supported",
}
"""OpenAI request fields this service refuses (400 `unsupported`, naming the field)."""

ALIASES: dict[str, str] = {"max_completion_tokens": "max_new_tokens"}
"""Other servers' names for our fields (vLLM's `max_completion_tokens`)."""


class ChunkingStrategy(BaseModel):
    """`chunking_strategy`: `"auto"`, or `{"type": "server_vad", ...}` with the VAD's knobs.

    Either one makes the service cut the audio at pauses into windows (segments), whatever its
    length; without it, audio up to the window limit is transcribed as one block.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["auto", "server_vad"]
    threshold: float = Field(0.5, ge=0, le=1, description="0: most sensitive, 1: least")
    prefix_padding_ms: int = Field(300, ge=0, le=5000, description="Audio kept before speech")
    silence_duration_ms: int = Field(
        500, ge=20, le=10_000, description="The pause that ends a chunk"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text == "auto":
                return {"type": "auto"}
            if text.startswith("{"):
                try:
                    return json.loads(text)
                except ValueError as exc:
                    raise ValueError(f"not JSON: {exc}") from exc
            raise ValueError('must be "auto" or a server_vad object')
        return value

    @model_validator(mode="after")
    def _auto_has_no_knobs(self) -> "ChunkingStrategy":
        if self.type == "auto" and self.model_fields_set - {"type"}:
            raise ValueError('"auto" takes no VAD settings; use {"type": "server_vad", ...}')
        return self


class TranscriptionRequest(BaseModel):
    """One transcription or translation request, as the route receives it from the form."""

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, arbitrary_types_allowed=True, frozen=True
    )

    task: Task = Field("transcribe", exclude=True)  # set by the route, never by the client
    file: UploadFile = Field(description="Audio: WAV, FLAC, Ogg, MP3, WebM, MP4/M4A")
    model: str | None = Field(None, description="Model name (GET /v1/models); default: it")
    language: str | None = Field(
        None, max_length=32, description="ISO 639-1 code or English name of the language"
    )
    prompt: str | None = Field(None, description="Context text (models that take a prompt)")
    response_format: ResponseFormat = "json"
    temperature: float = Field(0.0, ge=0, le=2, description="0: greedy; > 0: sampling")
    timestamp_granularities: list[Literal["word", "segment"]] = Field(
        default_factory=list, description="verbose_json: `segment` and/or `word` timestamps"
    )
    include: list[Literal["logprobs"]] = Field(
        default_factory=list, description="`logprobs`: per-token log-probabilities"
    )
    chunking_strategy: ChunkingStrategy | None = None
    stream: bool = Field(False, description="Server-Sent Events (transcriptions only)")
    num_beams: int = Field(1, ge=1, description="Beam width (capped by settings)")
    do_sample: bool = Field(False, description="Multinomial sampling")
    top_k: int | None = Field(None, ge=0, description="Sampling: keep the k best tokens")
    top_p: float | None = Field(None, gt=0, le=1, description="Sampling: nucleus mass")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Tokens to generate at most (alias: max_completion_tokens)"
    )
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="Repetition penalty")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Sampling seed")
    timeout: float | None = Field(None, gt=0, description="Deadline in seconds (capped)")

    @field_validator("language")
    @classmethod
    def _iso_639_1(cls, value: str | None) -> str | None:
        return normalize_language(value) if value else None

    @model_validator(mode="after")
    def _consistent(self) -> "TranscriptionRequest":
        # top_k/top_p/seed with greedy decoding are honoured trivially: the filters always
        # keep the best token, and greedy decoding is reproducible without a seed
        if "word" in self.timestamp_granularities and self.response_format != "verbose_json":
            raise _Refused(
                "timestamp_granularities", "word timestamps need response_format=verbose_json"
            )
        if "segment" in self.timestamp_granularities and self.response_format in ("json", "text"):
            raise _Refused(
                "timestamp_granularities",
                "segment timestamps need response_format verbose_json, srt or vtt",
            )
        if self.include and self.response_format not in ("json", "verbose_json"):
            raise _Refused("include", "logprobs need response_format json or verbose_json")
        if self.task == "translate" and self.stream:
            raise _Refused("stream", "translations are not streamed")
        return self

    @property
    def words(self) -> bool:
        return "word" in self.timestamp_granularities

    @property
    def segment_timestamps(self) -> bool:
        """`segment` asked for by name: Whisper then decodes with its timestamp tokens."""
        return "segment" in self.timestamp_granularities

    @property
    def logprobs(self) -> bool:
        return "logprobs" in self.include

    def to_params(self, settings: Settings, default_max_new_tokens: int) -> GenerationParams:
        """The decoding parameters, checked against the service's caps."""
        check_caps(
            settings,
            num_beams=self.num_beams,
            max_new_tokens=self.max_new_tokens,
            prompt=self.prompt,
        )
        sample = self.do_sample or self.temperature > 0
        language = self.language or ("en" if self.task == "translate" else None)
        return GenerationParams(
            task=self.task,
            language=language,
            num_beams=self.num_beams,
            do_sample=sample,
            temperature=self.temperature if self.temperature > 0 else 1.0,
            top_k=self.top_k,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens
            or min(settings.max_new_tokens, default_max_new_tokens),
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            prompt=self.prompt or None,
        )


def check_caps(
    settings: Settings, *, num_beams: int, max_new_tokens: int | None, prompt: str | None = None
) -> None:
    """The service's caps on decoding, for uploads and streaming sessions alike (400 naming
    the field)."""
    if num_beams > settings.max_num_beams:
        raise InvalidRequest(
            f"num_beams is {num_beams}; the limit is {settings.max_num_beams}", param="num_beams"
        )
    if max_new_tokens is not None and max_new_tokens > settings.max_new_tokens:
        raise InvalidRequest(
            f"max_new_tokens is {max_new_tokens}; the limit is {settings.max_new_tokens}",
            param="max_new_tokens",
        )
    if prompt is not None and len(prompt) > settings.max_prompt_chars:
        raise InvalidRequest(
            f"prompt is {len(prompt)} characters; the limit is {settings.max_prompt_chars}",
            param="prompt",
        )


def check_model(
    engine: Engine, settings: Settings, model: str | None, language: str | None, prompt: str | None
) -> None:
    """The named model must be the served one; a language the model cannot use and a prompt
    it cannot take are refused. Uploads and streaming sessions alike."""
    if model is not None and model not in (settings.served_name, *settings.model_aliases):
        raise ModelNotFound(
            f"model {model!r} is not loaded; GET /v1/models lists what is", param="model"
        )
    if language and not engine.info.can_translate and language != settings.language:
        # no language tokens: the model speaks only its own language (STT_LANGUAGE)
        raise Unsupported(
            f"model {engine.info.name} transcribes {settings.language!r} only; it has no "
            f"language tokens to force {language!r}",
            param="language",
        )
    if prompt and engine.info.architecture != "whisper":
        raise Unsupported(
            f"model {engine.info.name} ({engine.info.architecture}) takes no prompt",
            param="prompt",
        )


class _Refused(ValueError):
    """A field that is valid alone but cannot be honoured with the others: a 400 naming it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


_LISTS = {"timestamp_granularities", "include"}


def _regroup(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """Form items → the model's input: `a[]` (or a repeated list field) → a list, `a[b]` →
    a dict, aliases → their field. A scalar field given twice is a 400 naming it."""
    data: dict[str, Any] = {}
    for key, value in items:
        if isinstance(value, str) and value == "":
            continue  # an empty text field is an unset one, as form encoders send them
        if key.endswith("[]"):
            data.setdefault(key[:-2], []).append(value)
            continue
        if "[" in key and key.endswith("]"):
            name, _, sub = key[:-1].partition("[")
            group = data.setdefault(name, {})
            if not isinstance(group, dict) or sub in group:
                raise InvalidRequest(f"{name}[{sub}] is given twice or clashes", param=name)
            group[sub] = value
            continue
        name = ALIASES.get(key, key)
        if name in _LISTS:
            data.setdefault(name, []).append(value)
        elif name in data:
            same = f" (an alias of {name})" if key != name else ""
            raise InvalidRequest(f"{key}{same} is given more than once", param=key)
        else:
            data[name] = value
    return data


def parse_form(items: list[tuple[str, Any]], task: Task) -> TranscriptionRequest:
    """Validate the form's items as a `TranscriptionRequest`; every failure is a 400 naming
    the field it is about."""
    data = _regroup(items)
    for name, why in REFUSED.items():
        if name in data:
            raise Unsupported(f"{name}: {why}", param=name)
    if "task" in data:
        raise InvalidRequest("task is set by the endpoint, not the form", param="task")
    file = data.get("file")
    if file is not None and not isinstance(file, StarletteUploadFile):
        raise InvalidRequest("file must be a file part, not a text field", param="file")
    try:
        return TranscriptionRequest.model_validate({**data, "task": task})
    except _Refused as exc:
        raise InvalidRequest(str(exc), param=exc.param) from exc
    except ValidationError as exc:
        raise _invalid(exc) from exc


def _invalid(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, _Refused):
        return InvalidRequest(str(cause), param=cause.param)
    loc = [str(part) for part in first["loc"] if not isinstance(part, int)]
    param = ".".join(loc) or None
    if first["type"] == "extra_forbidden":
        message = f"unknown field {param!r}: this API does not take it"
    elif first["type"] == "missing":
        message = f"{param} is required"
    else:
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
    return InvalidRequest(message, param=param)


async def _form_items(request: Request) -> AsyncIterator[list[tuple[str, Any]]]:
    form = await request.form()
    try:
        yield list(form.multi_items())
    finally:
        await form.close()


async def _transcription(
    items: Annotated[list[tuple[str, Any]], Depends(_form_items)],
) -> TranscriptionRequest:
    return parse_form(items, "transcribe")


async def _translation(
    items: Annotated[list[tuple[str, Any]], Depends(_form_items)],
) -> TranscriptionRequest:
    return parse_form(items, "translate")


TranscriptionForm = Annotated[TranscriptionRequest, Depends(_transcription)]
TranslationForm = Annotated[TranscriptionRequest, Depends(_translation)]


def request_body_schema(task: Task) -> dict[str, object]:
    """The OpenAPI `requestBody` of an audio endpoint: the model's fields as a multipart form.

    List fields are documented under their bracket names (`include[]`), as the official clients
    send them; `chunking_strategy` as a string (`auto`, or the server_vad object as JSON), its
    bracketed form (`chunking_strategy[type]`, ...) being accepted too.
    """
    properties: dict[str, object] = {}
    schema = TranscriptionRequest.model_json_schema(mode="validation")
    for name, prop in schema["properties"].items():
        if name == "task" or (task == "translate" and name == "stream"):
            continue
        if name == "file":
            prop = {"type": "string", "format": "binary", "description": "The audio file"}
        elif name == "chunking_strategy":
            prop = {
                "type": "string",
                "enum": ["auto"],
                "description": '"auto", or a server_vad object as JSON: {"type": '
                '"server_vad", "threshold", "prefix_padding_ms", "silence_duration_ms"}; '
                "or that object's fields as chunking_strategy[type], chunking_strategy[...]",
            }
        elif name in _LISTS:
            name = f"{name}[]"
        prop.pop("title", None)
        properties[name] = prop
    body = {"type": "object", "properties": properties, "required": ["file"]}
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": body}},
        }
    }
