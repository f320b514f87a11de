"""Per-request bookkeeping: request id, metrics, and one log line per request.

An ASGI middleware (outermost), so it sees every answer, including the 413 that the body-size
limit gives before the app runs. Routes and error handlers leave what they know in the request
state (`RequestFacts`); the middleware turns it into the counter, histogram and log line.
"""

import dataclasses
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

log = logging.getLogger("service.access")

REQUEST_ID_HEADER = "x-request-id"
_VALID_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_PROBES = {"/health", "/ready", "/metrics"}
# Answers that are not a refusal: success, the client leaving, and failures after acceptance.
_NOT_REJECTED = {499, 500, 504}
_REASONS = {"invalid_api_key": "auth"}  # rejection reason where it is not the error code


@dataclasses.dataclass
class RequestFacts:
    """What a request's handlers learned, for its metrics and its log line."""

    request_id: str
    model: str = ""  # the served model that took the request ("" before one was named)
    response_format: str = ""
    error_code: str | None = None
    audio_seconds: float | None = None
    queue_seconds: float | None = None
    compute_seconds: float | None = None
    batch_size: int | None = None
    text: str | None = None


def facts(scope: Scope) -> RequestFacts:
    """This request's facts (created by the middleware; a bare one outside it)."""
    state = scope.setdefault("state", {})
    found = state.get("facts")
    if found is None:
        found = state["facts"] = RequestFacts(request_id=uuid.uuid4().hex)
    return found


def request_id_from(scope: Scope) -> str:
    """The client's `X-Request-ID` when it is a sane token, else a fresh one."""
    for key, value in scope.get("headers", []):
        if key == REQUEST_ID_HEADER.encode():
            candidate = value.decode("latin-1")
            if _VALID_ID.fullmatch(candidate):
                return candidate
    return uuid.uuid4().hex


def endpoint_of(scope: Scope, templates: list[tuple[re.Pattern[str], str]]) -> str:
    """The route's path template; one label for every unmatched path (bounded cardinality).

    Requests answered before routing (the body-size limit's 413) are matched by their path.
    """
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    for pattern, template in templates:
        if pattern.fullmatch(scope.get("path", "")):
            return template
    return "unmatched"


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", template)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts))


class RequestObserver:
    """Assigns the request id, counts and times the request, and logs it once."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        paths: Callable[[], Iterable[str]],
        log_transcripts: bool = False,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths  # the app's path templates, read on first use (routes come later)
        self._templates: list[tuple[re.Pattern[str], str]] | None = None
        self.log_transcripts = log_transcripts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope)
        scope.setdefault("state", {})["facts"] = record = RequestFacts(request_id=request_id)
        if scope["type"] == "websocket":  # sessions are counted and logged by the session
            await self.app(scope, receive, send)
            if record.error_code is not None:  # refused before the handshake (auth)
                reason = _REASONS.get(record.error_code, record.error_code)
                self.metrics.for_model("").rejections.labels(reason=reason).inc()
            return
        started = time.perf_counter()
        status = 500  # if the app dies without answering, the server answers 500

        async def tagged_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, tagged_send)
        finally:
            self._finish(scope, record, status, time.perf_counter() - started)

    def _finish(self, scope: Scope, record: RequestFacts, status: int, seconds: float) -> None:
        if self._templates is None:
            self._templates = [(_compile(t), t) for t in self.paths()]
        endpoint = endpoint_of(scope, self._templates)
        metrics = self.metrics.for_model(record.model)  # itself when there is one model
        metrics.requests.labels(
            endpoint=endpoint, response_format=record.response_format, status=str(status)
        ).inc()
        metrics.request_duration.labels(endpoint=endpoint).observe(seconds)
        if status >= 400 and status not in _NOT_REJECTED:
            reason = record.error_code or f"http_{status}"
            metrics.rejections.labels(reason=_REASONS.get(reason, reason)).inc()
        fields: dict[str, object] = {
            "request_id": record.request_id,
            **({"model": record.model} if record.model else {}),
            "method": scope.get("method"),
            "path": scope.get("path"),
            "endpoint": endpoint,
            "status": status,
            "duration_ms": round(seconds * 1000, 1),
        }
        if record.response_format:
            fields["response_format"] = record.response_format
        if record.error_code:
            fields["error"] = record.error_code
        for name in ("audio_seconds", "queue_seconds", "compute_seconds"):
            value = getattr(record, name)
            if value is not None:
                fields[name] = round(value, 4)
        if record.batch_size is not None:
            fields["batch_size"] = record.batch_size
        if self.log_transcripts and record.text is not None:
            fields["text"] = record.text
        level = logging.DEBUG if scope.get("path") in _PROBES else logging.INFO
        log.log(
            level,
            "%s %s %d",
            scope.get("method"),
            scope.get("path"),
            status,
            extra={"fields": fields},
        )
