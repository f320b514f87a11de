"""The engine's face to the rest of the service: load, submit, await, stop."""

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import numpy as np
import torch

from service.engine import checkpoint, fastpath
from service.engine.adapter import ModelAdapter, ModelInfo
from service.engine.budget import AudioBudget
from service.engine.fastpath import FastPathOptions
from service.engine.pool import WorkerPool
from service.engine.scheduler import Scheduler
from service.engine.types import GenerationParams, Job, Transcript, call_soon
from service.errors import BadAudio, DeadlineExceeded, Overloaded, Unavailable
from service.metrics import EngineState, Metrics, WorkerState
from service.settings import Settings

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client disconnected while its request waited; nobody is left to answer."""


class Engine:
    """One model served by a pool of device workers behind one scheduler."""

    def __init__(
        self,
        settings: Settings,
        adapters: list[ModelAdapter],
        metrics: Metrics | None = None,
        *,
        cores: int | None = None,
    ) -> None:
        self.settings = settings
        self.info: ModelInfo = adapters[0].info
        # this model's view: every metric labelled with its name when a server has several
        self.metrics = (metrics or Metrics()).for_model(self.info.name)
        self.adapter = adapters[0]  # for request validation; every replica is alike
        self.scheduler = Scheduler(
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_batch_audio_seconds=settings.max_batch_audio_seconds,
            max_queue_size=settings.max_queue_size,
            max_queued_audio_seconds=settings.max_queued_audio_seconds,
            sampling_rate=self.info.sampling_rate,
            padding_invariant=self.info.padding_invariant,
            length_free=self.info.encode_separately,
            steppable=self.adapter.steppable if settings.batching == "continuous" else None,
        )
        self.audio_budget = AudioBudget(
            settings.max_inflight_audio_seconds,
            drain_rate=lambda: self.scheduler.throughput,
            on_change=self.metrics.inflight_audio.set,
        )
        cpu_workers = sum(a.device.type == "cpu" for a in adapters)
        cores = cores or os.cpu_count() or 1  # this model's share of them (`Settings.split_for`)
        share = cores if cpu_workers > 1 and not settings.cpu_threads else 0
        self.pool = WorkerPool(
            adapters,
            self.scheduler,
            share_cores=share,
            metrics=self.metrics,
            continuous=settings.batching == "continuous",
            join_per_step=settings.join_per_step,
        )
        if cpu_workers and not share:  # each worker thread sets it: several models, one process
            self.pool.threads = settings.threads_per_cpu_worker(cores, cpu_workers)
        self.started = False
        self.metrics.model.info(
            {
                "model": self.info.name,
                "architecture": self.info.architecture,
                "encoder": self.info.encoder,
                "decoder": self.info.decoder,
                "device": ",".join(sorted({str(a.device) for a in adapters})),
                "dtype": str(adapters[0].dtype).removeprefix("torch."),
            }
        )
        self.metrics.bind_engine(
            EngineState(
                queue_depth=lambda: self.scheduler.depth,
                queued_seconds=lambda: self.scheduler.queued_seconds,
                workers=lambda: [
                    WorkerState(w.index, w.device, w.alive) for w in self.pool.workers
                ],
                compiles=fastpath.figures,
            )
        )

    @classmethod
    def load(
        cls, settings: Settings, metrics: Metrics | None = None, *, cores: int | None = None
    ) -> "Engine":
        """Load one replica per device and warm each up (blocking: call off the event loop).

        With `cpu_workers` left at 0 the number of CPU replicas depends on the model's size, so
        the first replica is loaded before the others are counted. `cores`: the CPU cores this
        model's workers share (default: the machine's; a server of several models splits them).
        """
        cores = cores or os.cpu_count() or 1
        devices = settings.devices(torch.cuda.device_count(), cores)
        folder = checkpoint.resolve(settings.model) if settings.model else settings.model_dir
        fast = FastPathOptions(settings.compile, settings.quantize, settings.compile_cache_dir)
        first = ModelAdapter(folder, settings.served_name, devices[0], settings.dtype, fast=fast)
        if "cpu" in devices and not settings.cpu_workers:
            parameters = sum(p.numel() for p in first.model.parameters())
            devices = settings.devices(torch.cuda.device_count(), cores, parameters)
        if "cpu" in devices:  # torch's thread count is per process: every CPU worker gets it
            torch.set_num_threads(settings.threads_per_cpu_worker(cores, devices.count("cpu")))
        adapters = []
        for index, device in enumerate(devices):
            adapter = (
                first
                if index == 0
                else ModelAdapter(folder, settings.served_name, device, settings.dtype, fast=fast)
            )
            if settings.warmup:
                started = time.monotonic()
                adapter.warm_up()
                log.info("warmed up on %s in %.2f s", device, time.monotonic() - started)
            if adapter.fastpath.active:
                figures = fastpath.figures()
                log.info(
                    "fast paths on %s: %s (so far %d graphs compiled in %.1f s, cache %s)",
                    device,
                    adapter.fastpath.describe(),
                    figures.compiles,
                    figures.seconds,
                    figures.cache,
                )
            adapters.append(adapter)
        # probed once, at start-up, on the replica that validates requests
        log.info("the encoder takes inputs of %d samples or more", first.min_samples)
        return cls(settings, adapters, metrics, cores=cores)

    def start(self) -> None:
        self.pool.start()
        self.started = True

    @property
    def ready(self) -> bool:
        return self.started and self.pool.alive > 0 and not self.pool.draining.is_set()

    def stop(self) -> None:
        self.pool.stop(self.settings.drain_timeout_s)

    def submit(
        self,
        audio: np.ndarray,
        params: GenerationParams,
        *,
        timeout: float | None = None,
        deadline: float | None = None,
        priority: int = 0,
        tokens: "asyncio.Queue[tuple[int, float]] | None" = None,
    ) -> Job:
        """Queue the audio (raises `Overloaded`/`Unavailable` at once); await it with `result`.

        The deadline is `deadline` (monotonic time) if given, else now + `timeout` (default
        and cap from the settings). With `tokens`, each generated token id is put on that queue
        with its log-probability as it is generated (for streamed responses; greedy and
        sampling only).
        """
        if not self.ready:
            raise Unavailable("no model worker is ready")
        self.adapter.validate(params)
        self.check_length(len(audio))
        loop = asyncio.get_running_loop()
        job = Job(
            audio=audio,
            params=params,
            deadline=deadline or self.deadline(timeout),
            future=loop.create_future(),
            loop=loop,
            priority=priority,
        )
        if tokens is not None:
            sink = tokens

            def on_token(token: int, logprob: float) -> None:  # worker thread → event loop
                call_soon(loop, sink.put_nowait, (token, logprob))

            job.on_token = on_token
        self.scheduler.submit(job)
        return job

    def deadline(self, timeout: float | None = None) -> float:
        """The monotonic deadline of a request with this `timeout` (capped by the settings)."""
        budget = min(
            timeout or self.settings.request_timeout_s, self.settings.max_request_timeout_s
        )
        return time.monotonic() + budget

    async def result(
        self, job: Job, *, client_gone: Callable[[], Awaitable[object]] | None = None
    ) -> Transcript:
        """Wait for the job's transcript, its deadline, or the client leaving.

        `client_gone()` makes an awaitable that completes when the client disconnects. If the
        awaiting task is cancelled (the client's connection handler ended), the job is
        cancelled too: queued, it leaves the queue; generating, its row stops.
        """
        gone = asyncio.ensure_future(client_gone()) if client_gone is not None else None
        try:
            result = await self._await(job, gone)
        except (ClientGone, asyncio.CancelledError):
            self.metrics.cancellations.labels(reason="client_gone").inc()
            raise
        except DeadlineExceeded:
            self.metrics.cancellations.labels(reason="deadline").inc()
            raise
        finally:
            if gone is not None:
                gone.cancel()
        self._observe_rtf(result.queue_seconds + result.compute_seconds, result.audio_seconds)
        return result

    async def _await(self, job: Job, gone: "asyncio.Future[object] | None") -> Transcript:
        """The job's transcript; on the client leaving, the deadline or cancellation, the job
        is taken out of the queue (or its row stopped) before the error propagates."""
        waiters: set[asyncio.Future[object]] = {job.future}  # type: ignore[arg-type]
        if gone is not None:
            waiters.add(gone)
        try:
            done, _ = await asyncio.wait(
                waiters,
                timeout=max(0.0, job.deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        except asyncio.CancelledError:
            self.scheduler.cancel(job)
            raise
        if job.future in done:
            result = job.future.result()
            self.metrics.queue_wait.observe(result.queue_seconds)
            return result
        self.scheduler.cancel(job)
        if gone is not None and gone in done:
            raise ClientGone
        raise DeadlineExceeded("no result within the request's deadline")

    def check_length(self, samples: int) -> None:
        """400 `bad_audio` for audio the model cannot take as one input: shorter than the
        encoder's probed minimum (as OpenAI refuses clips under 0.1 s) or longer than its window.
        Checked before anything else looks at the audio, the no-speech gate included."""
        rate = self.info.sampling_rate
        if samples < self.adapter.min_samples:
            raise BadAudio(
                f"audio is too short: {samples} samples ({samples / rate * 1000:.1f} ms) "
                f"at {rate} Hz; the model needs at least {self.adapter.min_samples}",
                param="file",
            )
        longest = self.info.max_input_seconds
        if longest is not None and samples > longest * rate:
            raise BadAudio(
                f"audio is {samples / rate:.1f} s long; this model takes "
                f"windows of at most {longest:g} s",
                param="file",
            )

    async def transcribe(
        self,
        audio: np.ndarray,
        params: GenerationParams,
        *,
        timeout: float | None = None,
        priority: int = 0,
        client_gone: Callable[[], Awaitable[object]] | None = None,
    ) -> Transcript:
        """Queue the audio and wait for its transcript (`submit` then `result`)."""
        job = self.submit(audio, params, timeout=timeout, priority=priority)
        return await self.result(job, client_gone=client_gone)

    async def transcribe_pieces(
        self,
        pieces: Sequence[np.ndarray],
        params: GenerationParams,
        *,
        timeout: float | None = None,
        deadline: float | None = None,
        client_gone: Callable[[], Awaitable[object]] | None = None,
    ) -> AsyncIterator[Transcript]:
        """Transcribe the windows of one long request; yields their transcripts in order.

        The windows share the request's deadline and fate, and go through the scheduler
        together so they batch with each other (and with other requests). At most
        `max_batch_size` of them are queued or running at a time: a long file neither floods
        the queue ahead of other clients nor has all its windows' features in memory at once.
        If the first window finds the queue full the request is rejected (429); later ones wait
        for room until the deadline. Leaving early (the consumer stops, the client goes, the
        deadline passes) cancels every window still queued or running.
        """
        deadline = deadline or self.deadline(timeout)
        started = time.monotonic()
        gone = asyncio.ensure_future(client_gone()) if client_gone is not None else None
        window = max(1, self.settings.max_batch_size)
        jobs: dict[int, Job] = {}
        submitted = 0
        audio_seconds = 0.0
        try:
            for index in range(len(pieces)):
                while submitted < len(pieces) and submitted - index < window:
                    jobs[submitted] = await self._submit_waiting(
                        pieces[submitted], params, deadline, first=submitted == 0
                    )
                    submitted += 1
                result = await self._await(jobs.pop(index), gone)
                audio_seconds += result.audio_seconds
                yield result
        except (ClientGone, asyncio.CancelledError, GeneratorExit):
            self.metrics.cancellations.labels(reason="client_gone").inc()
            raise
        except DeadlineExceeded:
            self.metrics.cancellations.labels(reason="deadline").inc()
            raise
        finally:
            for job in jobs.values():
                self.scheduler.cancel(job)
            if gone is not None:
                gone.cancel()
        self._observe_rtf(time.monotonic() - started, audio_seconds)

    async def _submit_waiting(
        self, audio: np.ndarray, params: GenerationParams, deadline: float, *, first: bool
    ) -> Job:
        while True:
            try:
                return self.submit(audio, params, deadline=deadline)
            except Overloaded as exc:
                pause = min(1.0, max(0.05, exc.retry_after / 10))
                if first or time.monotonic() + pause >= deadline:
                    raise
                await asyncio.sleep(pause)

    def _observe_rtf(self, engine_seconds: float, audio_seconds: float) -> None:
        if audio_seconds > 0:
            self.metrics.real_time_factor.observe(engine_seconds / audio_seconds)
