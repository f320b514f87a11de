"""Liveness and readiness probes."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["probes"])


@router.get("/health", summary="Liveness: the process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    summary="Readiness: model loaded, warmed up and a worker alive",
    responses={
        200: {"description": "Ready: `{status, workers, queued}`"},
        503: {"description": "Not ready (loading, draining, or no worker alive); Retry-After"},
    },
)
async def ready(request: Request) -> JSONResponse:
    """Ready when every served model is (a client may name any of them); with several
    models, `models` gives each one's workers and queue."""
    engines = request.app.state.engines
    if engines is None or not engines.ready:
        reason = "loading" if engines is None else "no worker alive or draining"
        body: dict[str, object] = {"status": "not ready", "reason": reason}
        if engines is not None and len(engines) > 1:
            body["not_ready"] = [e.settings.served_name for e in engines if not e.ready]
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    body = {
        "status": "ready",
        "workers": sum(e.pool.alive for e in engines),
        "queued": sum(e.scheduler.depth for e in engines),
    }
    if len(engines) > 1:
        body["models"] = {
            e.settings.served_name: {"workers": e.pool.alive, "queued": e.scheduler.depth}
            for e in engines
        }
    return JSONResponse(body)
