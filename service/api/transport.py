"""HTTP/1.1 transport limits that no ASGI middleware can enforce: they act before a request
exists, or while the app waits on a body that never comes.

uvicorn's httptools protocol accepts a request head of any size and number of headers (a 20 MB
header is buffered whole before the app sees it), waits forever for a head or a body that stops
arriving, and hands a websocket handshake to the websockets library, which drops a request line
or header line of 8 KB or more without an answer. `LimitedHttpProtocol` adds, per connection:

- a cap on the request head (request line plus headers, `max_header_bytes`) and on the number
  of headers (`max_headers`): 431; a request target over `MAX_TARGET_BYTES`: 414;
- a head timeout (`header_timeout_s`, from the connection or the request's first byte until
  its headers are complete) and a body read timeout (`body_read_timeout_s` without a byte while
  the body is incomplete and the server is reading): 408, then the connection is closed;
- uvicorn's own 400 (unparseable request) in the service's JSON error shape.

Every refusal is counted in `stt_rejections_total{reason}` and closes the connection.
"""

import asyncio
import json
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from service.errors import InvalidRequest, error_object
from service.metrics import Metrics
from service.settings import Settings

# The websockets library reads a handshake line (request line or header) of at most 8192 bytes
# with its CRLF, and at most 128 headers; refusing beyond that here answers what it would drop.
MAX_TARGET_BYTES = 8000
MAX_WEBSOCKET_LINE = 8190


class _Refuse(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head limits, read timeouts and JSON 400s.

    The limits are class attributes: `protocol_for(settings, metrics)` makes a subclass per
    app, which uvicorn instantiates per connection.
    """

    max_header_bytes = 32 * 1024
    max_headers = 100
    header_timeout_s = 10.0
    body_read_timeout_s = 30.0
    metrics: Metrics | None = None

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._in_head = True
        self._head_bytes = 0
        self._header_count = 0
        self._head_deadline: float | None = None
        self._in_body = False
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # --- connection ---

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._last_read = self.loop.time()
        self._head_deadline = self._last_read + self.header_timeout_s
        self._schedule()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        self._last_read = self.loop.time()
        try:
            if self._in_head and self._head_bytes + len(data) > self.max_header_bytes:
                room = max(0, self.max_header_bytes - self._head_bytes)
                self._feed(data[:room])  # may complete the head
                if self._in_head:
                    raise _Refuse(
                        431,
                        "header_too_large",
                        f"request headers exceed {self.max_header_bytes} bytes",
                    )
                data = data[room:]
            self._feed(data)
        except _Refuse as refusal:
            self._refuse(refusal)
        except httptools.HttpParserUpgrade:
            self._cancel_timer()
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _Refuse):
                self._refuse(exc.__context__)
            else:
                self._refuse(_Refuse(400, "invalid_http", "invalid HTTP request"))

    def _feed(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        self.parser.feed_data(data)

    def handle_websocket_upgrade(self) -> None:
        if len(self.url) > MAX_WEBSOCKET_LINE - 16 or any(
            len(name) + len(value) + 2 > MAX_WEBSOCKET_LINE for name, value in self.headers
        ):
            self._refuse(_Refuse(431, "header_too_large", "a handshake line exceeds 8190 bytes"))
            return
        super().handle_websocket_upgrade()

    # --- parser callbacks ---

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_count = 0
        if self._head_deadline is None:  # the next request on a kept-alive connection
            self._head_deadline = self.loop.time() + self.header_timeout_s
            self._schedule()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > MAX_TARGET_BYTES:
            raise _Refuse(414, "uri_too_long", f"request target exceeds {MAX_TARGET_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.max_headers:
            raise _Refuse(431, "header_too_large", f"more than {self.max_headers} request headers")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_deadline = None
        self._in_body = True
        self._schedule()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        self._in_head = True  # what comes next is the next request's head
        self._head_bytes = 0
        self._schedule()
        super().on_message_complete()

    # --- timeouts ---

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        self._cancel_timer()
        if self._head_deadline is not None:
            at = self._head_deadline
        elif self._in_body:
            at = self._last_read + self.body_read_timeout_s
        else:
            return
        self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport is None or self.transport.is_closing():
            return
        now = self.loop.time()
        if self._head_deadline is not None and now >= self._head_deadline:
            if self._head_bytes == 0 and self.cycle is not None:
                self.transport.close()  # an idle kept-alive connection: nothing to answer
                return
            self._refuse(
                _Refuse(
                    408,
                    "request_timeout",
                    f"request headers not complete within {self.header_timeout_s:g} s",
                )
            )
            return
        if self._in_body:
            if self.flow.read_paused:  # we stopped reading (back-pressure), not the client
                self._last_read = now
            elif now - self._last_read >= self.body_read_timeout_s:
                self._refuse(
                    _Refuse(
                        408,
                        "request_timeout",
                        f"no request body received for {self.body_read_timeout_s:g} s",
                    )
                )
                return
        self._schedule()

    # --- answers ---

    def send_400_response(self, msg: str) -> None:
        self._refuse(_Refuse(400, "invalid_http", msg))

    def _refuse(self, refusal: _Refuse) -> None:
        """Answer in the error shape (unless the app already started a response), close."""
        self._cancel_timer()
        self._in_body = False
        self._head_deadline = None
        if self.metrics is not None:
            self.metrics.rejections.labels(reason=refusal.code).inc()
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            if self.cycle is not None:
                self.cycle.response_started = True  # the app's own answer is dropped
            error = InvalidRequest(refusal.message, code=refusal.code)
            body = json.dumps({"error": error_object(error)}).encode()
            head = [
                STATUS_LINE[refusal.status],
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode() + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
            ]
            self.transport.write(b"".join(head) + body)
        self.transport.close()


def protocol_for(settings: Settings, metrics: Metrics | None = None) -> type[LimitedHttpProtocol]:
    """The protocol class uvicorn should use for an app with these settings."""
    return type(
        "ServiceHttpProtocol",
        (LimitedHttpProtocol,),
        {
            "max_header_bytes": settings.max_header_bytes,
            "max_headers": settings.max_headers,
            "header_timeout_s": settings.header_timeout_s,
            "body_read_timeout_s": settings.body_read_timeout_s,
            "metrics": metrics,
        },
    )


def uvicorn_options(settings: Settings, metrics: Metrics | None = None) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run` / `uvicorn.Config` that every server of the service
    (the command line and the tests' live servers) uses: the limited protocol and the websocket
    message size."""
    return {
        "http": protocol_for(settings, metrics),
        # the routes answer oversize messages themselves (an error event, then close 1009)
        "ws_max_size": max(settings.max_frame_bytes, settings.realtime_max_event_bytes) + 64 * 1024,
    }
