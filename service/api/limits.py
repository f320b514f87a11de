"""Upload size limit enforced while the body streams in, before it is all buffered."""

import contextlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import send_error
from service.errors import PayloadTooLarge


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware: 413 as soon as a request body exceeds `max_bytes`.

    A `Content-Length` over the limit is refused before reading anything; a chunked body is
    counted as it arrives and cut off at the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, send)
            return
        seen = 0
        exceeded = False
        answered = False

        async def counting_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    raise _TooLarge
            return message

        async def guarded_send(message: Message) -> None:
            # Once the body is over the limit, whatever the app answers (its body parser turns
            # our exception into a generic 400) is replaced by the 413.
            nonlocal answered
            if exceeded:
                if not answered:
                    answered = True
                    await self._reject(scope, send)
                return
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, counting_receive, guarded_send)
        if exceeded and not answered:
            await self._reject(scope, send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        exc = PayloadTooLarge(f"upload exceeds the limit of {self.max_bytes} bytes", param="file")
        await send_error(scope, send, exc, {"Connection": "close"})
