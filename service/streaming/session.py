"""One live transcription session: audio frames in, partial and final transcripts out.

Transport-free (the websocket route feeds it frames and hands it a `send` coroutine). The open
utterance's audio is re-submitted to the engine at high priority every `partial_interval_ms` of
new audio; LocalAgreement-2 (`agreement`) decides which words are committed. When the endpointer
(`endpoint`) closes an utterance, its audio is transcribed once more, at the highest priority,
into exactly one final, and the buffer is dropped: memory and per-partial cost stay bounded
however long the session runs.

Each session has at most one request in the engine at a time, finals first, so finals arrive in
order and a client that sends faster than real time gets coalesced partials (each covers all the
audio so far) rather than a backlog. Finals waiting beyond `MAX_PENDING_FINALS` make `feed` wait,
which stops reading the socket: TCP flow control slows the client instead of memory growing.
"""

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.audio.windows import has_speech
from service.engine.engine import Engine
from service.engine.types import GenerationParams, Transcript
from service.errors import Overloaded, ServiceError, error_event
from service.languages import normalize_language
from service.metrics import Metrics
from service.streaming.agreement import Hypothesis, LocalAgreement
from service.streaming.endpoint import Endpointer, Utterance
from service.streaming.pcm import PcmDecoder, PcmEncoding
from service.streaming.vad import release

log = logging.getLogger(__name__)

Send = Callable[[dict[str, object]], Awaitable[None]]

PARTIAL_PRIORITY = 1  # ahead of uploads (0), which the scheduler still guarantees a share
FINAL_PRIORITY = 2  # ahead of partials: a final ends a user-visible wait
MAX_PENDING_FINALS = 4
# What one session's partials may cost. Each partial re-transcribes the whole open utterance, so
# without bounds eight sessions at 4x real time with 8 beams and 120 s utterances kept the
# workers busy with partials alone (issue 22). Partials are greedy (the final uses the session's
# beams), stop once the open utterance passes MAX_PARTIAL_SECONDS (the final still covers all of
# it), and the next partial waits PARTIAL_COST_FACTOR times as long as the last one took (queue
# wait included): a session's partials hold the engine at most about a quarter of the time, and
# fewer partials are asked for as the service gets busier.
PARTIAL_NUM_BEAMS = 1
MAX_PARTIAL_SECONDS = 30.0
PARTIAL_COST_FACTOR = 3.0


class StreamConfig(BaseModel):
    """A session's settings: the first JSON message (`{"type": "config", ...}`) or the query."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["config"] = "config"
    model: str | None = Field(None, description="Must name the loaded model (or an alias)")
    language: str | None = Field(None, max_length=32)
    task: Literal["transcribe", "translate"] = "transcribe"
    sample_rate: int = Field(16_000, ge=4_000, le=192_000, description="Input audio rate")
    encoding: PcmEncoding = "pcm_s16le"
    num_beams: int = Field(1, ge=1, le=64)
    max_new_tokens: int | None = Field(None, ge=1, le=4096)
    partials: bool = Field(True, description="Send transcript.partial events")
    partial_interval_ms: int = Field(500, ge=100, le=10_000)
    silence_duration_ms: int = Field(600, ge=100, le=10_000, description="Silence ending a turn")
    max_utterance_seconds: float = Field(15.0, ge=2, le=120)
    vad_threshold_db: float = Field(-50.0, ge=-100, le=0, description="Quietest speech level")
    vad: Literal["energy", "silero"] | None = Field(
        None, description="Voice-activity detector (default: the server's STT_STREAM_VAD)"
    )
    vad_threshold: float = Field(
        0.5, ge=0, le=1, description="Silero speech probability that starts speech"
    )

    @field_validator("language")
    @classmethod
    def _iso_639_1(cls, value: str | None) -> str | None:
        """The same rule as an upload's `language`: an ISO 639-1 code or an English name."""
        return normalize_language(value) if value else None


def utterance_seconds(config: StreamConfig, engine: Engine) -> float:
    """The longest utterance of a session: an utterance is one model input, so no longer than
    the model's window (Whisper: 30 s) whatever the config asks."""
    return min(config.max_utterance_seconds, engine.info.max_input_seconds or math.inf)


class StreamSession:
    """Turns one stream of audio frames into partial and final transcript events."""

    def __init__(
        self,
        engine: Engine,
        config: StreamConfig,
        params: GenerationParams,
        send: Send,
        metrics: Metrics,
        request_id: str | None = None,
        endpointer: Endpointer | None = None,
    ) -> None:
        """Start the session's task. `endpointer` (e.g. one with Silero VAD, from
        `service.streaming.vad.make_endpointer`) replaces the energy endpointer built from the
        config; the session owns it and gives its detector back when it ends."""
        self.engine = engine
        self.request_id = request_id  # carried by every error event of the session
        self.config = config
        self.params = params
        self.send = send
        self.metrics = metrics
        self.rate = engine.info.sampling_rate
        self.decoder = PcmDecoder(config.encoding, config.sample_rate, self.rate)
        self.endpointer = endpointer or Endpointer(
            self.rate,
            silence_ms=config.silence_duration_ms,
            max_utterance_seconds=utterance_seconds(config, engine),
            threshold_db=config.vad_threshold_db,
        )
        self.agreement = LocalAgreement()
        self.interval = int(config.partial_interval_ms * self.rate / 1000)
        self.finals: collections.deque[tuple[int, Utterance, float]] = collections.deque()
        self.utterance = 0  # index of the open (or next) utterance
        self.partial_covered = 0  # stream samples covered by the last partial request
        self.arrivals: collections.deque[tuple[int, float]] = collections.deque(maxlen=4096)
        self.partial_params = dataclasses.replace(
            params, num_beams=min(params.num_beams, PARTIAL_NUM_BEAMS)
        )
        self.next_partial_at = 0.0  # monotonic time before which no partial is sent
        self.wake = asyncio.Event()
        self.room = asyncio.Event()
        self.ended = False
        self.task = asyncio.create_task(self._run())

    @property
    def audio_seconds(self) -> float:
        return self.endpointer.samples_seen / self.rate

    async def feed(self, data: bytes) -> None:
        """Take one frame of the configured encoding (raises `BadFrame` on a malformed one)."""
        self._take(self.decoder.feed(data))
        while len(self.finals) > MAX_PENDING_FINALS and not self.task.done():
            self.room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.room.wait(), 1.0)

    async def finish(self) -> None:
        """End of stream: the open utterance becomes a final; returns once all are sent."""
        self._take(self.decoder.flush())
        last = self.endpointer.flush()
        if last is not None:
            self._queue_final(last, time.monotonic())
        self.ended = True
        self.wake.set()
        try:
            await self.task
        finally:
            release(self.endpointer)

    async def abort(self) -> None:
        """The client is gone: stop at once (a request in the engine is cancelled)."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task
        release(self.endpointer)

    def _take(self, samples: npt.NDArray[np.float32]) -> None:
        now = time.monotonic()
        for utterance in self.endpointer.feed(samples):
            self._queue_final(utterance, now)
        if self.endpointer.in_speech:
            self.arrivals.append((self.endpointer.samples_seen, now))
        self.wake.set()

    def _queue_final(self, utterance: Utterance, detected_at: float) -> None:
        self.finals.append((self.utterance, utterance, detected_at))
        self.utterance += 1
        self.arrivals.clear()
        self.partial_covered = self.endpointer.samples_seen

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while True:
                if self.finals:
                    await self._final(*self.finals.popleft())
                    self.room.set()
                elif self.ended:
                    return
                elif self._partial_due():
                    await self._partial()
                else:
                    break

    def _partial_due(self) -> bool:
        seen = self.endpointer.samples_seen
        start = self.endpointer.open_start
        return (
            self.config.partials
            and start is not None
            and seen - self.partial_covered >= self.interval
            and seen / self.rate - start <= MAX_PARTIAL_SECONDS
            and time.monotonic() >= self.next_partial_at
        )

    def _wake_for_partial(self) -> None:
        """A partial held back by its cost becomes due without new audio: wake up then."""
        delay = self.next_partial_at - time.monotonic()
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self.wake.set)

    async def _partial(self) -> None:
        index = self.utterance
        covered = self.endpointer.samples_seen
        audio = self.endpointer.open_audio
        start = self.endpointer.open_start
        oldest = next((t for end, t in self.arrivals if end > self.partial_covered), None)
        self.partial_covered = covered
        if not has_speech(audio, self.rate):  # nothing to say yet: no model call, no partial
            return
        asked = time.monotonic()
        try:
            result = await self.engine.transcribe(
                audio, self.partial_params, priority=PARTIAL_PRIORITY
            )
        except ServiceError as exc:  # a skipped partial is superseded by the next one
            log.debug("partial skipped: %s", exc.message)
            return
        finally:
            took = time.monotonic() - asked
            self.next_partial_at = time.monotonic() + PARTIAL_COST_FACTOR * took
            self._wake_for_partial()
        if index != self.utterance:  # the utterance ended meanwhile: its final supersedes this
            return
        hypothesis = self.agreement.update(result.text.split())
        while self.arrivals and self.arrivals[0][0] <= covered:
            self.arrivals.popleft()
        await self._emit_partial(index, hypothesis, start or 0.0, covered / self.rate)
        if oldest is not None:
            self.metrics.partial_latency.observe(time.monotonic() - oldest)

    async def _final(self, index: int, utterance: Utterance, detected_at: float) -> None:
        self.agreement.reset()
        try:
            result = await self._transcribe_final(utterance)
        except ServiceError as exc:
            await self._emit_failure(index, utterance, exc)
            return
        await self._emit_final(index, utterance, result)
        self.metrics.final_latency.observe(time.monotonic() - detected_at)

    # How events look on the wire: this protocol's; `service.streaming.realtime` renders the
    # same moments as OpenAI Realtime events.

    async def _emit_partial(
        self, index: int, hypothesis: Hypothesis, start: float, audio_end: float
    ) -> None:
        await self.send(
            {
                "type": "transcript.partial",
                "utterance": index,
                "committed": hypothesis.committed_text,
                "tail": hypothesis.tail_text,
                "text": hypothesis.text,
                "start": round(start, 3),
                "audio_end": round(audio_end, 3),
            }
        )

    async def _emit_final(self, index: int, utterance: Utterance, result: Transcript) -> None:
        await self.send(
            {
                "type": "transcript.final",
                "utterance": index,
                "text": result.text,
                "start": round(utterance.start, 3),
                "end": round(utterance.end, 3),
                "reason": utterance.reason,
            }
        )

    async def _emit_failure(self, index: int, utterance: Utterance, exc: ServiceError) -> None:
        await self.send(error_event(exc, self.request_id, utterance=index))

    async def _transcribe_final(self, utterance: Utterance) -> Transcript:
        """A final is never dropped for a full queue: it waits and retries until its deadline.

        An utterance with no speech in it (the endpointer opened one on hiss, hum or a held
        tone) is answered with no words, as an upload of the same audio is, without the model:
        trained only on speech, it would make words up."""
        if not has_speech(utterance.audio, self.rate):
            return Transcript(
                text="",
                tokens=[],
                logprobs=[],
                language=self.params.language,
                audio_seconds=len(utterance.audio) / self.rate,
            )
        give_up = time.monotonic() + self.engine.settings.request_timeout_s
        while True:
            try:
                return await self.engine.transcribe(
                    utterance.audio, self.params, priority=FINAL_PRIORITY
                )
            except Overloaded as exc:
                pause = min(1.0, max(0.05, exc.retry_after / 10))
                if time.monotonic() + pause > give_up:
                    raise
                await asyncio.sleep(pause)
