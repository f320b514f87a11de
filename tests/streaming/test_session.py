"""A long session against a real engine: bounded memory, bounded per-request audio, finals in
order, and partials that coalesce when the client sends faster than real time."""

import asyncio
from pathlib import Path

import numpy as np
import soxr

from service.engine.engine import Engine
from service.engine.types import GenerationParams
from service.metrics import Metrics
from service.streaming.session import MAX_PENDING_FINALS, StreamConfig, StreamSession
from tests.conftest import settings_for, speak

RATE = 16_000


def test_a_long_fast_session_stays_bounded(checkpoints: dict[str, Path]) -> None:
    engine = Engine.load(settings_for(checkpoints["wav2vec2-bert"], cpu_workers=1))
    engine.start()
    sizes: list[tuple[int, int]] = []  # (priority, samples) of every engine request
    original = engine.transcribe

    async def recording(audio: np.ndarray, params: GenerationParams, **kw: object):  # type: ignore[no-untyped-def]
        sizes.append((int(kw.get("priority", 0)), len(audio)))  # type: ignore[call-overload]
        return await original(audio, params, **kw)  # type: ignore[arg-type]

    engine.transcribe = recording  # type: ignore[method-assign]
    voice = soxr.resample(speak("set a timer for ten minutes"), 22_050, RATE).astype(np.float32)
    pause = np.zeros(RATE, np.float32)
    cycle = np.concatenate([voice, pause])
    repeats = int(300 * RATE / len(cycle))  # five minutes of speech with pauses
    events: list[dict[str, object]] = []
    peak = {"finals": 0}

    async def send(event: dict[str, object]) -> None:
        events.append(event)

    async def run() -> None:
        config = StreamConfig(max_utterance_seconds=4.0, partial_interval_ms=200)
        params = GenerationParams(max_new_tokens=8)
        session = StreamSession(engine, config, params, send, Metrics())
        pcm = (cycle * 32767).astype("<i2").tobytes()
        for _ in range(repeats):
            for offset in range(0, len(pcm), 6400):  # 200 ms frames, as fast as possible
                await session.feed(pcm[offset : offset + 6400])
                peak["finals"] = max(peak["finals"], len(session.finals))
        await session.finish()

    try:
        asyncio.run(run())
    finally:
        engine.stop()
    finals = [e for e in events if e["type"] == "transcript.final"]
    assert [f["utterance"] for f in finals] == list(range(repeats))  # one each, in order
    starts = [float(f["start"]) for f in finals]  # type: ignore[arg-type]
    assert np.allclose(np.diff(starts), len(cycle) / RATE, atol=0.05)
    assert peak["finals"] <= MAX_PENDING_FINALS + 1  # the reader waited instead of queueing
    assert max(samples for _, samples in sizes) <= 4.0 * RATE  # never more than one utterance
    partials = [e for e in events if e["type"] == "transcript.partial"]
    assert len(partials) < repeats  # coalesced: far fewer than one per 200 ms of new audio
    assert not [e for e in events if e["type"] == "error"]
