"""The request and result types that flow from the HTTP layer through the engine and back."""

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Callable
from typing import Literal

import numpy as np

from service.engine.timestamps import TimedSegment

Task = Literal["transcribe", "translate"]
_ids = itertools.count(1)


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """How to decode. Requests with equal `batch_key()` can share one `generate` call."""

    task: Task = "transcribe"
    language: str | None = None
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int = 64
    repetition_penalty: float = 1.0
    seed: int | None = None
    prompt: str | None = None
    words: bool = False  # word timestamps (cross-attention alignment after decoding)
    # Whisper: decode with its timestamp tokens (no <|notimestamps|>), segments timed by them
    timestamps: bool = False

    def batch_key(self) -> tuple[object, ...]:
        """Everything that must be equal within a batch (all fields: they all change decoding)."""
        return dataclasses.astuple(self)


@dataclasses.dataclass(frozen=True)
class WordTiming:
    """One word of a transcript and when it is spoken (seconds from the audio's start)."""

    word: str
    start: float
    end: float


@dataclasses.dataclass
class Transcript:
    """One request's result: text, token ids with their log-probabilities, and timings.

    `words` is filled only when word timestamps were asked for (`GenerationParams.words`).
    """

    text: str
    tokens: list[int]
    logprobs: list[float]
    language: str | None
    audio_seconds: float
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    batch_size: int = 1
    words: list[WordTiming] | None = None
    # Whisper with `GenerationParams.timestamps`: the segments its timestamp tokens delimit
    segments: "list[TimedSegment] | None" = None

    @property
    def avg_logprob(self) -> float:
        return float(np.mean(self.logprobs)) if self.logprobs else 0.0


@dataclasses.dataclass(eq=False)
class Job:
    """One request waiting for, or inside, the engine. Its future is resolved on the event loop."""

    audio: np.ndarray
    params: GenerationParams
    deadline: float  # time.monotonic() by which the result must be ready
    future: asyncio.Future[Transcript]
    loop: asyncio.AbstractEventLoop
    priority: int = 0  # higher runs first (streaming partials)
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    enqueued_at: float = dataclasses.field(default_factory=time.monotonic)
    started_at: float | None = None  # when its computation began (continuous batching)
    cancelled: bool = False  # set from the loop when the client leaves; read by workers
    # called on the worker thread with each generated token id and its log-probability
    # (greedy/sampling only)
    on_token: Callable[[int, float], None] | None = None

    @property
    def samples(self) -> int:
        return len(self.audio)

    def expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.monotonic()) >= self.deadline

    def alive(self) -> bool:
        """Still worth computing: client there and deadline not passed."""
        return not self.cancelled and not self.future.done() and not self.expired()

    def resolve(self, result: Transcript) -> None:
        """Hand the result to the waiting coroutine (callable from any thread)."""
        call_soon(self.loop, _set_result, self.future, result)

    def fail(self, error: BaseException) -> None:
        """Hand an error to the waiting coroutine (callable from any thread)."""
        call_soon(self.loop, _set_exception, self.future, error)


def call_soon(
    loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: object
) -> None:
    """`call_soon_threadsafe`, except that a closed loop (nobody left to tell) is no error:
    a worker finishing a batch after its requester's loop has ended must not die of it."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        if not loop.is_closed():
            raise


def _set_result(future: asyncio.Future[Transcript], result: Transcript) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Transcript], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
