"""Where a request waits and where its batch is formed.

One bounded queue per model. Event-loop code calls `submit()` (never blocks; rejects at once
when full). Worker threads call `next_batch()`, which takes the most urgent live job and adds
compatible jobs (same generation parameters; similar length; the same length bucket when the
model's output would change with padding, see `buckets`) within the batch-size and padded-audio
budgets, waiting up to `max_wait_ms` for company.
"""

import threading
import time
from collections.abc import Callable

from service.engine.buckets import bucket_samples
from service.engine.types import GenerationParams, Job
from service.errors import DeadlineExceeded, Overloaded, Unavailable

SIMILAR_LENGTH = 1.5  # a batch's longest clip is at most this times its shortest
ETA_MARGIN = 1.25  # admit only if the estimated wait, plus a quarter, fits the deadline
UPLOAD_SHARE = 3
"""While uploads (priority 0) wait, at least one batch in this many is led by the oldest of them:
streaming partials and finals outrank uploads, and without a share a few busy sessions kept the
workers to themselves (an upload waited until its 60 s deadline)."""


class Scheduler:
    """Bounded priority queue + batch formation. Thread-safe."""

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_batch_audio_seconds: float,
        max_queue_size: int,
        max_queued_audio_seconds: float,
        sampling_rate: int,
        padding_invariant: bool,
        length_free: bool = False,
        on_drop: Callable[[Job, str], None] | None = None,
        steppable: Callable[[GenerationParams], bool] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_batch_samples = int(max_batch_audio_seconds * sampling_rate)
        self.max_queue_size = max_queue_size
        self.max_queued_samples = int(max_queued_audio_seconds * sampling_rate)
        self.sampling_rate = sampling_rate
        self.padding_invariant = padding_invariant
        self.length_free = length_free  # rows are encoded alone: any lengths may share a batch
        self.on_drop = on_drop or (lambda job, reason: None)
        # continuous batching: jobs whose params decode step by step share a batch whatever
        # their params and lengths (each row has its own decoding state and is encoded alone)
        self.steppable = steppable
        self._jobs: list[Job] = []
        self._queued_samples = 0
        self._cond = threading.Condition()
        self._closed = False
        # Throughput estimate (audio seconds per wall second) for the wait-time check.
        self._rate = 0.0
        self._streak = 0  # batches in a row led by a priority job while an upload waited

    # --- producer side (event loop) ---

    def admit(self, deadline: float, samples: int = 0) -> None:
        """Raise `Overloaded`/`Unavailable` if a job of `samples` due by `deadline` would be
        refused now. Called before an upload is decoded, so a refusal costs no decoding."""
        with self._cond:
            self._admit(deadline, samples)

    def _admit(self, deadline: float, samples: int) -> None:
        if self._closed:
            raise Unavailable("the service is shutting down")
        if len(self._jobs) >= self.max_queue_size:
            raise Overloaded(
                "the request queue is full", retry_after=self._drain_eta(), code="queue_full"
            )
        if self._queued_samples + samples > self.max_queued_samples:
            raise Overloaded(
                "too much audio is queued", retry_after=self._drain_eta(), code="queue_full"
            )
        eta = self._drain_eta()
        # with a margin: the rate is measured on past batches, and a burst slows the next ones
        if self._rate and time.monotonic() + ETA_MARGIN * eta > deadline:
            raise Overloaded(
                f"estimated wait {eta:.1f} s exceeds the request's deadline",
                retry_after=eta,
                code="deadline",
            )

    def submit(self, job: Job) -> None:
        """Queue a job or raise `Overloaded`/`Unavailable` at once."""
        with self._cond:
            self._admit(job.deadline, job.samples)
            self._jobs.append(job)
            self._queued_samples += job.samples
            self._cond.notify()

    @property
    def throughput(self) -> float:
        """Measured audio seconds per wall second (0 until a batch has run)."""
        return self._rate

    def drain_eta(self) -> float:
        """Seconds to work off what is queued now (see `_drain_eta`)."""
        with self._cond:
            return self._drain_eta()

    def _drain_eta(self) -> float:
        """Seconds to work off the queued audio at the measured rate (1 s when unknown)."""
        if not self._rate:
            return 1.0
        return self._queued_samples / self.sampling_rate / self._rate

    def record_throughput(self, audio_seconds: float, wall_seconds: float) -> None:
        """Workers report each batch; an exponential average feeds `_drain_eta`."""
        if wall_seconds <= 0:
            return
        rate = audio_seconds / wall_seconds
        with self._cond:
            self._rate = rate if not self._rate else 0.8 * self._rate + 0.2 * rate

    def cancel(self, job: Job) -> None:
        """The client left: mark the job and take it out of the queue if it is still there."""
        job.cancelled = True
        with self._cond:
            if job in self._jobs:
                self._remove(job)
                self.on_drop(job, "client_gone")

    def close(self) -> None:
        """Refuse new work; queued jobs stay for the workers to drain."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def fail_all(self, message: str) -> None:
        """Fail everything still queued (shutdown after the drain timeout)."""
        with self._cond:
            jobs, self._jobs, self._queued_samples = self._jobs, [], 0
        for job in jobs:
            job.fail(Unavailable(message))

    @property
    def depth(self) -> int:
        return len(self._jobs)

    @property
    def queued_seconds(self) -> float:
        return self._queued_samples / self.sampling_rate

    # --- consumer side (worker threads) ---

    def next_batch(self, timeout: float | None = None) -> list[Job]:
        """Block until a batch is ready (or `timeout` passes: returns [])."""
        give_up = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                self._drop_dead()
                if self._jobs:
                    break
                if self._closed:
                    return []
                remaining = None if give_up is None else give_up - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return []
                self._cond.wait(remaining)
            lead = self._lead()
            wait_until = lead.enqueued_at + self.max_wait
            while True:
                batch = self._compatible(lead)
                now = time.monotonic()
                if len(batch) >= self.max_batch_size or now >= wait_until or self._closed:
                    break
                self._cond.wait(wait_until - now)
                self._drop_dead()
                if lead not in self._jobs:  # cancelled while we waited
                    return self.next_batch(None if give_up is None else max(0.0, give_up - now))
            for job in batch:
                self._remove(job)
            uploads_waiting = any(j.priority <= 0 for j in self._jobs)
            self._streak = self._streak + 1 if lead.priority > 0 and uploads_waiting else 0
            return batch

    def _lead(self) -> Job:
        """The most urgent job, except that uploads get every `UPLOAD_SHARE`-th batch."""
        if self._streak >= UPLOAD_SHARE - 1:
            uploads = [j for j in self._jobs if j.priority <= 0]
            if uploads:
                return min(uploads, key=lambda j: (j.enqueued_at, j.id))
        return max(self._jobs, key=lambda j: (j.priority, -j.enqueued_at, -j.id))

    def take_more(self, lead: Job, room: int, batch_samples: int) -> list[Job]:
        """Jobs that may join `lead`'s batch while it is still being encoded (length-free
        models only): up to `room` of them, within the audio budget, most urgent first."""
        if not self.length_free:
            return []
        with self._cond:
            self._drop_dead()
            key = lead.params.batch_key()
            candidates = sorted(
                (j for j in self._jobs if j.params.batch_key() == key),
                key=lambda j: (-j.priority, j.enqueued_at, j.id),
            )
            picked: list[Job] = []
            for job in candidates:
                if len(picked) >= room:
                    break
                if batch_samples + job.samples <= self.max_batch_samples:
                    picked.append(job)
                    batch_samples += job.samples
            for job in picked:
                self._remove(job)
            return picked

    def _compatible(self, lead: Job) -> list[Job]:
        """The lead plus the most urgent jobs that may share its `generate` call, or, for a
        lead that decodes step by step, its running batch."""
        if self._stepped(lead):
            return [lead, *self._rows(lead, self.max_batch_size - 1, lead.samples)]
        key = lead.params.batch_key()
        batch = [lead]
        shortest = longest = lead.samples
        candidates = sorted(
            (j for j in self._jobs if j is not lead and j.params.batch_key() == key),
            key=lambda j: (-j.priority, j.enqueued_at, j.id),
        )
        total = lead.samples
        for job in candidates:
            if len(batch) >= self.max_batch_size:
                break
            if self.length_free:  # no padding reaches the encoder: budget the real audio
                if total + job.samples <= self.max_batch_samples:
                    batch.append(job)
                    total += job.samples
                continue
            if not self.padding_invariant and self._bucket(job) != self._bucket(lead):
                continue
            lo, hi = min(shortest, job.samples), max(longest, job.samples)
            if hi > SIMILAR_LENGTH * max(lo, 1) or hi * (len(batch) + 1) > self.max_batch_samples:
                continue
            batch.append(job)
            shortest, longest = lo, hi
        return batch

    def _stepped(self, job: Job) -> bool:
        return self.steppable is not None and self.steppable(job.params)

    def _rows(self, lead: Job | None, room: int, held_samples: int) -> list[Job]:
        """Up to `room` of the most urgent step-by-step jobs (other than `lead`) whose audio
        fits the batch budget beside `held_samples`."""
        picked: list[Job] = []
        candidates = sorted(
            (j for j in self._jobs if j is not lead and self._stepped(j)),
            key=lambda j: (-j.priority, j.enqueued_at, j.id),
        )
        for job in candidates:
            if len(picked) >= room:
                break
            if held_samples + job.samples <= self.max_batch_samples:
                picked.append(job)
                held_samples += job.samples
        return picked

    def join_running(self, room: int, held_samples: int) -> list[Job]:
        """Work for a worker whose batch is running (never waits): the most urgent queued
        jobs that may join it, up to `room` and the audio budget; or, when the most urgent job
        must run through `generate` (beam search), that job's static batch, which the worker
        runs between two steps."""
        with self._cond:
            self._drop_dead()
            if not self._jobs:
                return []
            lead = self._lead()
            if self._stepped(lead):
                if room <= 0 or held_samples + lead.samples > self.max_batch_samples:
                    return []
                batch = [lead, *self._rows(lead, room - 1, held_samples + lead.samples)]
            else:
                batch = self._compatible(lead)
            for job in batch:
                self._remove(job)
            uploads_waiting = any(j.priority <= 0 for j in self._jobs)
            self._streak = self._streak + 1 if lead.priority > 0 and uploads_waiting else 0
            return batch

    def _bucket(self, job: Job) -> int:
        return bucket_samples(job.samples, self.sampling_rate)

    def _drop_dead(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._jobs if j.cancelled or j.future.done() or j.expired(now)]:
            self._remove(job)
            if job.expired(now) and not job.cancelled:
                job.fail(DeadlineExceeded("the request's deadline passed while it was queued"))
                self.on_drop(job, "deadline")
            else:
                self.on_drop(job, "client_gone")

    def _remove(self, job: Job) -> None:
        self._jobs.remove(job)
        self._queued_samples -= job.samples
