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
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
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
    )

    def __init__(self) -> None:
        self.state: EngineState | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def describe(self) -> Iterable[Metric]:
        return self._families(live=False)

    def collect(self) -> Iterable[Metric]:
        return self._families(live=True)

    def _families(self, *, live: bool) -> Iterator[Metric]:
        depth = GaugeMetricFamily(self.NAMES[0], "Requests waiting in the queue")
        queued = GaugeMetricFamily(self.NAMES[1], "Seconds of audio waiting in the queue")
        up = GaugeMetricFamily(
            self.NAMES[2], "1 if the device worker is alive", labels=["worker", "device"]
        )
        allocated = GaugeMetricFamily(
            self.NAMES[3], "CUDA memory allocated by tensors", labels=["device"]
        )
        reserved = GaugeMetricFamily(
            self.NAMES[4], "CUDA memory reserved by the caching allocator", labels=["device"]
        )
        tasks = GaugeMetricFamily(self.NAMES[5], "Tasks alive on the server's event loop")
        threads = GaugeMetricFamily(self.NAMES[6], "Threads alive in the process")
        if live:
            loop = self.loop
            tasks.add_metric([], len(asyncio.all_tasks(loop)) if loop is not None else 0)
            threads.add_metric([], threading.active_count())
        state = self.state
        if live and state is not None:
            depth.add_metric([], state.queue_depth())
            queued.add_metric([], state.queued_seconds())
            devices = set()
            for worker in state.workers():
                up.add_metric([str(worker.index), worker.device], float(worker.alive))
                devices.add(worker.device)
            for device in sorted(d for d in devices if d.startswith("cuda")):
                allocated.add_metric([device], torch.cuda.memory_allocated(device))
                reserved.add_metric([device], torch.cuda.memory_reserved(device))
        elif live:
            depth.add_metric([], 0)
            queued.add_metric([], 0)
        yield from (depth, queued, up, allocated, reserved, tasks, threads)


class Metrics:
    """The service's metrics on their own registry; `render()` gives the exposition text."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        p = PREFIX

        # --- HTTP requests ---
        self.requests = Counter(
            f"{p}_requests",
            "HTTP requests answered, by endpoint, response format and status code",
            ["endpoint", "response_format", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            f"{p}_request_duration_seconds",
            "Wall time from request start to response end, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.rejections = Counter(
            f"{p}_rejections",
            "Requests refused, by reason (queue_full, deadline, too_large, bad_audio, ...)",
            ["reason"],
            registry=registry,
        )
        self.cancellations = Counter(
            f"{p}_cancellations",
            "Accepted requests abandoned, by reason (client_gone, deadline)",
            ["reason"],
            registry=registry,
        )

        # --- admission of uploads (service/engine/budget.py, service/api/gate.py) ---
        self.inflight_audio = Gauge(
            f"{p}_inflight_audio_seconds",
            "Decoded seconds of audio held by accepted uploads (STT_MAX_INFLIGHT_AUDIO_SECONDS)",
            registry=registry,
        )
        self.decodes_pending = Gauge(
            f"{p}_decodes_pending",
            "Uploads waiting for or in decoding, by decode lane (small, large)",
            ["lane"],
            registry=registry,
        )

        # --- queue and batches ---
        self.queue_wait = Histogram(
            f"{p}_queue_wait_seconds",
            "Time a request waited in the queue before its batch started",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            f"{p}_batch_size",
            "Requests per batch",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.batch_padding = Histogram(
            f"{p}_batch_padding_ratio",
            "Fraction of a batch's (padded) audio that is padding",
            buckets=RATIO_BUCKETS,
            registry=registry,
        )
        # --- continuous batching: the decoder steps of the engine's own loop ---
        self.step_duration = Histogram(
            f"{p}_decoder_step_duration_seconds",
            "Wall time of one decoder step of a running batch, by part: total (the step, "
            "token choice included) and model (the decoder forward alone)",
            ["part"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.step_rows = Histogram(
            f"{p}_decoder_step_rows",
            "Rows of the running batch in one decoder step",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.rows_joined = Counter(
            f"{p}_rows_joined",
            "Requests that joined a running batch (encoded, first decoder step taken)",
            registry=registry,
        )
        self.rows_left = Counter(
            f"{p}_rows_left",
            "Requests that left a running batch, by reason (finished, client_gone, deadline, "
            "failed)",
            ["reason"],
            registry=registry,
        )
        self.stage_duration = Histogram(
            f"{p}_stage_duration_seconds",
            "Time per pipeline stage: decode (per request), features, encoder, decoding and "
            "detokenize (per batch)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )

        # --- work done ---
        self.audio_seconds = Counter(
            f"{p}_audio_seconds",
            "Seconds of audio transcribed",
            registry=registry,
        )
        self.tokens = Counter(
            f"{p}_generated_tokens",
            "Tokens generated (text tokens, after stripping special tokens)",
            registry=registry,
        )
        self.real_time_factor = Histogram(
            f"{p}_real_time_factor",
            "Per request: (queue wait + compute) / audio duration; below 1 is faster than "
            "real time",
            buckets=RTF_BUCKETS,
            registry=registry,
        )

        # --- workers ---
        self.worker_busy = Counter(
            f"{p}_worker_busy_seconds",
            "Seconds a device worker spent running batches",
            ["worker", "device"],
            registry=registry,
        )
        self.worker_batches = Counter(
            f"{p}_worker_batches",
            "Batches a device worker ran",
            ["worker", "device"],
            registry=registry,
        )
        self.worker_restarts = Counter(
            f"{p}_worker_restarts",
            "Device worker threads that died and were replaced",
            registry=registry,
        )
        self.worker_failures = Counter(
            f"{p}_batch_failures",
            "Batches that failed, by error (out_of_memory, model_error)",
            ["error"],
            registry=registry,
        )

        # --- streaming ---
        self.streams_active = Gauge(
            f"{p}_streams_active",
            "Open websocket streaming sessions",
            registry=registry,
        )
        self.streams_opened = Counter(
            f"{p}_streams_opened",
            "Websocket streaming sessions accepted",
            registry=registry,
        )
        self.streams_closed = Counter(
            f"{p}_streams_closed",
            "Websocket streaming sessions ended, by reason",
            ["reason"],
            registry=registry,
        )
        self.partial_latency = Histogram(
            f"{p}_stream_partial_latency_seconds",
            "From the arrival of audio to the first partial that reflects it",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.final_latency = Histogram(
            f"{p}_stream_final_latency_seconds",
            "From the detected end of an utterance to its final transcript",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

        # --- what is served ---
        self.model = Info(
            f"{p}_model",
            "The served model: name, architecture, encoder, decoder, devices, dtype",
            registry=registry,
        )
        self.engine = _EngineCollector()
        registry.register(self.engine)

    def bind_engine(self, state: EngineState) -> None:
        self.engine.state = state

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
