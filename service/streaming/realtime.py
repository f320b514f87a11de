"""OpenAI Realtime transcription turns on top of the streaming session.

`RealtimeTurns` is a `StreamSession` whose moments (speech starts, an utterance ends or is
committed, a partial agrees on more words, a final is ready) are rendered as OpenAI Realtime
server events instead of this service's own protocol; the protocol itself (client events,
session configuration, limits) is `service.api.routes.realtime`'s. Transport-free: events go to
`post`, a non-blocking callable (the route's outbox), in the order they happen, so a
`speech_started` put while the audio arrives always precedes the deltas and the `completed` of
its item, which come later from the session's task.

Deltas go beyond OpenAI's: while the speaker is still talking, every word that LocalAgreement-2
commits (`service.streaming.agreement`) is sent at once as a delta; when the item's final
transcript is ready, the rest of it follows as one more delta, then `completed` with the whole
transcript. The final re-transcribes the whole item, so in rare cases it disagrees with words
already sent; then no further delta is sent, and `completed.transcript` is authoritative.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from service.engine.engine import Engine
from service.engine.types import GenerationParams, Transcript
from service.errors import ServiceError
from service.metrics import Metrics
from service.streaming.agreement import Hypothesis
from service.streaming.endpoint import Endpointer, Utterance
from service.streaming.session import StreamConfig, StreamSession

__all__ = ["MIN_COMMIT_MS", "AlwaysSpeech", "Conversation", "RealtimeTurns", "manual_endpointer"]

Event = dict[str, Any]
Post = Callable[[Event], None]

HOLD_BACK_WORDS: Final = 1
"""Committed words this close to the end of the current hypothesis wait before becoming deltas."""

MIN_COMMIT_MS: Final = 100
"""The least audio a commit takes, as OpenAI's ("buffer too small. Expected at least 100ms")."""


def new_id(prefix: str) -> str:
    """An OpenAI-style object id (`event_...`, `item_...`)."""
    return f"{prefix}_{secrets.token_hex(10)}"


def event(kind: str, **fields: Any) -> Event:
    """A server event with its own `event_id`."""
    return {"type": kind, "event_id": new_id("event"), **fields}


class AlwaysSpeech:
    """`SpeechDetector` for manual turn detection: every frame is speech, so the endpointer
    holds all audio since the last commit as one open utterance that only a commit ends."""

    def __init__(self, frame_samples: int) -> None:
        self.frame_samples = frame_samples

    def classify(self, frames: npt.NDArray[np.float32]) -> list[bool]:
        return [True] * len(frames)

    def reset(self) -> None:
        """Nothing to forget."""


def manual_endpointer(rate: int, max_buffer_seconds: float) -> Endpointer:
    """The buffer of manual mode (`turn_detection: null`): audio accumulates until a commit.

    The route refuses appends beyond `max_buffer_seconds`, so the one-second margin means the
    endpointer's own length cut never fires."""
    return Endpointer(
        rate,
        silence_ms=1000,
        min_speech_ms=MIN_COMMIT_MS,
        pre_roll_ms=0,
        max_utterance_seconds=max_buffer_seconds + 1.0,
        detector=AlwaysSpeech(round(rate * 0.02)),
    )


class Conversation:
    """What outlives one `RealtimeTurns` when a `session.update` replaces it: the last item
    (each commit names its predecessor) and the stream time already consumed."""

    def __init__(self) -> None:
        self.last_item: str | None = None
        self.offset_ms = 0.0


class RealtimeTurns(StreamSession):
    """One Realtime transcription session's audio, turns and transcripts (see module docstring).

    `vad` says whether turns are found by the server (server_vad: `speech_started` /
    `speech_stopped` are sent) or only by `commit` (manual). `logprobs` adds token
    log-probabilities to `completed`. `prefix_ms` is server_vad's `prefix_padding_ms`, reported
    in `audio_start_ms` as OpenAI does. `beta` renders the beta protocol's item event.
    """

    def __init__(
        self,
        engine: Engine,
        config: StreamConfig,
        params: GenerationParams,
        post: Post,
        metrics: Metrics,
        endpointer: Endpointer,
        *,
        conversation: Conversation,
        vad: bool,
        logprobs: bool,
        prefix_ms: int,
        beta: bool = False,
    ) -> None:
        async def send(ev: Event) -> None:
            post(ev)

        super().__init__(engine, config, params, send, metrics, endpointer=endpointer)
        self.post = post
        self.conversation = conversation
        self.vad = vad
        self.logprobs = logprobs
        self.prefix_ms = prefix_ms
        self.beta = beta  # beta clients get `conversation.item.created` instead of added/done
        self.items: dict[int, str] = {}  # utterance index -> item id, until its transcript
        self.sent: dict[int, list[str]] = {}  # words already sent as deltas, per utterance
        self.announced = False  # speech_started sent for the open utterance
        self.buffer_start = 0  # stream sample where the uncommitted buffer starts

    # --------------------------------------------------------------------- client actions

    @property
    def buffered_seconds(self) -> float:
        """Audio in the input buffer not yet committed (manual mode's bounded quantity)."""
        return (self.endpointer.samples_seen - self.buffer_start) / self.rate

    def commit(self) -> bool:
        """`input_audio_buffer.commit`: the open utterance becomes an item now. False (and
        nothing changes) when there is no speech to commit: in manual mode less than
        MIN_COMMIT_MS of audio since the last commit, in server_vad mode no open speech."""
        self._take(self.decoder.flush())
        utterance = self.endpointer.flush()
        if utterance is None:
            return False
        self._queue_final(utterance, time.monotonic())
        self.wake.set()
        return True

    def clear(self) -> None:
        """`input_audio_buffer.clear`: drop the uncommitted audio (and any open speech)."""
        self.decoder.flush()
        self.endpointer.clear()
        self.agreement.reset()
        self.items.pop(self.utterance, None)
        self.sent.pop(self.utterance, None)
        self.utterance += 1  # a partial of the dropped audio still in the engine is stale
        self.arrivals.clear()
        self.partial_covered = self.endpointer.samples_seen
        self.buffer_start = self.endpointer.samples_seen
        self.announced = False

    # ------------------------------------------------------------- moments → server events

    def _ms(self, seconds: float) -> int:
        return round(self.conversation.offset_ms + seconds * 1000)

    def _item(self, index: int) -> str:
        if index not in self.items:
            self.items[index] = new_id("item")
        return self.items[index]

    def _take(self, samples: npt.NDArray[np.float32]) -> None:
        super()._take(samples)
        if self.vad and self.endpointer.in_speech and not self.announced:
            self._announce(self.endpointer.open_start or 0.0)

    def _announce(self, start: float) -> None:
        self.announced = True
        self.post(
            event(
                "input_audio_buffer.speech_started",
                audio_start_ms=max(0, self._ms(start) - self.prefix_ms),
                item_id=self._item(self.utterance),
            )
        )

    def _queue_final(self, utterance: Utterance, detected_at: float) -> None:
        index = self.utterance
        item = self._item(index)
        if self.vad:
            if not self.announced:  # started and ended within one chunk of audio
                self._announce(utterance.start)
            self.post(
                event(
                    "input_audio_buffer.speech_stopped",
                    audio_end_ms=self._ms(utterance.end),
                    item_id=item,
                )
            )
        self.announced = False
        previous = self.conversation.last_item
        self.conversation.last_item = item
        self.post(event("input_audio_buffer.committed", item_id=item, previous_item_id=previous))
        message = {
            "id": item,
            "object": "realtime.item",
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        if self.beta:
            self.post(event("conversation.item.created", item=message, previous_item_id=previous))
        else:
            self.post(event("conversation.item.added", item=message, previous_item_id=previous))
            self.post(event("conversation.item.done", item=message, previous_item_id=previous))
        super()._queue_final(utterance, detected_at)
        self.buffer_start = self.endpointer.samples_seen

    async def _emit_partial(
        self, index: int, hypothesis: Hypothesis, start: float, audio_end: float
    ) -> None:
        sent = self.sent.setdefault(index, [])
        # The word at the edge of the audio heard so far is the least reliable: two hypotheses of
        # a half-spoken word often agree on the same wrong completion ("open the door" for
        # "open the ga-"). It is sent once a later word follows it, or with the final.
        words = len(hypothesis.committed) + len(hypothesis.tail)
        safe = hypothesis.committed[: max(0, words - HOLD_BACK_WORDS)]
        fresh = safe[len(sent) :]
        if not fresh:
            return
        delta = (" " if sent else "") + " ".join(fresh)
        sent.extend(fresh)
        self.post(self._delta(index, delta))

    def _delta(self, index: int, text: str) -> Event:
        return event(
            "conversation.item.input_audio_transcription.delta",
            item_id=self._item(index),
            content_index=0,
            delta=text,
        )

    async def _emit_final(self, index: int, utterance: Utterance, result: Transcript) -> None:
        item = self.items.pop(index, None) or new_id("item")
        self.items[index] = item  # for _delta, removed again below
        sent = " ".join(self.sent.pop(index, []))
        text = result.text
        if text != sent and (not sent or text.startswith(sent + " ")):
            self.post(self._delta(index, text[len(sent) :]))
        self.items.pop(index, None)
        completed = event(
            "conversation.item.input_audio_transcription.completed",
            item_id=item,
            content_index=0,
            transcript=text,
            usage={"type": "duration", "seconds": round(len(utterance.audio) / self.rate, 3)},
        )
        if self.logprobs:
            completed["logprobs"] = self._logprobs(result)
        self.post(completed)

    async def _emit_failure(self, index: int, utterance: Utterance, exc: ServiceError) -> None:
        self.sent.pop(index, None)
        self.post(
            event(
                "conversation.item.input_audio_transcription.failed",
                item_id=self.items.pop(index, None) or new_id("item"),
                content_index=0,
                error={
                    "type": exc.type,
                    "code": exc.code,
                    "message": exc.message,
                    "param": exc.param,
                },
            )
        )

    def _logprobs(self, result: Transcript) -> list[Event]:
        """OpenAI's `LogProbProperties` per generated token: its text, UTF-8 bytes, logprob."""
        tokenizer = self.engine.adapter.tokenizer
        out = []
        for token, logprob in zip(result.tokens, result.logprobs, strict=True):
            text = str(tokenizer.decode([token], skip_special_tokens=True))
            out.append({"token": text, "bytes": list(text.encode()), "logprob": logprob})
        return out

    def elapsed_ms(self) -> float:
        """Stream time of this session (for the next one's offset)."""
        return self.endpointer.samples_seen / self.rate * 1000
