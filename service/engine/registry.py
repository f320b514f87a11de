"""Which engine serves a request: every served model's engine, keyed by the names clients use.

A server of one model (`STT_MODEL` / `STT_MODEL_DIR`) has one engine; `STT_MODELS` gives each
listed model its own engine (its own queue, batches and worker pool, on its share of the devices
and cores: `Settings.split_for`). Routes and streaming sessions look their engine up once, by the
request's `model` field (none: the default, the first listed), and from then on talk to that
engine alone; nothing below this module knows that there are several.
"""

import logging
import os
import threading
from collections.abc import Iterator

import torch

from service.engine.budget import AudioBudget
from service.engine.engine import Engine
from service.errors import ModelNotFound
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


class Engines:
    """The served engines, the default first, with every accepted name (aliases included)."""

    def __init__(self, engines: list[Engine]) -> None:
        if not engines:
            raise ValueError("a server needs at least one model")
        self.engines = engines
        if len(engines) > 1:
            # decoded upload audio is host memory whichever model it is for: one budget
            # (`STT_MAX_INFLIGHT_AUDIO_SECONDS`) for all, reported under model=""
            shared = AudioBudget(
                engines[0].settings.max_inflight_audio_seconds,
                drain_rate=lambda: sum(e.scheduler.throughput for e in engines),
                on_change=engines[0].metrics.for_model("").inflight_audio.set,
            )
            for engine in engines:
                engine.audio_budget = shared
        self.by_name: dict[str, Engine] = {}
        for engine in engines:
            for name in (engine.settings.served_name, *engine.settings.model_aliases):
                self.by_name.setdefault(name, engine)

    @classmethod
    def load(cls, settings: Settings, metrics: Metrics | None = None) -> "Engines":
        """Load every model (blocking: call off the event loop), one after the other.

        One model: `Engine.load` on the settings as they are. Several: each on its own
        settings and core share from `Settings.split_for`. A model that fails to load stops the
        start-up; those loaded before it are stopped.
        """
        if not settings.models:
            return cls([Engine.load(settings, metrics)])
        loaded: list[Engine] = []
        try:
            split = settings.split_for(torch.cuda.device_count(), os.cpu_count() or 1)
            for own, cores in split:
                log.info(
                    "loading model %s from %s on %s (%d cores)",
                    own.served_name,
                    own.model,
                    own.device,
                    cores,
                )
                loaded.append(Engine.load(own, metrics, cores=cores))
        except BaseException:
            cls.release(loaded)
            raise
        return cls(loaded)

    @property
    def default(self) -> Engine:
        return self.engines[0]

    def __iter__(self) -> Iterator[Engine]:
        return iter(self.engines)

    def __len__(self) -> int:
        return len(self.engines)

    def names(self) -> list[str]:
        """Every accepted `model` name, the default model's first."""
        return list(self.by_name)

    def get(self, name: str | None) -> Engine:
        """The engine serving `name` (None or empty: the default); 404 `model_not_found`."""
        if not name:
            return self.default
        engine = self.by_name.get(name)
        if engine is None:
            raise ModelNotFound(
                f"model {name!r} is not loaded; GET /v1/models lists what is "
                f"({', '.join(self.names())})",
                param="model",
            )
        return engine

    def start(self) -> None:
        for engine in self.engines:
            engine.start()

    @property
    def ready(self) -> bool:
        """Ready only when every model is: a client may name any of them."""
        return all(engine.ready for engine in self.engines)

    @staticmethod
    def release(engines: list[Engine]) -> None:
        """Let go of engines that never started (a later model failed to load): their
        workers hold nothing yet; their replicas go with them."""
        for engine in engines:
            engine.pool.stopping.set()

    def stop(self) -> None:
        """Drain every started engine at once (each within `drain_timeout_s`, not one after
        another)."""
        started = [e for e in self.engines if e.started]
        if len(started) == 1:
            started[0].stop()
            return
        threads = [threading.Thread(target=e.stop, name="drain") for e in started]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
