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
    engine = request.app.state.engine
    if engine is None or not engine.ready:
        reason = "loading" if engine is None else "no worker alive or draining"
        return JSONResponse(
            {"status": "not ready", "reason": reason}, status_code=503, headers={"Retry-After": "5"}
        )
    return JSONResponse(
        {"status": "ready", "workers": engine.pool.alive, "queued": engine.scheduler.depth}
    )
