"""Benchmark: live transcription latency of N concurrent real-time websocket sessions.

    python -m bench.stream                         # 1, 4, 8 and 16 sessions
    python -m bench.stream --sessions 1 4 16 --json stream.json
    python -m bench.stream --protocol realtime --sessions 1 4 16   # OpenAI Realtime sessions

For each N a fresh `python -m service` is started and N clients each stream about
`--seconds-per-session` of spoken commands (espeak-ng, the bundled model's domain, each phrase
followed by a second of silence) as 20 ms pcm_s16le frames at real-time pace, session starts
staggered over the first second. Latencies are measured by the clients, on their own clock:

- partial: for every frame inside a phrase, from sending it to the first `transcript.partial`
  whose `audio_end` covers it (or the utterance's `transcript.final`, if that comes first);
- final: from sending the frame in which the endpoint could first be found (`end` of the final
  plus the session's `silence_duration_ms`) to receiving the final.

With `--protocol realtime` the clients speak the OpenAI Realtime API instead (server_vad, 20 ms
`input_audio_buffer.append` events of 24 kHz pcm16) and measure: first delta, from sending the
frame where a phrase starts to the first transcription delta of its item; completed, from
sending the frame that completes `speech end + silence_duration_ms` (when the end can first be
known) to `completed`, and from the phrase's last sample to `completed`; one `completed` per
phrase, and whether each transcript equals the upload of that phrase.

The server's own `stt_stream_*_latency_seconds` and `stt_batch_size` means (from `/metrics`)
are printed next to them as a cross-check. Absolute numbers depend on the machine; the client
shares it with the server, so its CPU use and how far it fell behind its schedule are shown too.
"""

import asyncio
import base64
import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import soxr
from websockets.asyncio.client import connect

from bench import common
from bench.common import percentile, speak
from bench.serverproc import running_server, scrape

RATE = 22_050  # espeak-ng's native rate: the server resamples to the model's rate
FRAME_SECONDS = 0.02
FRAME = round(RATE * FRAME_SECONDS)  # 441 samples per frame
PAUSE_SECONDS = 1.0
LEAD_SECONDS = 0.3
LOUD = 1e-3  # a phrase's true bounds: its first and last sample louder than this
PHRASES = (  # the bundled model's domain (`model_store.domain`)
    "turn on the lights",
    "three four five",
    "set a timer for five minutes",
    "open the garage",
    "seven eight nine",
    "call mom",
    "play the radio",
    "two zero one six",
)
TARGET_SESSIONS = 16
TARGET_PARTIAL_P95 = 1.0
TARGET_FINAL_P95 = 0.5
PACE_TOLERANCE = 0.1  # a sender further behind its schedule than this did not keep real time

Event = dict[str, Any]


@dataclass(frozen=True)
class SessionAudio:
    """One session's audio (float32 at RATE), its phrases' true bounds (samples) and texts."""

    audio: npt.NDArray[np.float32]
    bounds: list[tuple[int, int]]
    texts: list[str]

    @property
    def seconds(self) -> float:
        return len(self.audio) / RATE

    def pcm16(self) -> bytes:
        return (np.clip(self.audio, -1, 1) * 32767).astype("<i2").tobytes()


@dataclass
class SessionRun:
    """What one client saw: when each frame went out, and every event with its arrival time."""

    sent: list[float] = field(default_factory=list)
    events: list[tuple[float, Event]] = field(default_factory=list)
    end_sent: float = 0.0
    max_lag: float = 0.0
    close_code: int | None = None


@dataclass
class Row:
    """One N's measurements (client side, then the server's own figures)."""

    sessions: int
    partial_p50: float
    partial_p95: float
    final_p50: float
    final_p95: float
    partials_per_audio_s: float
    finals: int
    phrases: int
    sessions_ok: int
    exact_finals: int
    errors: int
    uncovered_frames: int
    max_send_lag: float
    client_cpu: float
    server_cpu: float
    server_partial_mean: float
    server_final_mean: float
    server_mean_batch: float
    mismatches: list[str] = field(default_factory=list)


def build_sessions(count: int, seconds: float) -> list[SessionAudio]:
    """Each session: the phrases, rotated by the session's index, each then a pause, repeated
    until `seconds` of audio. Speech is synthesised once."""
    voices = {text: speak(text) for text in PHRASES}
    silence = np.zeros(round(PAUSE_SECONDS * RATE), np.float32)
    sessions = []
    for index in range(count):
        parts = [np.zeros(round(LEAD_SECONDS * RATE), np.float32)]
        at = len(parts[0])
        bounds: list[tuple[int, int]] = []
        texts: list[str] = []
        turn = index
        while at < seconds * RATE:
            text = PHRASES[turn % len(PHRASES)]
            turn += 1
            voice = voices[text]
            loud = np.flatnonzero(np.abs(voice) > LOUD)
            bounds.append((at + int(loud[0]), at + int(loud[-1])))
            texts.append(text)
            parts += [voice, silence]
            at += len(voice) + len(silence)
        sessions.append(SessionAudio(np.concatenate(parts), bounds, texts))
    return sessions


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (from /proc; NaN where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_means(url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of the streaming latency histograms and the batch size, from /metrics."""
    wanted = {
        "stt_stream_partial_latency_seconds",
        "stt_stream_final_latency_seconds",
        "stt_batch_size",
    }
    totals = {name: [0.0, 0.0] for name in wanted}
    for name, _, value in scrape(url):
        family, _, part = name.rpartition("_")
        if family in wanted and part in ("sum", "count"):
            totals[family][part == "count"] += value
    return {name: (total, count) for name, (total, count) in totals.items()}


async def stream_session(
    url: str,
    audio: SessionAudio,
    connected: asyncio.Event,
    clock: "asyncio.Future[float]",
    offset: float,
    pace: bool,
) -> SessionRun:
    """Connect (then set `connected`), wait for the common start (`clock`) plus `offset`, send
    frame k at start + k * 20 ms (each on its own schedule, so lateness never accumulates), then
    `end`; read events until the server closes."""
    run = SessionRun()
    data = audio.pcm16()
    step = 2 * FRAME
    async with connect(url, max_size=None) as ws:

        async def read() -> None:
            async for message in ws:
                run.events.append((time.monotonic(), json.loads(message)))

        reader = asyncio.create_task(read())
        connected.set()
        t0 = await clock + offset
        for k, at in enumerate(range(0, len(data), step)):
            due = t0 + k * FRAME_SECONDS
            if pace:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            await ws.send(data[at : at + step])
            sent = time.monotonic()
            run.sent.append(sent)
            if pace:
                run.max_lag = max(run.max_lag, sent - due)
        await ws.send(json.dumps({"type": "end"}))
        run.end_sent = time.monotonic()
        await reader
        run.close_code = ws.close_code
    return run


async def drive(
    url: str, sessions: list[SessionAudio], seed: int, pace: bool = True
) -> list[SessionRun]:
    """All sessions at once: every client connects, then each starts at a random offset within
    the first second."""
    rng = random.Random(seed)
    clock: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    connected = [asyncio.Event() for _ in sessions]
    tasks = [
        asyncio.create_task(
            stream_session(url, audio, ready, clock, rng.uniform(0, 1) if pace else 0.0, pace)
        )
        for audio, ready in zip(sessions, connected, strict=True)
    ]
    everyone = asyncio.ensure_future(asyncio.gather(*(c.wait() for c in connected)))
    waiting: list[asyncio.Future[Any]] = [everyone, *tasks]
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if not everyone.done():  # a client could not connect: stop the others, raise its error
        everyone.cancel()
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(everyone, *tasks, return_exceptions=True)
        raise next(o for o in outcomes if isinstance(o, Exception))
    clock.set_result(time.monotonic())  # connecting is not timed: the clock starts now
    return list(await asyncio.gather(*tasks))


@dataclass
class SessionStats:
    """One session's measurements, from its events and send times."""

    partial: list[float]
    final: list[float]
    partials: int
    finals: int
    exact: int
    errors: int
    uncovered: int
    mismatch: str | None


def _phrase_of(bounds: list[tuple[int, int]], start: float, end: float) -> int:
    """The phrase a final belongs to: the one overlapping it most (else the nearest)."""

    def score(span: tuple[int, int]) -> float:
        s, e = span[0] / RATE, span[1] / RATE
        overlap = min(e, end) - max(s, start)
        return overlap if overlap > 0 else -min(abs(s - end), abs(start - e))

    return max(range(len(bounds)), key=lambda i: score(bounds[i]))


def analyse(audio: SessionAudio, run: SessionRun) -> SessionStats:
    """Partial latency of every in-phrase frame, final latency of every final, and checks."""
    created = next((e for _, e in run.events if e["type"] == "session.created"), None)
    silence = (created or {}).get("config", {}).get("silence_duration_ms", 600) / 1000
    partials = [
        (t, float(e["audio_end"])) for t, e in run.events if e["type"] == "transcript.partial"
    ]
    finals = [(t, e) for t, e in run.events if e["type"] == "transcript.final"]
    errors = sum(e["type"] == "error" for _, e in run.events)

    partial_latency: list[float] = []
    uncovered = 0
    events = [(t, "p", end) for t, end in partials]
    events += [(t, "f", float(e["end"]) + silence) for t, e in finals]
    events.sort(key=lambda x: x[0])
    for first, last in audio.bounds:
        for k in range(first // FRAME, last // FRAME + 1):
            frame_start, frame_end = k * FRAME / RATE, (k + 1) * FRAME / RATE
            # a partial covers the frame once its audio reaches the frame's end; a final covers
            # every frame of its utterance, which runs until the endpoint (end + silence)
            covering = next(
                (
                    t
                    for t, kind, x in events
                    if (kind == "p" and x + 1e-9 >= frame_end) or (kind == "f" and frame_start < x)
                ),
                None,
            )
            if covering is None or k >= len(run.sent):
                uncovered += 1
            else:
                partial_latency.append(covering - run.sent[k])

    final_latency: list[float] = []
    matched = [0] * len(audio.bounds)
    exact = 0
    for t, event in finals:
        if event["reason"] == "end_of_stream":
            reference = run.end_sent
        else:  # found once the stream reaches end + silence (or, cut at max length, end)
            detect = float(event["end"]) + (silence if event["reason"] == "silence" else 0.0)
            k = math.ceil(detect / FRAME_SECONDS - 1e-6) - 1  # the frame that completes it
            reference = run.sent[k] if 0 <= k < len(run.sent) else run.end_sent
        final_latency.append(t - reference)
        phrase = _phrase_of(audio.bounds, float(event["start"]), float(event["end"]))
        matched[phrase] += 1
        exact += event["text"] == audio.texts[phrase]
    mismatch = None
    if any(m != 1 for m in matched) or run.close_code != 1000:
        mismatch = (
            f"{len(finals)} finals for {len(audio.bounds)} phrases (per phrase {matched}), "
            f"close code {run.close_code}"
        )
    return SessionStats(
        partial_latency,
        final_latency,
        len(partials),
        len(finals),
        exact,
        errors,
        uncovered,
        mismatch,
    )


def measure(
    model_dir: Path, sessions: list[SessionAudio], count: int, max_streams: int, seed: int
) -> Row:
    """A fresh service; a warm-up stream; then `count` real-time sessions, measured."""
    chosen = sessions[:count]
    with running_server(model_dir, {"STT_MAX_STREAMS": str(max_streams)}) as server:
        url, pid = server.url, server.pid
        ws_url = url.replace("http://", "ws://") + f"/v1/audio/stream?sample_rate={RATE}"
        asyncio.run(drive(ws_url, sessions[:1], seed, pace=False))  # warm-up, as fast as it goes
        before = server_means(url)
        server_cpu, client_cpu, wall = _cpu_seconds(pid), time.process_time(), time.monotonic()
        runs = asyncio.run(drive(ws_url, chosen, seed))
        wall = time.monotonic() - wall
        client_cpu = (time.process_time() - client_cpu) / wall
        server_cpu = (_cpu_seconds(pid) - server_cpu) / wall
        after = server_means(url)

    def server_mean(name: str) -> float:
        total = after[name][0] - before[name][0]
        n = after[name][1] - before[name][1]
        return total / n if n else float("nan")

    stats = [analyse(audio, run) for audio, run in zip(chosen, runs, strict=True)]
    partial = [x for s in stats for x in s.partial]
    final = [x for s in stats for x in s.final]
    return Row(
        sessions=count,
        partial_p50=percentile(partial, 50),
        partial_p95=percentile(partial, 95),
        final_p50=percentile(final, 50),
        final_p95=percentile(final, 95),
        partials_per_audio_s=float(
            np.mean([s.partials / a.seconds for s, a in zip(stats, chosen, strict=True)])
        ),
        finals=sum(s.finals for s in stats),
        phrases=sum(len(a.bounds) for a in chosen),
        sessions_ok=sum(s.mismatch is None for s in stats),
        exact_finals=sum(s.exact for s in stats),
        errors=sum(s.errors for s in stats),
        uncovered_frames=sum(s.uncovered for s in stats),
        max_send_lag=max(r.max_lag for r in runs),
        client_cpu=client_cpu,
        server_cpu=server_cpu,
        server_partial_mean=server_mean("stt_stream_partial_latency_seconds"),
        server_final_mean=server_mean("stt_stream_final_latency_seconds"),
        server_mean_batch=server_mean("stt_batch_size"),
        mismatches=[f"session {i}: {s.mismatch}" for i, s in enumerate(stats) if s.mismatch],
    )


def verdict(row: Row) -> str:
    """Whether the largest run meets the streaming target, and why not."""
    target = (
        f"target: {TARGET_SESSIONS} concurrent real-time sessions with p95 partial latency "
        f"<= {TARGET_PARTIAL_P95:g} s and p95 final latency <= {TARGET_FINAL_P95:g} s"
    )
    misses = []
    if row.sessions < TARGET_SESSIONS:
        misses.append(f"only {row.sessions} sessions were run")
    if not row.partial_p95 <= TARGET_PARTIAL_P95:
        misses.append(f"p95 partial latency is {row.partial_p95:.3f} s")
    if not row.final_p95 <= TARGET_FINAL_P95:
        misses.append(f"p95 final latency is {row.final_p95:.3f} s")
    if row.sessions_ok < row.sessions:
        misses.append(f"{row.sessions - row.sessions_ok} sessions lacked one final per phrase")
    if row.max_send_lag > PACE_TOLERANCE:
        misses.append(
            f"the client fell {row.max_send_lag:.3f} s behind real time (it could not keep "
            "pace: the run is not a fair real-time test)"
        )
    if misses:
        return f"{target}: NOT met at {row.sessions} sessions ({'; '.join(misses)})"
    return f"{target}: met at {row.sessions} sessions"


# ------------------------------------------------------------------ OpenAI Realtime sessions

REALTIME_RATE = 24_000  # the Realtime API's PCM rate
REALTIME_FRAME = round(REALTIME_RATE * FRAME_SECONDS)  # 480 samples per 20 ms append
TARGET_DELTA_P95 = 1.0
TARGET_COMPLETED_P95 = 0.5
COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"


def to_realtime(audio: SessionAudio) -> SessionAudio:
    """The session's audio at 24 kHz (bounds rescaled), as a Realtime client sends it."""
    resampled = soxr.resample(audio.audio, RATE, REALTIME_RATE).astype(np.float32)
    scale = REALTIME_RATE / RATE
    bounds = [(round(a * scale), round(b * scale)) for a, b in audio.bounds]
    return SessionAudio(resampled, bounds, audio.texts)


@dataclass
class RealtimeRow:
    """One N's Realtime measurements (client side)."""

    sessions: int
    delta_p50: float
    delta_p95: float
    completed_p50: float
    completed_p95: float
    speech_end_p50: float
    speech_end_p95: float
    early_delta_share: float
    deltas_spell_transcript: int
    completed: int
    phrases: int
    sessions_ok: int
    equal_to_upload: int
    errors: int
    max_send_lag: float
    client_cpu: float
    server_cpu: float
    mismatches: list[str] = field(default_factory=list)


async def realtime_session(
    url: str,
    audio: SessionAudio,
    connected: asyncio.Event,
    clock: "asyncio.Future[float]",
    offset: float,
    pace: bool,
    settle: float,
) -> SessionRun:
    """One Realtime client: connect, wait for the common start, append 20 ms of pcm16 at 24 kHz
    every 20 ms, then wait until every phrase is `completed` (or `settle` seconds pass)."""
    run = SessionRun()
    data = (np.clip(audio.audio, -1, 1) * 32767).astype("<i2").tobytes()
    step = 2 * REALTIME_FRAME
    async with connect(url, max_size=None) as ws:
        done = asyncio.Event()

        async def read() -> None:
            count = 0
            async for message in ws:
                event = json.loads(message)
                run.events.append((time.monotonic(), event))
                count += event["type"] == COMPLETED
                if count >= len(audio.bounds):
                    done.set()

        reader = asyncio.create_task(read())
        connected.set()
        t0 = await clock + offset
        for k, at in enumerate(range(0, len(data), step)):
            due = t0 + k * FRAME_SECONDS
            if pace:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            chunk = base64.b64encode(data[at : at + step]).decode()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
            sent = time.monotonic()
            run.sent.append(sent)
            if pace:
                run.max_lag = max(run.max_lag, sent - due)
        run.end_sent = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), settle)
        await ws.close()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        run.close_code = 1000 if done.is_set() else None
    return run


@dataclass
class RealtimeStats:
    delta: list[float]
    completed: list[float]
    speech_end: list[float]
    early: int
    spelled: int
    items: int
    equal: int
    errors: int
    mismatch: str | None


def analyse_realtime(
    audio: SessionAudio, run: SessionRun, uploads: dict[str, str], silence: float
) -> RealtimeStats:
    """First-delta latency (from sending the frame where the phrase starts), completed latency
    (from sending the frame that completes `speech end + silence`, as for finals), and end of
    speech to completed (from the frame holding the phrase's last sample)."""
    frame_s = REALTIME_FRAME / REALTIME_RATE
    by_item: dict[str, dict[str, Any]] = {}
    errors = 0
    for t, e in run.events:
        if e["type"] == "error":
            errors += 1
        item = e.get("item_id")
        if item is None:
            continue
        record = by_item.setdefault(item, {"deltas": [], "texts": []})
        if e["type"] == DELTA:
            record["deltas"].append(t)
            record["texts"].append(e["delta"])
        elif e["type"] in (
            "input_audio_buffer.speech_started",
            "input_audio_buffer.speech_stopped",
        ):
            record[e["type"].rsplit("_", 1)[1]] = (t, e)
        elif e["type"] == COMPLETED:
            record["completed"] = (t, e)

    def sent_at(sample: float) -> float:
        k = min(len(run.sent) - 1, max(0, math.ceil(sample / REALTIME_FRAME - 1e-6) - 1))
        return run.sent[k]

    deltas, completed, speech_end = [], [], []
    matched = [0] * len(audio.bounds)
    early = equal = spelled = 0
    for record in by_item.values():
        if "completed" not in record or "stopped" not in record:
            continue
        t_done, done = record["completed"]
        stopped = record["stopped"][1]
        started = record.get("started", (None, {"audio_start_ms": stopped["audio_end_ms"]}))[1]
        start_s = started["audio_start_ms"] / 1000 + 0.3  # minus prefix_padding_ms
        end_s = stopped["audio_end_ms"] / 1000
        scale = REALTIME_RATE / RATE
        phrase = _phrase_of(
            [(round(a / scale), round(b / scale)) for a, b in audio.bounds], start_s, end_s
        )
        matched[phrase] += 1
        first, last = audio.bounds[phrase]
        first_text = min(record["deltas"], default=t_done)
        deltas.append(first_text - sent_at(first + 1))
        early += any(t < record["stopped"][0] for t in record["deltas"])
        spelled += "".join(record["texts"]) == done["transcript"]
        detect = end_s + silence
        k = math.ceil(detect / frame_s - 1e-6) - 1
        reference = run.sent[k] if 0 <= k < len(run.sent) else run.end_sent
        completed.append(t_done - reference)
        speech_end.append(t_done - sent_at(last + 1))
        equal += done["transcript"] == uploads[audio.texts[phrase]]
    mismatch = None
    if any(m != 1 for m in matched):
        mismatch = f"completed per phrase {matched} ({len(audio.bounds)} phrases)"
    return RealtimeStats(
        deltas, completed, speech_end, early, spelled, sum(matched), equal, errors, mismatch
    )


def upload_texts(url: str) -> dict[str, str]:
    """The upload transcript of each phrase (with half a second of quiet around it)."""
    quiet = np.zeros(RATE // 2, np.float32)
    texts = {}
    for text in PHRASES:
        clip = np.concatenate([quiet, speak(text), quiet])
        response = httpx.post(
            url + "/v1/audio/transcriptions",
            files={"file": ("a.wav", common.wav_bytes(clip, RATE))},
            timeout=60,
        )
        texts[text] = str(response.json()["text"])
    return texts


async def drive_realtime(
    url: str, sessions: list[SessionAudio], seed: int, pace: bool = True, settle: float = 15.0
) -> list[SessionRun]:
    """All Realtime sessions at once, each starting at a random offset in the first second."""
    rng = random.Random(seed)
    clock: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    connected = [asyncio.Event() for _ in sessions]
    tasks = [
        asyncio.create_task(
            realtime_session(
                url, audio, ready, clock, rng.uniform(0, 1) if pace else 0.0, pace, settle
            )
        )
        for audio, ready in zip(sessions, connected, strict=True)
    ]
    await asyncio.gather(*(c.wait() for c in connected))
    clock.set_result(time.monotonic())
    return list(await asyncio.gather(*tasks))


def measure_realtime(
    model_dir: Path, sessions: list[SessionAudio], count: int, max_streams: int, seed: int
) -> RealtimeRow:
    """A fresh service; a warm-up session; then `count` real-time Realtime sessions."""
    chosen = [to_realtime(a) for a in sessions[:count]]
    with running_server(model_dir, {"STT_MAX_STREAMS": str(max_streams)}) as server:
        url, pid = server.url, server.pid
        ws = url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"
        uploads = upload_texts(url)
        asyncio.run(drive_realtime(ws, chosen[:1], seed, pace=False, settle=5.0))  # warm-up
        server_cpu, client_cpu, wall = _cpu_seconds(pid), time.process_time(), time.monotonic()
        runs = asyncio.run(drive_realtime(ws, chosen, seed))
        wall = time.monotonic() - wall
        client_cpu = (time.process_time() - client_cpu) / wall
        server_cpu = (_cpu_seconds(pid) - server_cpu) / wall
    silence = 0.5  # server_vad's default silence_duration_ms
    stats = [analyse_realtime(a, r, uploads, silence) for a, r in zip(chosen, runs, strict=True)]
    delta = [x for s in stats for x in s.delta]
    completed = [x for s in stats for x in s.completed]
    speech_end = [x for s in stats for x in s.speech_end]
    items = sum(s.items for s in stats)
    return RealtimeRow(
        sessions=count,
        delta_p50=percentile(delta, 50),
        delta_p95=percentile(delta, 95),
        completed_p50=percentile(completed, 50),
        completed_p95=percentile(completed, 95),
        speech_end_p50=percentile(speech_end, 50),
        speech_end_p95=percentile(speech_end, 95),
        early_delta_share=sum(s.early for s in stats) / items if items else float("nan"),
        deltas_spell_transcript=sum(s.spelled for s in stats),
        completed=items,
        phrases=sum(len(a.bounds) for a in chosen),
        sessions_ok=sum(s.mismatch is None for s in stats),
        equal_to_upload=sum(s.equal for s in stats),
        errors=sum(s.errors for s in stats),
        max_send_lag=max(r.max_lag for r in runs),
        client_cpu=client_cpu,
        server_cpu=server_cpu,
        mismatches=[f"session {i}: {s.mismatch}" for i, s in enumerate(stats) if s.mismatch],
    )


def realtime_verdict(row: RealtimeRow) -> str:
    target = (
        f"target: {TARGET_SESSIONS} concurrent real-time Realtime sessions with p95 completed "
        f"latency <= {TARGET_COMPLETED_P95:g} s and p95 first delta <= {TARGET_DELTA_P95:g} s, "
        "one completed per utterance equal to its upload"
    )
    misses = []
    if row.sessions < TARGET_SESSIONS:
        misses.append(f"only {row.sessions} sessions were run")
    if not row.completed_p95 <= TARGET_COMPLETED_P95:
        misses.append(f"p95 completed latency is {row.completed_p95:.3f} s")
    if not row.delta_p95 <= TARGET_DELTA_P95:
        misses.append(f"p95 first delta is {row.delta_p95:.3f} s")
    if row.sessions_ok < row.sessions:
        misses.append(f"{row.sessions - row.sessions_ok} sessions lacked one completed per phrase")
    if row.equal_to_upload < row.phrases:
        misses.append(f"{row.phrases - row.equal_to_upload} transcripts differ from the upload")
    if row.max_send_lag > PACE_TOLERANCE:
        misses.append(f"the client fell {row.max_send_lag:.3f} s behind real time")
    if misses:
        return f"{target}: NOT met at {row.sessions} sessions ({'; '.join(misses)})"
    return f"{target}: met at {row.sessions} sessions"


def print_realtime(rows: list[RealtimeRow]) -> None:
    print(
        "| sessions | first delta p50 s | first delta p95 s | completed p50 s | completed p95 s "
        "| speech end→completed p95 s | items with a delta before speech_stopped "
        "| completed ok | equal to upload | max send lag s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.sessions} | {r.delta_p50:.3f} | {r.delta_p95:.3f} | {r.completed_p50:.3f} "
            f"| {r.completed_p95:.3f} | {r.speech_end_p95:.3f} | {r.early_delta_share:.0%} "
            f"| {r.sessions_ok}/{r.sessions} | {r.equal_to_upload}/{r.phrases} "
            f"| {r.max_send_lag:.3f} |"
        )
    print()
    for r in rows:
        print(
            f"{r.sessions} sessions: completed {r.completed}/{r.phrases}, deltas spelling the "
            f"transcript {r.deltas_spell_transcript}/{r.completed}, errors {r.errors}; "
            f"CPU: server {r.server_cpu:.2f} cores, client {r.client_cpu:.2f} cores"
        )
        for line in r.mismatches:
            print(f"  {line}")
    print("\n" + realtime_verdict(rows[-1]))


def main(argv: list[str] | None = None) -> None:
    parser = common.parser("bench.stream", __doc__)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument(
        "--seconds-per-session", type=float, default=10.0, help="phrases are added until this"
    )
    parser.add_argument(
        "--protocol",
        choices=["stream", "realtime"],
        default="stream",
        help="our /v1/audio/stream, or OpenAI Realtime sessions (/v1/realtime)",
    )
    args = parser.parse_args(argv)
    if min(args.sessions) < 1 or args.seconds_per_session <= 0:
        parser.error("--sessions must be positive and --seconds-per-session above zero")

    sessions = build_sessions(max(args.sessions), args.seconds_per_session)
    if args.protocol == "realtime":
        realtime_rows = [
            measure_realtime(args.model, sessions, n, max(args.sessions) + 8, args.seed)
            for n in args.sessions
        ]
        print(
            f"\nmodel: {args.model.name}; Realtime sessions (server_vad, Silero), 20 ms appends "
            f"of pcm16 at {REALTIME_RATE} Hz, real time; {os.cpu_count()} cores shared by "
            "client and server\n"
        )
        print_realtime(realtime_rows)
        if args.json:
            args.json.write_text(json.dumps([asdict(r) for r in realtime_rows], indent=1))
        return
    rows = [
        measure(args.model, sessions, n, max(args.sessions) + 8, args.seed) for n in args.sessions
    ]
    lengths = [a.seconds for a in sessions]
    counts = [len(a.bounds) for a in sessions]
    print(
        f"\nmodel: {args.model.name}; {min(lengths):.1f}-{max(lengths):.1f} s of audio per session "
        f"({min(counts)}-{max(counts)} phrases, each then {PAUSE_SECONDS:g} s of silence), "
        f"20 ms pcm_s16le frames at {RATE} Hz, real time; "
        f"{os.cpu_count()} cores shared by client and server\n"
    )
    print(
        "| sessions | partial p50 s | partial p95 s | final p50 s | final p95 s "
        "| partials/s per session | finals ok | max send lag s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.sessions} | {r.partial_p50:.3f} | {r.partial_p95:.3f} | {r.final_p50:.3f} "
            f"| {r.final_p95:.3f} | {r.partials_per_audio_s:.2f} "
            f"| {r.sessions_ok}/{r.sessions} | {r.max_send_lag:.3f} |"
        )
    print()
    for r in rows:
        print(
            f"{r.sessions} sessions: server-side means partial {r.server_partial_mean:.3f} s, "
            f"final {r.server_final_mean:.3f} s, batch size {r.server_mean_batch:.2f}; "
            f"finals {r.finals}/{r.phrases} ({r.exact_finals} word-exact), errors {r.errors}, "
            f"frames never covered {r.uncovered_frames}; CPU: server {r.server_cpu:.2f} cores, "
            f"client {r.client_cpu:.2f} cores"
        )
        for line in r.mismatches:
            print(f"  {line}")
    print("\n" + verdict(rows[-1]))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
