"""ASGI middleware for Ray Serve's HTTP proxy: its own answers in the service's error shape.

Ray's proxy answers some requests without reaching the app: when the replica serving a request
dies (Ray then sends nothing and uvicorn falls back to a bare 500), when every replica is busy
and the proxy's queue (`max_queued_requests`) is full, when no replica is up, or when its own
timeout fires. Those answers are plain text; clients of this service expect the OpenAI error
shape and a status that says whether to retry. The proxy loads this module through
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=service.scale.proxy:middlewares`, set in the
environment of every Ray node (`python -m service.scale` sets it for the cluster it starts).
The module imports nothing heavy: the proxy runs on every node and never loads a model.
"""

import json
import uuid
from typing import Any

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    DeadlineExceeded,
    Overloaded,
    ServiceError,
    Unavailable,
    error_object,
)

RETRY_AFTER_S = 1  # a replica is replaced, or a slot frees, within seconds


def _refusal(status: int, text: str) -> ServiceError:
    """The service's error for what Ray's proxy answered with `status` (its plain `text`)."""
    if status == 429:
        return Overloaded(
            "every replica is busy and the proxy's queue is full; retry later",
            retry_after=RETRY_AFTER_S,
            code="queue_full",
        )
    if status == 408:
        return DeadlineExceeded("the request ran past the proxy's timeout")
    if status == 503 and text:
        return Unavailable("no replica is available; retry later")
    return Unavailable("the replica serving this request stopped; retry it")


async def _send(send: Send, exc: ServiceError, request_id: str, retry_after: str | None) -> None:
    body = json.dumps({"error": error_object(exc, request_id)}).encode()
    headers = {
        "content-type": "application/json",
        "content-length": str(len(body)),
        "x-request-id": request_id,
        **{name.lower(): value for name, value in exc.headers().items()},
    }
    if retry_after is not None:  # Ray's own value (back-pressure config) wins
        headers["retry-after"] = retry_after
    if exc.status in (429, 503):
        headers.setdefault("retry-after", str(RETRY_AFTER_S))
    await send(
        {
            "type": "http.response.start",
            "status": exc.status,
            "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        }
    )
    await send({"type": "http.response.body", "body": body})


class ProxyErrors:
    """Rewrites the proxy's own plain-text 408/429/500/503 answers, and a request that got no
    answer at all (its replica died), into the error shape with `Retry-After`.

    The app's answers pass untouched: they are JSON (every error the app sends is), or they
    started streaming. An answer held back for inspection is at most one start message and
    one plain-text body, which only the proxy sends.
    """

    HELD = (408, 429, 500, 503)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = answered = False
        held: Message | None = None  # a start message that may be Ray's own refusal
        text = bytearray()

        async def guarded(message: Message) -> None:
            nonlocal started, held
            if held is not None:
                if message["type"] == "http.response.body":
                    text.extend(message.get("body", b""))
                    if not message.get("more_body", False):
                        await answer(held)
                return
            if message["type"] == "http.response.start":
                started = True
                if message["status"] in self.HELD and _is_plain_text(message):
                    held = message
                    return
            await send(message)

        async def answer(start: Message) -> None:
            nonlocal answered
            answered = True
            retry = _header(start, b"retry-after")
            request_id = _header(start, b"x-request-id") or uuid.uuid4().hex
            await _send(
                send, _refusal(start["status"], text.decode(errors="replace")), request_id, retry
            )

        await self.app(scope, receive, guarded)
        if held is not None and not answered:  # a refusal whose body never ended
            await answer(held)
        if not started:  # the replica died before answering: Ray sent nothing
            await _send(send, _refusal(500, ""), _request_id(scope), None)


def _header(message: Message, name: bytes) -> str | None:
    for key, value in message.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode()
    return None


def _is_plain_text(message: Message) -> bool:
    return (_header(message, b"content-type") or "").startswith("text/plain")


def _request_id(scope: Scope) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == b"x-request-id":
            return bytes(value).decode()[:128]
    return uuid.uuid4().hex


def middlewares() -> list[Any]:
    """The proxy's middleware list (Ray calls this through its callback import path)."""
    return [Middleware(ProxyErrors)]
