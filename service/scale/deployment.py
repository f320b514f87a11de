"""The Serve deployment: each replica is the whole app (`create_app`) with its own engine.

Why one deployment and not an ingress in front of model replicas: the routes call the engine
in-process (admission, windowing, token streaming, cancellation when a client leaves); moving
the engine behind a handle would turn each of those into remote calls. Ray's proxy already
spreads requests over replicas and caps each replica's concurrency; inside a replica, the
engine batches what the proxy sent it, exactly as `python -m service` does.

Concurrency (`max_ongoing_requests`) is what batching needs plus the websockets: a replica
takes up to two batches of uploads (one running, one forming), and every open websocket holds
one slot for its whole life, so the streams a replica accepts (`STT_MAX_STREAMS`) are added on
top; the app itself closes streams beyond that limit (1013), so uploads always keep their
slots. Autoscaling targets one batch of requests in flight per replica.
"""

import os
from typing import Any

from pydantic import BaseModel, Field
from ray import serve
from ray.serve.config import AutoscalingConfig, BackpressureConfig
from ray.serve.deployment import Application
from starlette.types import ASGIApp

from service.api.app import create_app
from service.scale import targets
from service.settings import Settings

DEPLOYMENT = "speech"


class ScaleOptions(BaseModel):
    """How the deployment is sized and scaled. `serve run`/`serve deploy` pass these as `args`;
    `python -m service.scale` takes them as flags. `stt` holds `Settings` fields for every
    replica (they win over the nodes' `STT_*` variables)."""

    model_config = {"extra": "forbid"}

    min_replicas: int = Field(1, ge=0, description="fewest replicas (0: scale to zero)")
    max_replicas: int = Field(4, ge=1, description="most replicas")
    initial_replicas: int | None = Field(None, ge=0, description="replicas at start")
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="requests in flight per replica to aim for; default: one batch"
    )
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="cap per replica; default: two batches + STT_MAX_STREAMS"
    )
    max_queued_requests: int | None = Field(
        None, ge=1, description="requests waiting in each proxy; default: two batches per replica"
    )
    upscale_delay_s: float = Field(3.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    replica_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per replica")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs per replica (1: one per GPU)")
    stt: dict[str, Any] = Field(default_factory=dict)

    def settings(self) -> Settings:
        """The replicas' settings: `stt` over the `STT_*` environment over the defaults, with
        explicit threads for CPU replicas (one worker using the CPUs Ray reserved for it,
        never the node's core count)."""
        base = Settings(**self.stt)
        if base.models:
            # a replica's CPUs/GPU are sized for one engine; splitting them between models
            # would leave each a fraction Ray does not know about
            raise ValueError(
                "STT_MODELS (several models in one server) is not supported on Ray Serve: "
                "deploy one application per model (each with its own STT_MODEL and route "
                "prefix), or serve several models with python -m service"
            )
        if self.replica_gpus == 0:
            workers = base.cpu_workers or 1
            threads = base.cpu_threads or max(1, int(self.replica_cpus) // workers)
            return base.model_copy(update={"cpu_workers": workers, "cpu_threads": threads})
        return base

    def overrides(self) -> dict[str, Any]:
        """What the replicas construct their `Settings` from: `stt` plus the computed threads
        (secrets are never in here unless put in `stt`: keys come from each node's env)."""
        chosen = self.settings()
        return {**self.stt, "cpu_workers": chosen.cpu_workers, "cpu_threads": chosen.cpu_threads}

    def upload_slots(self) -> int:
        return 2 * self.settings().max_batch_size

    def deployment_options(self) -> dict[str, Any]:
        settings = self.settings()
        slots = self.upload_slots()
        target = self.target_ongoing_requests or float(settings.max_batch_size)
        return {
            "name": DEPLOYMENT,
            "max_ongoing_requests": self.max_ongoing_requests or slots + settings.max_streams,
            "max_queued_requests": self.max_queued_requests or slots * self.max_replicas,
            "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=1),
            "autoscaling_config": AutoscalingConfig(
                min_replicas=self.min_replicas,
                max_replicas=self.max_replicas,
                initial_replicas=self.initial_replicas,
                target_ongoing_requests=target,
                upscale_delay_s=self.upscale_delay_s,
                downscale_delay_s=self.downscale_delay_s,
                metrics_interval_s=1.0,
                look_back_period_s=3.0,
            ),
            "ray_actor_options": {
                "num_cpus": self.replica_cpus,
                "num_gpus": self.replica_gpus,
            },
            # a replica drains like `python -m service` on SIGTERM
            "graceful_shutdown_timeout_s": settings.drain_timeout_s,
            "health_check_period_s": 2.0,
            "health_check_timeout_s": 10.0,
        }


@serve.ingress()
class SpeechReplica:
    """One replica: the app with its own engine, and its `/metrics` as a scrape target."""

    def __init__(self, overrides: dict[str, Any]) -> None:
        # as `python -m service` does (service/__main__.py): cap oneDNN's per-shape cache
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "32")
        self.settings = Settings(**overrides)
        self.target: targets.Target | None = None

    def __serve_build_asgi_app__(self) -> ASGIApp:
        app = create_app(self.settings)  # Serve keeps it as `self.app` and runs its lifespan
        self.target = targets.serve_replica_metrics(app.state.metrics.registry)
        return app

    def check_health(self) -> None:
        """Serve replaces a replica whose engine has no worker left (after start-up)."""
        engine = self.app.state.engine  # type: ignore[attr-defined]
        if engine is not None and not engine.ready and not engine.pool.draining.is_set():
            raise RuntimeError("no engine worker alive")

    def __del__(self) -> None:
        if self.target is not None:
            self.target.close()


def build_app(args: dict[str, Any] | ScaleOptions | None = None) -> Application:
    """The Serve application (`serve run service.scale.deployment:build_app key=value`)."""
    options = args if isinstance(args, ScaleOptions) else ScaleOptions(**(args or {}))
    deployment = serve.deployment(**options.deployment_options())(SpeechReplica)
    return deployment.bind(options.overrides())
