"""The device workers: one thread per device, each owning a model replica.

A worker takes batches from the scheduler, runs them off the event loop and resolves each job's
future. A batch that fails (out of memory, or any exception) is split in halves and retried, so
only a request that fails alone gets an error (500) and the rest of its batch is answered; a
worker thread that dies is replaced and its in-flight jobs fail with 503.
"""

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from service.engine.adapter import Decoded, ModelAdapter, TokenSink
from service.engine.buckets import bucket_samples
from service.engine.scheduler import Scheduler
from service.engine.types import Job, Transcript
from service.errors import DeadlineExceeded, ModelFailure, Unavailable
from service.metrics import Metrics

log = logging.getLogger(__name__)


class Worker:
    """One device's loop: next batch → generate → resolve futures."""

    def __init__(self, pool: "WorkerPool", adapter: ModelAdapter, index: int) -> None:
        self.pool = pool
        self.adapter = adapter
        self.index = index
        self.device = str(adapter.device)
        self.current: list[Job] = []
        self.batches_run = 0
        self.busy_seconds = 0.0
        self.thread = threading.Thread(target=self._main, name=f"worker-{index}", daemon=True)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def _main(self) -> None:
        try:
            while not self.pool.stopping.is_set():
                batch = self.pool.scheduler.next_batch(timeout=0.5)
                if not batch:
                    if self.pool.scheduler.depth == 0 and self.pool.draining.is_set():
                        return
                    continue
                self.current = batch
                self.run_batch(batch)
                self.current = batch = []  # let the jobs' audio go while the next batch forms
        except BaseException as exc:  # the thread is dying: answer its jobs, then get replaced
            log.exception("worker %d died", self.index)
            self.pool.replace(self)  # first, so the service is never without a worker
            for job in self.current:
                job.fail(Unavailable(f"worker {self.index} crashed ({type(exc).__name__})"))
            self.current = []

    def run_batch(self, batch: list[Job]) -> None:
        """Run one batch; every job in it ends resolved or failed."""
        live = []
        for job in batch:
            if job.expired():
                job.fail(DeadlineExceeded("the request's deadline passed before it ran"))
                self.pool.on_drop(job, "deadline")
            elif job.cancelled or job.future.done():
                self.pool.on_drop(job, "client_gone")
            else:
                live.append(job)
        if live:
            self._generate(live)

    def _generate(self, jobs: list[Job]) -> None:
        started = time.monotonic()
        timings: dict[str, float] = {}
        try:
            self.pool.before_batch(self, jobs)
            with self.pool.cpu_share():
                rows = self.adapter.transcribe(
                    [j.audio for j in jobs],
                    jobs[0].params,
                    wanted=lambda: [j.alive() for j in jobs],
                    timings=timings,
                    sinks=[j.on_token for j in jobs],
                    grow=self._grower(jobs) if self.adapter.info.encode_separately else None,
                )
        except torch.OutOfMemoryError:
            self.pool.metrics.worker_failures.labels(error="out_of_memory").inc()
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            if len(jobs) == 1:
                jobs[0].fail(ModelFailure("out of memory on a single request"))
                return
            log.warning("out of memory on a batch of %d: splitting", len(jobs))
            half = len(jobs) // 2
            self._generate(jobs[:half])
            self._generate(jobs[half:])
            return
        except Exception as exc:
            self.pool.metrics.worker_failures.labels(error="model_error").inc()
            if len(jobs) > 1:  # find the request that breaks the model; the others still run
                log.warning("batch of %d failed (%r): retrying in halves", len(jobs), exc)
                half = len(jobs) // 2
                self._generate(jobs[:half])
                self._generate(jobs[half:])
                return
            log.exception("request %d failed alone", jobs[0].id)
            jobs[0].fail(ModelFailure(f"the model failed on this request: {type(exc).__name__}"))
            return
        elapsed = time.monotonic() - started
        self.batches_run += 1
        self.busy_seconds += elapsed
        audio_seconds = sum(j.samples for j in jobs) / self.adapter.info.sampling_rate
        self.pool.scheduler.record_throughput(audio_seconds, elapsed)
        self._observe(jobs, rows, elapsed, timings, audio_seconds)
        for job, row in zip(jobs, rows, strict=True):
            job.resolve(
                Transcript(
                    text=row.text,
                    tokens=row.tokens,
                    logprobs=row.logprobs,
                    language=row.language or job.params.language,
                    audio_seconds=job.samples / self.adapter.info.sampling_rate,
                    queue_seconds=max(0.0, started - job.enqueued_at),
                    compute_seconds=elapsed,
                    batch_size=len(jobs),
                    words=row.words,
                    segments=row.segments,
                )
            )
        self.pool.after_batch(self, jobs, elapsed)

    def _grower(self, jobs: list[Job]) -> Callable[[], list[tuple[np.ndarray, TokenSink | None]]]:
        """More rows for a batch whose rows are encoded one by one (`encode_separately`).

        Encoding takes most of a CPU batch's time; requests that arrive meanwhile join this
        batch's decoder steps (where batching pays) instead of waiting for the next batch, up
        to the batch-size and audio budgets. `jobs` grows in place, so a failure, a
        cancellation or the results cover the grown rows too.
        """
        scheduler = self.pool.scheduler

        def grow() -> list[tuple[np.ndarray, TokenSink | None]]:
            room = scheduler.max_batch_size - len(jobs)
            if room <= 0:
                return []
            extra = scheduler.take_more(jobs[0], room, sum(j.samples for j in jobs))
            jobs.extend(extra)
            return [(j.audio, j.on_token) for j in extra]

        return grow

    def _observe(
        self,
        jobs: list[Job],
        rows: list[Decoded],
        elapsed: float,
        timings: dict[str, float],
        audio_seconds: float,
    ) -> None:
        metrics = self.pool.metrics
        labels = {"worker": str(self.index), "device": self.device}
        metrics.worker_busy.labels(**labels).inc(elapsed)
        metrics.worker_batches.labels(**labels).inc()
        metrics.batch_size.observe(len(jobs))
        metrics.batch_padding.observe(self._padding(jobs))
        for stage, seconds in timings.items():
            metrics.observe_stage(stage, seconds)
        metrics.audio_seconds.inc(audio_seconds)
        metrics.tokens.inc(sum(len(row.tokens) for row in rows))

    def _padding(self, jobs: list[Job]) -> float:
        """The fraction of the batch's padded audio (rows x longest padded row) that is padding."""
        rate = self.adapter.info.sampling_rate
        invariant = self.adapter.info.padding_invariant
        padded = max(j.samples if invariant else bucket_samples(j.samples, rate) for j in jobs)
        return 1.0 - sum(j.samples for j in jobs) / max(1, padded * len(jobs))


class WorkerPool:
    """Starts, watches and stops the workers."""

    def __init__(
        self,
        adapters: list[ModelAdapter],
        scheduler: Scheduler,
        on_drop: Callable[[Job, str], None] | None = None,
        share_cores: int = 0,
        metrics: Metrics | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.metrics = metrics or Metrics()
        self.share_cores = share_cores  # >0: busy CPU workers split this many cores
        self.threads = 0  # >0 (and no sharing): torch threads each worker thread sets for itself
        self._busy = 0
        self.stopping = threading.Event()
        self.draining = threading.Event()
        self.on_drop = on_drop or (lambda job, reason: None)
        self.workers = [Worker(self, adapter, i) for i, adapter in enumerate(adapters)]
        self.restarts = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def cpu_share(self) -> Iterator[None]:
        """While busy, the CPU workers split the cores between them.

        torch's thread count is per process, and an operation reads it when it starts: a lone
        busy worker gets every core (single-request latency), several busy ones get a share
        each (throughput), and the split follows each start and end of a batch.
        """
        if not self.share_cores:
            if self.threads and torch.get_num_threads() != self.threads:
                # read first: a thread's first read copies the process's count over its own
                torch.set_num_threads(self.threads)
            yield
            return
        with self._lock:
            self._busy += 1
            torch.set_num_threads(max(1, self.share_cores // self._busy))
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
                torch.set_num_threads(max(1, self.share_cores // max(1, self._busy)))

    # Hooks for metrics and fault injection; the defaults do nothing.
    def before_batch(self, worker: Worker, jobs: list[Job]) -> None:
        pass

    def after_batch(self, worker: Worker, jobs: list[Job], seconds: float) -> None:
        pass

    def start(self) -> None:
        for worker in self.workers:
            worker.thread.start()

    def replace(self, dead: Worker) -> None:
        """Start a fresh thread on the dead worker's replica (unless shutting down)."""
        if self.stopping.is_set():
            return
        with self._lock:
            fresh = Worker(self, dead.adapter, dead.index)
            self.workers[dead.index] = fresh
            self.restarts += 1
            self.metrics.worker_restarts.inc()
            fresh.thread.start()

    @property
    def alive(self) -> int:
        return sum(w.alive for w in self.workers)

    def stop(self, drain_timeout: float) -> None:
        """Refuse new work, let queued and in-flight work finish up to the timeout, then stop."""
        self.scheduler.close()
        self.draining.set()
        deadline = time.monotonic() + drain_timeout
        for worker in list(self.workers):
            worker.thread.join(max(0.0, deadline - time.monotonic()))
        self.stopping.set()
        self.scheduler.fail_all("the service shut down before this request could run")
        for worker in list(self.workers):
            worker.thread.join(5)
