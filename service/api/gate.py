"""Where an upload waits to be decoded: two lanes with bounded slots, deadlines, estimates.

Decoding runs in threads beside the model workers and competes with them for the cores. Without
a bound, a flood of uploads makes every request pay the decoding cost before the scheduler can
refuse it, and slows the workers so that accepted requests miss their deadlines. The gate lets
a few uploads decode at once and a bounded number wait; beyond that, a fast 429.

Decoding cost is read from the container header first (`service.audio.cost`): a 2.4 MB FLAC
can take 13 s to decode. Uploads whose decoding is expected to take over `LARGE_DECODE_SECONDS`
go to their own lane with fewer slots, so slow files wait behind each other, never in front of
short uploads. Each lane knows the decoding work admitted to it; an upload whose wait plus
decoding would pass its deadline is refused at once (429 `deadline`, with `Retry-After`), and
one whose deadline passes while it waits gets 504.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import send_error
from service.audio.cost import DecodeEstimate
from service.errors import DeadlineExceeded, Overloaded, ServiceError
from service.metrics import Metrics

LARGE_DECODE_SECONDS = 0.5
"""Expected decoding time above which an upload takes the large lane (about 10 minutes of
16 kHz audio, or 3 minutes at 192 kHz, on the 2-core CI machine)."""


class DecodeLane:
    """Slots for decoding, the uploads waiting for them, and the work they hold (seconds)."""

    def __init__(self, name: str, slots: int, waiting: int) -> None:
        self.name = name
        self.slots = slots
        self.max_waiting = waiting
        self.waiting = 0
        self.pending_work = 0.0  # expected decoding seconds of every upload waiting or decoding
        self.pending = 0
        self._semaphore: asyncio.Semaphore | None = None  # made on the serving loop

    @property
    def semaphore(self) -> asyncio.Semaphore:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.slots)
        return self._semaphore

    def eta(self) -> float:
        """Expected seconds until a newcomer starts decoding."""
        return self.pending_work / self.slots


class DecodeGate:
    """Two decode lanes: `slots` for short uploads, `large_slots` for slow ones.

    The expected decoding time of an upload is its header estimate times `correction`, the
    measured ratio of real to estimated decoding time (moving average).
    """

    def __init__(
        self, slots: int, waiting: int, large_slots: int = 1, metrics: Metrics | None = None
    ) -> None:
        self.small = DecodeLane("small", slots, waiting)
        self.large = DecodeLane("large", large_slots, max(2, waiting // 8))
        self.correction = 1.0
        self.metrics = metrics
        # Seconds from an upload's arrival to its submission to the engine (body, decoding):
        # a moving average that grows when the event loop and the decoders are congested.
        self.pre_queue_seconds = 0.0

    def lane_for(self, estimate: DecodeEstimate | None) -> DecodeLane:
        if estimate is None or self.work(estimate) <= LARGE_DECODE_SECONDS:
            return self.small
        return self.large

    def work(self, estimate: DecodeEstimate | None) -> float:
        return 0.0 if estimate is None else estimate.work_seconds * self.correction

    def admit(self, deadline: float, estimate: DecodeEstimate | None = None) -> None:
        """Raise `Overloaded` if this upload would wait (and decode) past `deadline`, or if its
        lane has no room to wait."""
        lane = self.lane_for(estimate)
        if lane.semaphore.locked() and lane.waiting >= lane.max_waiting:
            raise Overloaded(
                "too many uploads are waiting to be decoded",
                retry_after=max(1.0, lane.eta()),
                code="queue_full",
            )
        wait = lane.eta()
        if time.monotonic() + wait + self.work(estimate) > deadline:
            raise Overloaded(
                f"estimated decoding wait {wait:.1f} s plus {self.work(estimate):.1f} s of "
                "decoding exceeds the request's deadline",
                retry_after=max(1.0, wait),
                code="deadline",
            )

    @contextlib.asynccontextmanager
    async def slot(
        self, estimate: DecodeEstimate | None = None, deadline: float | None = None
    ) -> AsyncIterator[None]:
        """Hold a decode slot of the upload's lane; 504 if `deadline` passes while waiting."""
        lane = self.lane_for(estimate)
        work = self.work(estimate)
        if deadline is not None:
            self.admit(deadline, estimate)
        elif lane.semaphore.locked() and lane.waiting >= lane.max_waiting:
            raise Overloaded(
                "too many uploads are waiting to be decoded", retry_after=1, code="queue_full"
            )
        lane.pending_work += work
        lane.pending += 1
        self._observe(lane)
        try:
            lane.waiting += 1
            try:
                if deadline is None:
                    await lane.semaphore.acquire()
                else:
                    await asyncio.wait_for(
                        lane.semaphore.acquire(), max(0.0, deadline - time.monotonic())
                    )
            except TimeoutError:
                raise DeadlineExceeded(
                    "the request's deadline passed while it waited to be decoded"
                ) from None
            finally:
                lane.waiting -= 1
            try:
                yield
            finally:
                lane.semaphore.release()
        finally:
            lane.pending_work = max(0.0, lane.pending_work - work)
            lane.pending -= 1
            self._observe(lane)

    def record_pre_queue(self, seconds: float) -> None:
        """An upload reached the engine `seconds` after it arrived (moving average)."""
        self.pre_queue_seconds = 0.9 * self.pre_queue_seconds + 0.1 * max(0.0, seconds)

    def record(self, estimate: DecodeEstimate, seconds: float) -> None:
        """A decode took `seconds`: correct later estimates (bounded, moving average)."""
        if estimate.work_seconds <= 0.01:  # too short to say anything
            return
        ratio = min(8.0, max(0.25, seconds / estimate.work_seconds))
        self.correction = 0.8 * self.correction + 0.2 * ratio

    def _observe(self, lane: DecodeLane) -> None:
        if self.metrics is not None:
            self.metrics.decodes_pending.labels(lane=lane.name).set(lane.pending)


class EarlyAdmission:
    """ASGI middleware: refuse an upload with 429/503 before its body is parsed or decoded when
    the queue would refuse it anyway (judged against the default deadline, since the request's
    own `timeout` field is inside the body, less the time uploads lately took to get from here
    to the engine: parsing and decoding count against the deadline). Under overload a refusal
    then costs almost nothing but reading the bytes."""

    PATHS = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") in self.PATHS:
            engines = scope["app"].state.engines
            if engines is not None and engines.ready:
                gate: DecodeGate = scope["app"].state.decode_gate
                scope.setdefault("state", {})["arrived_at"] = time.monotonic()
                try:
                    # the model is named inside the body: refuse here only what every model's
                    # queue would refuse (one model: its own); the route checks its model's
                    refusal: ServiceError | None = None
                    for engine in engines:
                        deadline = engine.deadline(None)
                        try:
                            engine.scheduler.admit(deadline - gate.pre_queue_seconds)
                        except ServiceError as exc:
                            refusal = refusal or exc
                        else:
                            refusal = None
                            break
                    if refusal is not None:
                        raise refusal
                    gate.admit(deadline)  # the short-upload lane
                except ServiceError as exc:
                    await _refuse(scope, receive, send, exc)
                    return
        await self.app(scope, receive, send)


async def _refuse(scope: Scope, receive: Receive, send: Send, exc: ServiceError) -> None:
    # Read (and drop) the body first: a client still sending it when the answer comes and the
    # connection closes sees a reset instead of the 429. Reading is cheap; decoding is not.
    limit = scope["app"].state.settings.max_upload_bytes
    seen = 0
    while True:
        message = await receive()
        seen += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body") or seen > limit:
            break
    await send_error(scope, send, exc)
