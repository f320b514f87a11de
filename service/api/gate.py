"""A bound on uploads being decoded at once, so that overload is refused, not queued.

Decoding runs in threads beside the model workers and competes with them for the cores. Without
a bound, a flood of uploads makes every request pay the decoding cost before the scheduler can
refuse it, and slows the workers so that accepted requests miss their deadlines. The gate lets
`slots` uploads decode at once and `waiting` more wait for a slot; beyond that, a fast 429.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import send_error
from service.errors import Overloaded, ServiceError


class DecodeGate:
    """At most `slots` decodes at once, at most `waiting` waiting; more are refused at once."""

    def __init__(self, slots: int, waiting: int) -> None:
        self.slots = slots
        self.max_waiting = waiting
        self.waiting = 0
        self._semaphore: asyncio.Semaphore | None = None  # made on the serving loop

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.slots)
        if self._semaphore.locked() and self.waiting >= self.max_waiting:
            raise Overloaded(
                "too many uploads are waiting to be decoded", retry_after=1, code="queue_full"
            )
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._semaphore.release()


class EarlyAdmission:
    """ASGI middleware: refuse an upload with 429/503 before its body is parsed or decoded when
    the queue would refuse it anyway (judged against the default deadline, since the request's
    own `timeout` field is inside the body). Under overload a refusal then costs almost nothing
    but reading the bytes."""

    PATHS = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") in self.PATHS:
            engine = scope["app"].state.engine
            if engine is not None and engine.ready:
                try:
                    engine.scheduler.admit(engine.deadline(None))
                except ServiceError as exc:
                    await _refuse(scope, receive, send, exc)
                    return
        await self.app(scope, receive, send)


async def _refuse(scope: Scope, receive: Receive, send: Send, exc: ServiceError) -> None:
    # Read (and drop) the body first: a client still sending it when the answer comes and the
    # connection closes sees a reset instead of the 429. Reading is cheap; decoding is not.
    limit = scope["app"].state.settings.max_upload_bytes
    seen = 0
    while True:
        message = await receive()
        seen += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body") or seen > limit:
            break
    await send_error(scope, send, exc)
