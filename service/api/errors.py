"""One JSON shape for every error: `{"error": {"message", "type", "param", "code"}}`.

The error object also carries the request's id (`request_id`), as the `X-Request-ID` header does.
"""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.api.observe import facts
from service.errors import ServiceError


def error_body(
    message: str,
    type_: str,
    code: str | None,
    param: str | None = None,
    request_id: str | None = None,
) -> dict[str, object]:
    error = {"message": message, "type": type_, "param": param, "code": code}
    if request_id is not None:
        error["request_id"] = request_id
    return {"error": error}


def error_response(exc: ServiceError, request: Request | None = None) -> JSONResponse:
    return _respond(request, exc.message, exc.type, exc.code, exc.param, exc.status, exc.headers())


def _respond(
    request: Request | None,
    message: str,
    type_: str,
    code: str | None,
    param: str | None,
    status: int,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    request_id = None
    if request is not None:
        record = facts(request.scope)
        record.error_code = code
        request_id = record.request_id
    return JSONResponse(
        error_body(message, type_, code, param, request_id), status_code=status, headers=headers
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
        return _respond(request, message, "invalid_request_error", "invalid_value", param, 400)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        # 400 here is the request body parser refusing it (a multipart body with no boundary, a
        # form field over the parser's size cap): a malformed field, as the README documents it.
        codes = {400: "invalid_value", 404: "not_found", 405: "method_not_allowed"}
        code = codes.get(exc.status_code, "http_error")
        headers = getattr(exc, "headers", None)
        return _respond(request, str(exc.detail), type_, code, None, exc.status_code, headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        message = f"internal error: {type(exc).__name__}"
        return _respond(request, message, "server_error", "internal_error", None, 500)
