"""Every Prometheus metric the service exports, in one place, named `stt_<what>_<unit>`.

Each app gets its own `Metrics` (its own registry), so several apps in one process (tests) never
share counters. The service runs one process per device pool: the engine's queue, batches and
workers live in that process, and `/metrics` reports them directly (prometheus-client's
multiprocess mode would only be needed for several uvicorn worker processes, which would each
load the model and split the batching; we do not run that way).

Engine-side figures that already exist as state (queue depth, workers alive, CUDA memory) are
read at scrape time by a collector rather than mirrored into gauges.
"""

import asyncio
import copy
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

PREFIX = "stt"

# Speech requests take from tens of milliseconds (a short command) to minutes (long files).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
RTF_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

STAGES = ("decode", "features", "encoder", "decoding", "detokenize")


@dataclass(frozen=True)
class WorkerState:
    """One worker as the collector sees it at scrape time."""

    index: int
    device: str
    alive: bool


@dataclass(frozen=True)
class EngineState:
    """Callables the collector reads at scrape time (kept as functions: no engine import)."""

    queue_depth: Callable[[], int]
    queued_seconds: Callable[[], float]
    workers: Callable[[], list[WorkerState]]
    compiles: Callable[[], "CompileFigures"] | None = None


@dataclass(frozen=True)
class CompileFigures:
    """The process's torch.compile figures (service/engine/fastpath.py), read when scraped."""

    compiles: int  # graphs compiled, first compiles and recompiles alike
    seconds: float
    eager_calls: int  # calls of a compiled module that ran eagerly by design
    cache: dict[str, int]  # "<cache>_hit" / "<cache>_miss" -> count


class _EngineCollector:
    """Queue depth, queued audio, worker liveness and CUDA memory, read when scraped."""

    NAMES = (
        f"{PREFIX}_queue_depth",
        f"{PREFIX}_queued_audio_seconds",
        f"{PREFIX}_worker_up",
        f"{PREFIX}_cuda_memory_allocated_bytes",
        f"{PREFIX}_cuda_memory_reserved_bytes",
        f"{PREFIX}_event_loop_tasks",
        f"{PREFIX}_threads",
        f"{PREFIX}_compiles",
        f"{PREFIX}_compile_seconds",
        f"{PREFIX}_compile_eager_calls",
        f"{PREFIX}_compile_cache_lookups",
    )

    def __init__(self, by_model: bool = False) -> None:
        self.by_model = by_model
        self.states: dict[str, EngineState] = {}  # by model ("" when not split by model)
        self.loop: asyncio.AbstractEventLoop | None = None

    def describe(self) -> Iterable[Metric]:
        return self._families(live=False)

    def collect(self) -> Iterable[Metric]:
        return self._families(live=True)

    def _families(self, *, live: bool) -> Iterator[Metric]:
        m = ["model"] if self.by_model else []
        depth = GaugeMetricFamily(self.NAMES[0], "Requests waiting in the queue", labels=m)
        queued = GaugeMetricFamily(self.NAMES[1], "Seconds of audio waiting in the queue", labels=m)
        up = GaugeMetricFamily(
            self.NAMES[2], "1 if the device worker is alive", labels=[*m, "worker", "device"]
        )
        allocated = GaugeMetricFamily(
            self.NAMES[3], "CUDA memory allocated by tensors", labels=[*m, "device"]
        )
        reserved = GaugeMetricFamily(
            self.NAMES[4], "CUDA memory reserved by the caching allocator", labels=[*m, "device"]
        )
        tasks = GaugeMetricFamily(self.NAMES[5], "Tasks alive on the server's event loop", labels=m)
        threads = GaugeMetricFamily(self.NAMES[6], "Threads alive in the process", labels=m)
        # torch.compile's figures are the process's (its compiler state is): like the threads,
        # no model's (model="" when the families are split by model)
        compiles = CounterMetricFamily(
            self.NAMES[7], "Graphs torch.compile built (first compiles and recompiles)", labels=m
        )
        compile_seconds = CounterMetricFamily(self.NAMES[8], "Wall time spent compiling", labels=m)
        eager_calls = CounterMetricFamily(
            self.NAMES[9],
            "Calls of a compiled module run eagerly (short inputs, attention)",
            labels=m,
        )
        lookups = CounterMetricFamily(
            self.NAMES[10],
            "Compile cache lookups on disk, by cache (fx_graph, aot_autograd) and result",
            labels=[*m, "cache", "result"],
        )
        if live:
            shared = [""] if self.by_model else []  # the process's, no model's
            loop = self.loop
            tasks.add_metric(shared, len(asyncio.all_tasks(loop)) if loop is not None else 0)
            threads.add_metric(shared, threading.active_count())
            states = dict(self.states)
            if not states and not self.by_model:
                depth.add_metric([], 0)
                queued.add_metric([], 0)
            for model, state in states.items():
                key = [model] if self.by_model else []
                depth.add_metric(key, state.queue_depth())
                queued.add_metric(key, state.queued_seconds())
                devices = set()
                for worker in state.workers():
                    up.add_metric([*key, str(worker.index), worker.device], float(worker.alive))
                    devices.add(worker.device)
                # a device shared by two models is reported under each of them
                for device in sorted(d for d in devices if d.startswith("cuda")):
                    allocated.add_metric([*key, device], torch.cuda.memory_allocated(device))
                    reserved.add_metric([*key, device], torch.cuda.memory_reserved(device))
            figures = next((st.compiles() for st in states.values() if st.compiles), None)
            if figures is not None:
                compiles.add_metric(shared, figures.compiles)
                compile_seconds.add_metric(shared, figures.seconds)
                eager_calls.add_metric(shared, figures.eager_calls)
                for lookup, count in sorted(figures.cache.items()):
                    cache, result = lookup.rsplit("_", 1)
                    lookups.add_metric([*shared, cache, result], count)
        yield from (depth, queued, up, allocated, reserved, tasks, threads)
        yield from (compiles, compile_seconds, eager_calls, lookups)


class _Bound:
    """A labelled family with its `model` label filled in: `labels(**others)` as on the family
    (what an engine's code calls, unaware of the model label)."""

    def __init__(self, family: Counter | Gauge | Histogram, model: str) -> None:
        self.family = family
        self.model = model

    def labels(self, **values: str) -> Any:
        return self.family.labels(model=self.model, **values)


class _Child:
    """A family whose only label is `model`, as its child for one model: created on first use,
    so a view's families that are never recorded add no zero-valued series."""

    def __init__(self, family: Counter | Gauge | Histogram, model: str) -> None:
        self.family = family
        self.model = model

    def __getattr__(self, name: str) -> Any:  # inc, dec, set, observe
        def call(*args: Any, **kwargs: Any) -> Any:  # the series is made at the first call
            return getattr(self.family.labels(model=self.model), name)(*args, **kwargs)

        return call


class _BoundInfo:
    """`stt_model_info` with its `model` label filled in (the label replaces the info key)."""

    def __init__(self, family: Info, model: str) -> None:
        self.family = family
        self.model = model

    def info(self, values: dict[str, str]) -> None:
        child = self.family.labels(model=self.model)
        child.info({k: v for k, v in values.items() if k != "model"})


class Metrics:
    """The service's metrics on their own registry; `render()` gives the exposition text.

    With `by_model` (a server of several models, `STT_MODELS`) every family this module
    defines has a `model` label first: an engine records through `for_model(its name)`, a view
    with that label filled in; what belongs to no model (probes, refusals before a model was
    named, decode lanes, websocket slots, the event loop) has `model=""`. Without it (one
    model) the families are exactly as they always were and `for_model` is the object itself.
    """

    def __init__(self, *, by_model: bool = False) -> None:
        self.by_model = by_model
        self.model_label: str | None = None  # set on the views `for_model` makes
        self._root = self
        self._views: dict[str, Metrics] = {}
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        p = PREFIX

        # --- HTTP requests ---
        self.requests = Counter(
            f"{p}_requests",
            "HTTP requests answered, by endpoint, response format and status code",
            self._labels("endpoint", "response_format", "status"),
            registry=registry,
        )
        self.request_duration = Histogram(
            f"{p}_request_duration_seconds",
            "Wall time from request start to response end, by endpoint",
            self._labels("endpoint"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.rejections = Counter(
            f"{p}_rejections",
            "Requests refused, by reason (queue_full, deadline, too_large, bad_audio, ...)",
            self._labels("reason"),
            registry=registry,
        )
        self.cancellations = Counter(
            f"{p}_cancellations",
            "Accepted requests abandoned, by reason (client_gone, deadline)",
            self._labels("reason"),
            registry=registry,
        )

        # --- admission of uploads (service/engine/budget.py, service/api/gate.py) ---
        self.inflight_audio = Gauge(
            f"{p}_inflight_audio_seconds",
            "Decoded seconds of audio held by accepted uploads (STT_MAX_INFLIGHT_AUDIO_SECONDS)",
            labelnames=self._labels(),
            registry=registry,
        )
        self.decodes_pending = Gauge(
            f"{p}_decodes_pending",
            "Uploads waiting for or in decoding, by decode lane (small, large)",
            self._labels("lane"),
            registry=registry,
        )

        # --- queue and batches ---
        self.queue_wait = Histogram(
            f"{p}_queue_wait_seconds",
            "Time a request waited in the queue before its batch started",
            buckets=LATENCY_BUCKETS,
            labelnames=self._labels(),
            registry=registry,
        )
        self.batch_size = Histogram(
            f"{p}_batch_size",
            "Requests per batch",
            buckets=BATCH_BUCKETS,
            labelnames=self._labels(),
            registry=registry,
        )
        self.batch_padding = Histogram(
            f"{p}_batch_padding_ratio",
            "Fraction of a batch's (padded) audio that is padding",
            buckets=RATIO_BUCKETS,
            labelnames=self._labels(),
            registry=registry,
        )
        # --- continuous batching: the decoder steps of the engine's own loop ---
        self.step_duration = Histogram(
            f"{p}_decoder_step_duration_seconds",
            "Wall time of one decoder step of a running batch, by part: total (the step, "
            "token choice included) and model (the decoder forward alone)",
            self._labels("part"),
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.step_rows = Histogram(
            f"{p}_decoder_step_rows",
            "Rows of the running batch in one decoder step",
            buckets=BATCH_BUCKETS,
            labelnames=self._labels(),
            registry=registry,
        )
        self.rows_joined = Counter(
            f"{p}_rows_joined",
            "Requests that joined a running batch (encoded, first decoder step taken)",
            labelnames=self._labels(),
            registry=registry,
        )
        self.rows_left = Counter(
            f"{p}_rows_left",
            "Requests that left a running batch, by reason (finished, client_gone, deadline, "
            "failed)",
            self._labels("reason"),
            registry=registry,
        )
        self.stage_duration = Histogram(
            f"{p}_stage_duration_seconds",
            "Time per pipeline stage: decode (per request), features, encoder, decoding and "
            "detokenize (per batch)",
            self._labels("stage"),
            buckets=STAGE_BUCKETS,
            registry=registry,
        )

        # --- work done ---
        self.audio_seconds = Counter(
            f"{p}_audio_seconds",
            "Seconds of audio transcribed",
            labelnames=self._labels(),
            registry=registry,
        )
        self.tokens = Counter(
            f"{p}_generated_tokens",
            "Tokens generated (text tokens, after stripping special tokens)",
            labelnames=self._labels(),
            registry=registry,
        )
        self.real_time_factor = Histogram(
            f"{p}_real_time_factor",
            "Per request: (queue wait + compute) / audio duration; below 1 is faster than "
            "real time",
            buckets=RTF_BUCKETS,
            labelnames=self._labels(),
            registry=registry,
        )

        # --- workers ---
        self.worker_busy = Counter(
            f"{p}_worker_busy_seconds",
            "Seconds a device worker spent running batches",
            self._labels("worker", "device"),
            registry=registry,
        )
        self.worker_batches = Counter(
            f"{p}_worker_batches",
            "Batches a device worker ran",
            self._labels("worker", "device"),
            registry=registry,
        )
        self.worker_restarts = Counter(
            f"{p}_worker_restarts",
            "Device worker threads that died and were replaced",
            labelnames=self._labels(),
            registry=registry,
        )
        self.worker_failures = Counter(
            f"{p}_batch_failures",
            "Batches that failed, by error (out_of_memory, model_error)",
            self._labels("error"),
            registry=registry,
        )

        # --- streaming ---
        self.streams_active = Gauge(
            f"{p}_streams_active",
            "Open websocket streaming sessions",
            labelnames=self._labels(),
            registry=registry,
        )
        self.streams_opened = Counter(
            f"{p}_streams_opened",
            "Websocket streaming sessions accepted",
            labelnames=self._labels(),
            registry=registry,
        )
        self.streams_closed = Counter(
            f"{p}_streams_closed",
            "Websocket streaming sessions ended, by reason",
            self._labels("reason"),
            registry=registry,
        )
        self.partial_latency = Histogram(
            f"{p}_stream_partial_latency_seconds",
            "From the arrival of audio to the first partial that reflects it",
            buckets=LATENCY_BUCKETS,
            labelnames=self._labels(),
            registry=registry,
        )
        self.final_latency = Histogram(
            f"{p}_stream_final_latency_seconds",
            "From the detected end of an utterance to its final transcript",
            buckets=LATENCY_BUCKETS,
            labelnames=self._labels(),
            registry=registry,
        )

        # --- what is served ---
        self.model = Info(
            f"{p}_model",
            "The served model: name, architecture, encoder, decoder, devices, dtype",
            labelnames=self._labels(),
            registry=registry,
        )
        self.engine = _EngineCollector(by_model)
        registry.register(self.engine)

    def _labels(self, *names: str) -> list[str]:
        return ["model", *names] if self.by_model else list(names)

    def for_model(self, name: str) -> "Metrics":
        """These metrics with the `model` label set to `name` (one view per name, kept); the
        object itself when metrics are not split by model."""
        root = self._root
        if not root.by_model:
            return root
        view = root._views.get(name)
        if view is None:
            view = copy.copy(root)
            view.model_label = name
            for attr, family in vars(root).items():
                if isinstance(family, Info):
                    setattr(view, attr, _BoundInfo(family, name))
                elif isinstance(family, Counter | Gauge | Histogram):
                    if family._labelnames == ("model",):
                        setattr(view, attr, _Child(family, name))
                    else:
                        setattr(view, attr, _Bound(family, name))
            root._views[name] = view
        return view

    def bind_engine(self, state: EngineState) -> None:
        self.engine.states[self.model_label or ""] = state

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop whose tasks `stt_event_loop_tasks` counts (scraped on that loop)."""
        self.engine.loop = loop

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_duration.labels(stage=stage).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def family_names(self) -> list[str]:
        """Every family this module defines (process collectors excluded), as exposed."""
        names = list(_EngineCollector.NAMES)
        mine = (Counter, Gauge, Histogram, Info)
        for collector in (c for c in vars(self).values() if isinstance(c, mine)):
            for metric in collector.describe():  # an info family is exposed as `<name>_info`
                names.append(f"{metric.name}_info" if metric.type == "info" else metric.name)
        return names
