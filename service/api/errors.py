"""One JSON shape for every error: `{"error": {"message", "type", "param", "code"}}`.

The error object also carries the request's id (`request_id`), as the `X-Request-ID` header does.
"""

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import Scope, Send

from service.api.observe import facts
from service.errors import InvalidRequest, ServiceError, error_object


async def send_error(
    scope: Scope, send: Send, exc: ServiceError, extra_headers: dict[str, str] | None = None
) -> None:
    """Answer `exc` from raw ASGI middleware (before any route runs), in the one error shape.

    For a websocket it refuses the handshake with the HTTP status (the denial-response
    extension), or, on a server without that extension, closes with 1008.
    """
    record = facts(scope)
    record.error_code = exc.code
    body = json.dumps({"error": error_object(exc, record.request_id)}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(
            (name.lower().encode(), value.encode())
            for name, value in {**exc.headers(), **(extra_headers or {})}.items()
        ),
    ]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    elif "websocket.http.response" in scope.get("extensions", {}):
        start = {"type": "websocket.http.response.start", "status": exc.status, "headers": headers}
        await send(start)
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": exc.message[:120]})


class _HttpError(ServiceError):
    """A status from the framework itself (404, 405, the body parser's 400), as a domain error."""

    def __init__(self, exc: HTTPException) -> None:
        # 400 here is the request body parser refusing it (a multipart body with no boundary, a
        # form field over the parser's size cap): a malformed field, as the README documents it.
        codes = {400: "invalid_value", 404: "not_found", 405: "method_not_allowed"}
        super().__init__(str(exc.detail), code=codes.get(exc.status_code, "http_error"))
        self.status = exc.status_code
        self.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        self._headers = dict(getattr(exc, "headers", None) or {})

    def headers(self) -> dict[str, str]:
        return self._headers


def error_response(exc: ServiceError, request: Request | None = None) -> JSONResponse:
    """The one renderer of an error as an HTTP answer (routes and exception handlers)."""
    request_id = None
    if request is not None:
        record = facts(request.scope)
        record.error_code = exc.code
        request_id = record.request_id
    return JSONResponse(
        {"error": error_object(exc, request_id)}, status_code=exc.status, headers=exc.headers()
    )


def install(app: FastAPI) -> None:
    """Register the handlers that render domain, validation and routing errors alike."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query")]
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        return error_response(InvalidRequest(message, param=param), request)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(_HttpError(exc), request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(ServiceError(f"internal error: {type(exc).__name__}"), request)
