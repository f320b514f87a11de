"""The device workers: one thread per device, each owning a model replica.

With continuous batching (the default) a worker runs the engine's own decoding loop: it keeps a
running `Batch`, and between two decoder steps lets finished, cancelled and expired rows leave
(answered or dropped, their memory freed) and newly encoded rows join (at most `join_per_step`
a step). Requests that must decode through `generate` (beam search, Whisper), and every request
with `batching=static`, run as static batches, one `generate` call each. A step or batch that
fails (out of memory, or any exception) is split in halves and retried, so only a request that
fails alone gets an error (500) and the rest of its batch is answered; a worker thread that dies
is replaced and its in-flight jobs fail with 503.
"""

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from service.engine.adapter import Decoded, ModelAdapter, TokenSink
from service.engine.batch import Batch, Row
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
        self.max_rows = pool.scheduler.max_batch_size  # halved by an out-of-memory step
        self._since = time.perf_counter()  # continuous: when the last rows finished
        self.batches_run = 0
        self.busy_seconds = 0.0
        self.thread = threading.Thread(target=self._main, name=f"worker-{index}", daemon=True)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def _main(self) -> None:
        try:
            if self.pool.continuous:
                self._loop()
                return
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

    # --- continuous batching: the engine's own decoding loop ---

    def _loop(self) -> None:
        """Step the running batch until shutdown; rows leave and join between steps.

        Joining policy: an idle worker takes a batch as the scheduler forms it (waiting up to
        `max_wait_ms` for company); a busy one takes, before each step, at most
        `join_per_step` newcomers that fit the batch-size and audio budgets, encodes them (each
        alone on CPU: the encoder is most of the compute and gains nothing from batching there),
        runs their first decoder step together and merges them into the running batch.
        """
        scheduler = self.pool.scheduler
        # one running batch, or several after an out-of-memory split (kept apart until idle)
        batches: list[Batch] = []
        while batches or not self.pool.stopping.is_set():
            running = sum(len(batch) for batch in batches)
            if not batches:
                self.max_rows = scheduler.max_batch_size
                jobs = scheduler.next_batch(timeout=0.5)
                self._since = time.perf_counter()  # busy from here: the throughput clock
                if not jobs and scheduler.depth == 0 and self.pool.draining.is_set():
                    return
            elif self.pool.stopping.is_set():  # past the drain timeout: finish what runs
                jobs = []
            else:
                room = min(self.pool.join_per_step, self.max_rows - running)
                held = sum(row.job.samples for batch in batches for row in batch.rows)
                jobs = scheduler.join_running(room, held)
            if jobs and not self.adapter.steppable(jobs[0].params):
                self.current = [*self._jobs_of(batches), *jobs]
                self.run_batch(jobs)  # beam search: one `generate` between two steps
                jobs = []
            batches = self._merge([*batches, *self._start(jobs)])
            self.current = self._jobs_of(batches)
            batches = [part for batch in batches for part in self._advance(batch)]
            self.current = self._jobs_of(batches)

    def _merge(self, batches: list[Batch]) -> list[Batch]:
        """Neighbouring batches merged while they fit `max_rows` together."""
        merged: list[Batch] = []
        for batch in batches:
            if merged and len(merged[-1]) + len(batch) <= self.max_rows:
                merged[-1] = Batch.concatenate([merged[-1], batch])
            else:
                merged.append(batch)
        return merged

    @staticmethod
    def _jobs_of(batches: list[Batch]) -> list[Job]:
        return [row.job for batch in batches for row in batch.rows]

    def _live(self, jobs: list[Job]) -> list[Job]:
        live = []
        for job in jobs:
            if job.expired():
                job.fail(DeadlineExceeded("the request's deadline passed before it ran"))
                self.pool.on_drop(job, "deadline")
            elif job.cancelled or job.future.done():
                self.pool.on_drop(job, "client_gone")
            else:
                live.append(job)
        return live

    def _start(self, jobs: list[Job]) -> list[Batch]:
        """Encode newcomers and take their first decoder step; the rows still decoding."""
        jobs = self._live(jobs)
        if not jobs:
            return []
        self.current = [*self.current, *jobs]
        self.pool.before_batch(self, jobs)
        self.adapter.take_clock()
        with self.pool.cpu_share():
            encoded = self._encode(jobs)
        rows = [
            Row.start(self.adapter, job.params, state, sink=job.on_token, job=job)
            for job, state in encoded
        ]
        metrics = self.pool.metrics
        for stage, seconds in self.adapter.take_clock().items():
            metrics.observe_stage(stage, seconds)
        metrics.worker_batches.labels(worker=str(self.index), device=self.device).inc()
        metrics.batch_size.observe(len(jobs))  # requests per batch: those that start together
        if not rows:
            return []
        for row in rows:
            row.job.started_at = time.monotonic()
        self.pool.metrics.rows_joined.inc(len(rows))
        return self._finish(self._step(Batch.from_rows(self.adapter, rows)))

    def _encode(self, jobs: list[Job]) -> list[tuple[Job, tuple[torch.Tensor, int]]]:
        """Each job's encoder output. Encoding that fails is retried in halves, so one
        request's bad input (or one too large for memory) fails that request only."""
        try:
            return list(zip(jobs, self.adapter.encode([job.audio for job in jobs]), strict=True))
        except Exception as exc:
            self._count_failure(exc, len(jobs))
            if len(jobs) == 1:
                self._fail(jobs, exc)
                return []
            half = len(jobs) // 2
            return self._encode(jobs[:half]) + self._encode(jobs[half:])

    def _count_failure(self, exc: Exception, rows: int) -> None:
        """Count a failed encode or step; out of memory also halves the running rows allowed
        (joins wait until rows leave) and clears the device's cache."""
        error = "out_of_memory" if isinstance(exc, torch.OutOfMemoryError) else "model_error"
        self.pool.metrics.worker_failures.labels(error=error).inc()
        if error == "out_of_memory":
            self.max_rows = max(1, min(self.max_rows, rows // 2))
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()

    def _advance(self, batch: Batch) -> list[Batch]:
        """Drop rows no longer wanted, take one step, answer the rows that finished."""
        wanted = [row for row in batch.rows if row.job.alive()]
        self._drop([row for row in batch.rows if not row.job.alive()])
        stepped = batch.filter(wanted)
        return self._finish(self._step(stepped)) if stepped is not None else []

    def _finish(self, batches: list[Batch]) -> list[Batch]:
        """Answer the rows that finished at the last step; the batches of the others."""
        out = []
        rate = self.adapter.info.sampling_rate
        for batch in batches:
            finished = [row for row in batch.rows if row.finished]
            for row in finished:
                self._answer(row)
            if finished:  # audio done per busy second, as a static batch reports it
                now = time.perf_counter()
                audio = sum(row.job.samples for row in finished) / rate
                self.pool.scheduler.record_throughput(audio, now - self._since)
                self._since = now
            self.pool.metrics.rows_left.labels(reason="finished").inc(len(finished))
            rest = batch.filter([row for row in batch.rows if not row.finished])
            if rest is not None:
                out.append(rest)
        return out

    def _step(self, batch: Batch) -> list[Batch]:
        """`batch.step()`, or on failure its halves, until only the rows that fail alone are
        left out (failed: 500 model_error / out of memory). Returns the rows that stepped, as
        one batch, or as several after running out of memory (`max_rows` halved: they stay
        apart, and no row joins, until the worker is idle)."""
        started = time.perf_counter()
        try:
            with self.pool.cpu_share():
                batch.step()
        except Exception as exc:
            self._count_failure(exc, len(batch))
            if len(batch) == 1:
                self._fail([batch.rows[0].job], exc)
                return []
            log.warning("a step of %d rows failed (%r): retrying in halves", len(batch), exc)
            half = len(batch) // 2
            parts = [batch.filter(batch.rows[:half]), batch.filter(batch.rows[half:])]
            return self._merge([out for part in parts if part for out in self._step(part)])
        elapsed = time.perf_counter() - started
        self.busy_seconds += elapsed
        metrics = self.pool.metrics
        metrics.step_duration.labels(part="total").observe(elapsed)
        metrics.step_duration.labels(part="model").observe(batch.model_seconds)
        metrics.step_rows.observe(len(batch))
        metrics.observe_stage("decoding", elapsed)
        metrics.worker_busy.labels(worker=str(self.index), device=self.device).inc(elapsed)
        return [batch]

    def _fail(self, jobs: list[Job], exc: Exception) -> None:
        if isinstance(exc, torch.OutOfMemoryError):
            message = "out of memory on a single request"
        else:
            log.error("request %d failed alone: %r", jobs[0].id, exc)
            message = f"the model failed on this request: {type(exc).__name__}"
        for job in jobs:
            job.fail(ModelFailure(message))
        self.pool.metrics.rows_left.labels(reason="failed").inc(len(jobs))

    def _drop(self, rows: list[Row]) -> None:
        """Rows whose client left or whose deadline passed: they stop costing compute now."""
        for row in rows:
            job = row.job
            reason = "deadline" if job.expired() else "client_gone"
            if reason == "deadline":  # (its waiter may have answered 504 already)
                job.fail(DeadlineExceeded("the request's deadline passed while it was decoding"))
            self.pool.on_drop(job, reason)
            self.pool.metrics.rows_left.labels(reason=reason).inc()

    def _answer(self, row: Row) -> None:
        job = row.job
        adapter = self.adapter
        clock = time.perf_counter()
        decoded = adapter.decoded(
            row.generated, row.logprobs, row.ids[: row.prompt_length], job.params
        )
        self.pool.metrics.observe_stage("detokenize", time.perf_counter() - clock)
        if job.params.words:
            decoded.words = adapter.word_timings(job.audio, decoded.tokens)
        now = time.monotonic()
        started = job.started_at or now
        rate = adapter.info.sampling_rate
        elapsed = now - started
        self.batches_run += 1
        metrics = self.pool.metrics
        metrics.audio_seconds.inc(job.samples / rate)
        metrics.tokens.inc(len(decoded.tokens))
        job.resolve(
            Transcript(
                text=decoded.text,
                tokens=decoded.tokens,
                logprobs=decoded.logprobs,
                language=decoded.language or job.params.language,
                audio_seconds=job.samples / rate,
                queue_seconds=max(0.0, started - job.enqueued_at),
                compute_seconds=elapsed,
                batch_size=row.companions,
                words=decoded.words,
            )
        )
        self.pool.after_batch(self, [job], elapsed)

    # --- static batching: one `generate` per batch ---

    def run_batch(self, batch: list[Job]) -> None:
        """Run one batch; every job in it ends resolved or failed."""
        live = self._live(batch)
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
        *,
        continuous: bool = False,
        join_per_step: int = 4,
    ) -> None:
        self.scheduler = scheduler
        self.continuous = continuous
        self.join_per_step = join_per_step
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
