"""The browser page: `GET /` and its assets, served by the service itself (no build step, no CDN).

The page (`service/api/static/`) records the microphone and streams it to the websocket, or
uploads a file, through the same public API any client uses. Everything it loads comes from
this router, so its Content-Security-Policy can allow nothing but this origin. The page and its
assets are public (a browser cannot send a key when it navigates); what the page then asks for,
`/ui/config` included, needs a key like any other route when keys are configured.
"""

import mimetypes
from pathlib import Path
from typing import get_args

from fastapi import APIRouter
from fastapi.responses import FileResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from service.api import render
from service.api.deps import EngineDep, SettingsDep
from service.audio.decode import _SUPPORTED as AUDIO_FORMATS

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
ASSET_PREFIX = "/static/"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The page runs only its own scripts and styles, talks only to its own origin (websocket
# included: CSP3 `'self'` matches ws:/wss: on the same host), and Trusted Types forbid
# string-to-HTML sinks (innerHTML) in its scripts.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "microphone=(self), camera=(), geolocation=()",
    "Cache-Control": "no-cache",  # revalidate (ETag): a new version is seen at once
}


def _assets() -> dict[str, tuple[Path, str]]:
    """The files the page may load, by name: a fixed list, so no path reaches outside it."""
    found = {}
    for path in sorted(STATIC_DIR.iterdir()):
        media_type = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0]
        if path.is_file() and media_type is not None:
            found[path.name] = (path, media_type)
    return found


ASSETS = _assets()


def _file(name: str) -> FileResponse:
    if name not in ASSETS:
        raise HTTPException(404, f"no page asset {name!r}")
    path, media_type = ASSETS[name]
    return FileResponse(path, media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/")
async def page() -> FileResponse:
    """The page itself."""
    return _file("index.html")


@router.get(ASSET_PREFIX + "{name}")
async def asset(name: str) -> FileResponse:
    """A script, style sheet or icon of the page."""
    return _file(name)


class PageConfig(BaseModel):
    """What the page shows and needs to know about the service: the model and the limits."""

    model: str
    architecture: str
    language: str
    sampling_rate: int
    can_translate: bool
    audio_formats: str  # the containers uploads may use, as the decoder names them
    max_upload_bytes: int
    max_audio_seconds: float
    response_formats: list[str]
    auth: bool  # keys are configured (the page then sends the one it was given)


@router.get("/ui/config")
async def config(engine: EngineDep, settings: SettingsDep) -> PageConfig:
    """The page's first request: 401 here is how it learns that it must ask for a key."""
    return PageConfig(
        model=settings.served_name,
        architecture=engine.info.architecture,
        language=settings.language,
        sampling_rate=engine.info.sampling_rate,
        can_translate=engine.info.can_translate,
        audio_formats=AUDIO_FORMATS,
        max_upload_bytes=settings.max_upload_bytes,
        max_audio_seconds=settings.max_audio_seconds,
        response_formats=list(get_args(render.ResponseFormat)),
        auth=bool(settings.keys()),
    )
