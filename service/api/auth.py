"""Optional API keys, checked before any route runs (and before a websocket is accepted).

Clients send the key as the OpenAI clients do, `Authorization: Bearer <key>`, or as
`X-API-Key: <key>`; websockets may also pass `?api_key=<key>` or, as OpenAI's Realtime API
takes it from browsers, the subprotocol `openai-insecure-api-key.<key>` (browsers cannot set
headers on a websocket). Keys are compared as SHA-256 digests with `hmac.compare_digest`
against every configured key, so the time taken says nothing about how much of a key matched
or which one. The probes (`/health`, `/ready`) and the browser page's static files (`/`,
`/static/...`: a browser cannot send a key when it navigates; the page asks for one) are always
open; `/metrics` is open only if configured so.
"""

import hashlib
import hmac
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import send_error
from service.errors import Unauthorized

ALWAYS_OPEN = frozenset({"/health", "/ready", "/"})
OPEN_PREFIX = "/static/"  # the page's scripts, style sheet and icon
SUBPROTOCOL_PREFIX = "openai-insecure-api-key."


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeyAuth:
    """ASGI middleware: 401 in the OpenAI error shape unless the request carries a valid key."""

    def __init__(self, app: ASGIApp, keys: list[str], public_metrics: bool = False) -> None:
        self.app = app
        self.digests = [_digest(k) for k in keys]
        self.open_paths = ALWAYS_OPEN | ({"/metrics"} if public_metrics else set())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] not in ("http", "websocket")
            or not self.digests
            or scope.get("path") in self.open_paths
            or str(scope.get("path", "")).startswith(OPEN_PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        key = self._presented(scope)
        if key is not None and self._valid(key):
            # who the client is, for per-client limits: a digest prefix, never the key itself
            scope.setdefault("state", {})["client_id"] = "key:" + _digest(key)[:8].hex()
            await self.app(scope, receive, send)
            return
        message = (
            "missing API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`"
            if key is None
            else "invalid API key"
        )
        await self._refuse(scope, send, message)

    def _presented(self, scope: Scope) -> str | None:
        headers = dict(scope.get("headers", []))
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        if b"x-api-key" in headers:
            return headers[b"x-api-key"].decode("latin-1")
        if scope["type"] == "websocket":
            for protocol in scope.get("subprotocols") or []:
                if protocol.startswith(SUBPROTOCOL_PREFIX) and len(protocol) > len(
                    SUBPROTOCOL_PREFIX
                ):
                    return str(protocol[len(SUBPROTOCOL_PREFIX) :])
            values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("api_key")
            if values:
                return values[0]
        return None

    def _valid(self, key: str) -> bool:
        presented = _digest(key)
        matched = False
        for digest in self.digests:  # no early exit: the same work whichever key matches
            matched |= hmac.compare_digest(presented, digest)
        return matched

    async def _refuse(self, scope: Scope, send: Send, message: str) -> None:
        await send_error(scope, send, Unauthorized(message))
