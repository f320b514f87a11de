"""Dependencies shared by the routes: settings, engine and metrics from the app's state."""

from typing import Annotated

from fastapi import Depends, Request

from service.engine.engine import Engine
from service.engine.registry import Engines
from service.errors import Unavailable
from service.metrics import Metrics
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_engine(request: Request) -> Engine:
    engine: Engine | None = request.app.state.engine
    if engine is None:
        raise Unavailable("the model is still loading")
    return engine


def get_engines(request: Request) -> Engines:
    """Every served model's engine; a route picks one by the request's `model` (`get`)."""
    engines: Engines | None = request.app.state.engines
    if engines is None:
        raise Unavailable("the model is still loading")
    return engines


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
EngineDep = Annotated[Engine, Depends(get_engine)]
EnginesDep = Annotated[Engines, Depends(get_engines)]
