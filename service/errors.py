"""Every error the service reports, each carrying its HTTP status and OpenAI error type.

Raised anywhere below the HTTP layer; one handler in `service.api.errors` renders them all as
`{"error": {"message", "type", "param", "code"}}`.
"""


class ServiceError(Exception):
    """Base of all domain errors: a message for the client and how to render it."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        return {}


def error_object(exc: ServiceError, request_id: str | None = None) -> dict[str, object]:
    """The OpenAI error object for `exc`: `{"message", "type", "param", "code"}`, plus the
    request's id when known. Every error the service sends, in any transport, is this object."""
    error: dict[str, object] = {
        "message": exc.message,
        "type": exc.type,
        "param": exc.param,
        "code": exc.code,
    }
    if request_id is not None:
        error["request_id"] = request_id
    return error


def error_event(
    exc: ServiceError, request_id: str | None = None, **extra: object
) -> dict[str, object]:
    """A streamed error (SSE event, websocket message): `{"type": "error", ..., "error": {...}}`
    with `extra` fields (e.g. the utterance it concerns) beside the error object."""
    return {"type": "error", **extra, "error": error_object(exc, request_id)}


class InvalidRequest(ServiceError):
    """A request field is missing or out of range."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class BadAudio(ServiceError):
    """The upload is not decodable audio, or is empty, corrupt or non-finite."""

    status = 400
    type = "invalid_request_error"
    code = "bad_audio"


class UnsupportedMediaType(ServiceError):
    """The upload is in no audio container we can decode."""

    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class PayloadTooLarge(ServiceError):
    """The upload exceeds the byte limit or the audio exceeds the duration limit."""

    status = 413
    type = "invalid_request_error"
    code = "too_large"


class ModelNotFound(ServiceError):
    """The `model` field names no loaded model."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class Unsupported(ServiceError):
    """The loaded model cannot do what was asked (e.g. translate)."""

    status = 400
    type = "invalid_request_error"
    code = "unsupported"


class Unauthorized(ServiceError):
    """No API key, or a wrong one, where keys are required."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Overloaded(ServiceError):
    """The queue is full or the estimated wait exceeds the deadline: retry later."""

    status = 429
    type = "rate_limit_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class Unavailable(ServiceError):
    """No worker can serve (starting up, shutting down, or every worker down)."""

    status = 503
    type = "server_error"
    code = "unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its result was ready."""

    status = 504
    type = "timeout_error"
    code = "deadline_exceeded"


class ModelFailure(ServiceError):
    """The model raised while running this request's batch."""

    status = 500
    type = "server_error"
    code = "model_error"


class StartupError(RuntimeError):
    """The checkpoint cannot be served; the message names the missing piece and the fix."""
