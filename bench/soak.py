"""Soak: thousands of mixed requests and live streams against one server; nothing lost or leaked.

    python -m bench.soak                           # 3000 requests, 64 in flight, 8 streams
    python -m bench.soak --requests 300 --concurrency 32 --streams 2 --json soak.json

Starts `python -m service` on a free port (the bundled model unless `--model`), with a queue and
deadline generous enough that good requests are never shed, and warms it up: each sample alone
(its transcript is the reference for the run), then a round at full concurrency with streams
open, so thread pools and allocator arenas reach their working size before the baseline is read
(a cache keyed by input shape, such as oneDNN's primitive cache, keeps growing with every new
audio length after that, up to its capacity: the report's RSS-during-load line shows its curve).
Then it sends `--requests` uploads with `--concurrency` always in flight: a seeded mix of good
uploads (the model's `samples/*.wav`, as WAV or FLAC, in every response format, some as
Server-Sent Events) and bad ones (empty, random bytes, a truncated header, a clip too short to
hear, an unknown model, out-of-range fields, values that vanish in float32, translation on a
model that cannot). Meanwhile `--streams` websocket sessions each stream two samples with
pauses at real-time pace in 100 ms frames (after one deeply nested JSON message), send `end`,
and start again, until the uploads are done.

Checks (one line each in the report; any failure makes the run FAIL, exit status 1):

- every request got exactly one answer: the client's counts by status add up to what was sent,
  there are no transport errors, and the server's own `stt_requests_total` grew by the same
  counts, status by status;
- good uploads got 200 with the transcript the sample gets alone (or, if shed, 429/503 with
  `Retry-After`, counted apart); bad ones got their documented status and error code;
- every streaming session got `session.created`, its finals in order, `session.ended` and a
  1000 close, and no error event but the one `invalid_json` its deeply nested message earns;
- once the load has drained (queue empty, no session open): resident memory at most 10% above
  the warmed-up figure, threads back to the warmed-up count, event-loop tasks at most
  `TASK_SLACK` above it; and the server exits cleanly on SIGTERM.
"""

import argparse
import asyncio
import contextlib
import io
import json
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from bench import common
from bench.common import percentile
from bench.serverproc import Sample, Server, running_server, scrape

TRANSCRIBE = "/v1/audio/transcriptions"
TRANSLATE = "/v1/audio/translations"
AUDIO_ENDPOINTS = (TRANSCRIBE, TRANSLATE)
MAX_RSS_GROWTH = 0.10  # resident memory may grow this much after warm-up
TASK_SLACK = 3  # event-loop tasks allowed above the warmed-up count after the drain
SETTLE_SECONDS = 30.0  # how long idle threads get to exit (anyio's idle workers stop after 10 s)
STREAM_FRAME_SECONDS = 0.1
STREAM_PAUSE_SECONDS = 1.0  # between phrases: longer than the default 600 ms endpoint silence
CLEAN_EXIT = (0, -signal.SIGTERM)
NESTED_JSON = "[" * 100_000  # uvicorn re-raises SIGTERM after a clean shutdown

# Request kinds and their weights in the mix. Good kinds must get 200 and the reference text.
GOOD_KINDS: dict[str, float] = {
    "json": 28,
    "text": 8,
    "verbose_json": 12,
    "srt": 6,
    "vtt": 6,
    "flac": 8,
    "stream": 12,
}
# Bad kinds: weight, and the documented status and error `code` (README, Errors).
BAD_KINDS: dict[str, tuple[float, int, str]] = {
    "empty-file": (3, 400, "bad_audio"),
    "random-bytes": (3, 415, "unsupported_media_type"),
    "truncated-wav": (3, 400, "bad_audio"),
    "too-short": (3, 400, "bad_audio"),
    "unknown-model": (3, 404, "model_not_found"),
    "num-beams-0": (2, 400, "invalid_value"),
    "bad-response-format": (1, 400, "invalid_value"),
    "temperature-9": (1, 400, "invalid_value"),
    "temperature-1e-300": (1, 400, "invalid_value"),  # 0 in float32: was a 500 (issue 22)
    "penalty-1e-300": (1, 400, "invalid_value"),
    "translate-unsupported": (1, 400, "unsupported"),
}
SHED = (429, 503)


# ---------------------------------------------------------------------------------------------
# the server under test


def gauge(samples: list[Sample], name: str) -> float:
    return sum(value for n, _, value in samples if n == name)


def requests_by_status(samples: list[Sample], endpoints: tuple[str, ...]) -> Counter[int]:
    """The server's `stt_requests_total` for these endpoints, summed by status."""
    counts: Counter[int] = Counter()
    for name, labels, value in samples:
        if name == "stt_requests_total" and labels.get("endpoint") in endpoints:
            counts[int(labels["status"])] += int(value)
    return counts


def wait_drained(url: str, timeout: float = 120) -> list[Sample]:
    """Poll `/metrics` until nothing is queued and no stream is open; the last scrape."""
    give_up = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        idle = gauge(samples, "stt_queue_depth") == 0 and gauge(samples, "stt_streams_active") == 0
        if idle or time.monotonic() > give_up:
            return samples
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# what is sent


@dataclass(frozen=True)
class Clip:
    """One of the model's sample files, and the transcript it gets alone (the reference)."""

    name: str
    wav: bytes
    flac: bytes
    pcm16: npt.NDArray[np.int16]
    rate: int
    text: str = ""


def load_clips(model_dir: Path) -> list[Clip]:
    clips = []
    for path in sorted((model_dir / "samples").glob("*.wav")):
        audio, rate = sf.read(path, dtype="int16")
        if audio.ndim > 1:
            audio = audio.mean(axis=1).astype(np.int16)
        flac = io.BytesIO()
        sf.write(flac, audio, rate, format="FLAC")
        clips.append(Clip(path.name, path.read_bytes(), flac.getvalue(), audio, rate))
    if not clips:
        raise SystemExit(f"{model_dir}/samples has no .wav files to send")
    return clips


@dataclass(frozen=True)
class Planned:
    """One request of the run: its kind and the sample it is made from."""

    kind: str
    clip: int


def plan(count: int, clips: int, rng: random.Random, bad_kinds: dict[str, Any]) -> list[Planned]:
    kinds = list(GOOD_KINDS) + list(bad_kinds)
    weights = list(GOOD_KINDS.values()) + [bad_kinds[k][0] for k in bad_kinds]
    return [
        Planned(kind, rng.randrange(clips)) for kind in rng.choices(kinds, weights=weights, k=count)
    ]


def request_for(
    item: Planned, clip: Clip, model: str
) -> tuple[str, dict[str, Any], dict[str, str]]:
    """The path, multipart files and form fields of one planned request."""
    data: dict[str, str] = {"model": model}
    body, name, path = clip.wav, clip.name, TRANSCRIBE
    kind = item.kind
    if kind in ("text", "verbose_json", "srt", "vtt"):
        data["response_format"] = kind
    elif kind == "flac":
        body, name = clip.flac, clip.name.removesuffix(".wav") + ".flac"
    elif kind == "stream":
        data["stream"] = "true"
    elif kind == "empty-file":
        body = b""
    elif kind == "random-bytes":
        body = random.Random(len(clip.wav)).randbytes(32 * 1024)
    elif kind == "truncated-wav":
        body = clip.wav[:30]  # cut inside the header
    elif kind == "too-short":
        one = io.BytesIO()
        sf.write(one, clip.pcm16[:1], clip.rate, format="WAV", subtype="PCM_16")
        body = one.getvalue()
    elif kind == "unknown-model":
        data["model"] = "no-such-model"
    elif kind == "num-beams-0":
        data["num_beams"] = "0"
    elif kind == "bad-response-format":
        data["response_format"] = "mp4"
    elif kind == "temperature-9":
        data["temperature"] = "9"
    elif kind == "temperature-1e-300":
        data["temperature"] = "1e-300"
    elif kind == "penalty-1e-300":
        data["repetition_penalty"] = "1e-300"
    elif kind == "translate-unsupported":
        path = TRANSLATE
    return path, {"file": (name, body)}, data


# ---------------------------------------------------------------------------------------------
# checking answers


def sse_events(body: str) -> list[dict[str, Any]]:
    return [
        json.loads(line.removeprefix("data: "))
        for line in body.splitlines()
        if line.startswith("data: ")
    ]


def check_good(kind: str, response: httpx.Response, clip: Clip) -> str | None:
    """What is wrong with a 200 to a good upload (None: it carries the reference transcript)."""
    text = clip.text
    body = response.text
    if kind in ("json", "flac", "verbose_json"):
        got = response.json().get("text")
        return None if got == text else f"text {got!r}, expected {text!r}"
    if kind == "text":
        return None if body.strip() == text else f"text {body.strip()!r}, expected {text!r}"
    if kind in ("srt", "vtt"):
        header_ok = body.startswith("WEBVTT") if kind == "vtt" else body.startswith("1\n")
        if not header_ok or (text and text not in body):
            return f"{kind} body {body[:80]!r} lacks {text!r}"
        return None
    if kind == "stream":
        events = sse_events(body)
        if not events or events[-1].get("type") != "transcript.text.done":
            return f"stream did not end with transcript.text.done: {body[-200:]!r}"
        deltas = "".join(e["delta"] for e in events if e.get("type") == "transcript.text.delta")
        done = events[-1].get("text")
        if done != text or deltas.strip() != text:
            return f"stream text {done!r} (deltas {deltas!r}), expected {text!r}"
        return None
    return f"unknown kind {kind}"


def check_bad(response: httpx.Response, status: int, code: str) -> str | None:
    if response.status_code != status:
        return f"status {response.status_code}, expected {status}: {response.text[:200]!r}"
    try:
        got = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return f"not the error shape: {response.text[:200]!r}"
    return None if got == code else f"code {got!r}, expected {code!r}"


@dataclass
class Outcome:
    """What one request got."""

    kind: str
    good: bool
    status: int | None = None  # None: no response (see `transport_error`)
    transport_error: str | None = None
    retry_after: bool = False
    problem: str | None = None  # why the answer is wrong (None: as expected)
    latency: float = 0.0

    @property
    def shed(self) -> bool:
        return self.good and self.status in SHED


class InFlight:
    """Requests in flight, and their time-weighted mean (the concurrency really held)."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self._area = 0.0
        self._started = self._since = time.perf_counter()

    def start(self) -> None:
        """The clock starts with the first request."""
        self._started = self._since = time.perf_counter()

    def change(self, delta: int) -> None:
        t = time.perf_counter()
        self._area += self.now * (t - self._since)
        self._since = t
        self.now += delta
        self.peak = max(self.peak, self.now)

    @property
    def seconds(self) -> float:
        """From the first request sent to the last answer received."""
        return self._since - self._started

    @property
    def mean(self) -> float:
        return self._area / max(1e-9, self.seconds)


async def send(
    client: httpx.AsyncClient,
    item: Planned,
    clips: list[Clip],
    model: str,
    bad_kinds: dict[str, tuple[float, int, str]],
    inflight: InFlight,
) -> Outcome:
    clip = clips[item.clip]
    path, files, data = request_for(item, clip, model)
    good = item.kind in GOOD_KINDS
    outcome = Outcome(item.kind, good)
    inflight.change(+1)
    started = time.perf_counter()
    try:
        response = await client.post(path, files=files, data=data)
    except httpx.TransportError as exc:  # counted, never retried: the run must show it
        outcome.transport_error = type(exc).__name__
        outcome.problem = f"transport error {type(exc).__name__}: {exc}"
        return outcome
    finally:
        outcome.latency = time.perf_counter() - started
        inflight.change(-1)
    outcome.status = response.status_code
    outcome.retry_after = "retry-after" in response.headers
    if good and response.status_code in SHED:
        if not outcome.retry_after:
            outcome.problem = f"shed with {response.status_code} but no Retry-After"
    elif good:
        if response.status_code != 200:
            outcome.problem = f"status {response.status_code}: {response.text[:200]!r}"
        else:
            outcome.problem = check_good(item.kind, response, clip)
    else:
        _, status, code = bad_kinds[item.kind]
        outcome.problem = check_bad(response, status, code)
    return outcome


async def drive(
    client: httpx.AsyncClient,
    items: list[Planned],
    concurrency: int,
    clips: list[Clip],
    model: str,
    bad_kinds: dict[str, tuple[float, int, str]],
    inflight: InFlight,
) -> list[Outcome | None]:
    """Send every planned request with `concurrency` always in flight (closed loop)."""
    outcomes: list[Outcome | None] = [None] * len(items)
    inflight.start()
    queue = iter(enumerate(items))  # shared: each request is taken by exactly one sender

    async def sender() -> None:
        for index, item in queue:
            outcomes[index] = await send(client, item, clips, model, bad_kinds, inflight)

    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return outcomes


# ---------------------------------------------------------------------------------------------
# streaming sessions


@dataclass
class StreamStats:
    """Streaming sessions run alongside the uploads."""

    completed: int = 0
    failed: int = 0
    finals: int = 0
    finals_matching: int = 0  # finals whose text is a played sample's upload transcript
    failures: list[str] = field(default_factory=list)


def session_audio(clips: list[Clip], rng: random.Random) -> tuple[bytes, int, list[str]]:
    """Two samples with pauses, as pcm_s16le at their rate; the samples' reference texts."""
    rate = clips[0].rate
    chosen = [c for c in (rng.choice(clips), rng.choice(clips)) if c.rate == rate]
    lead = np.zeros(int(0.3 * rate), np.int16)
    pause = np.zeros(int(STREAM_PAUSE_SECONDS * rate), np.int16)
    parts: list[npt.NDArray[np.int16]] = [lead]
    for clip in chosen:
        parts += [clip.pcm16, pause]
    return np.concatenate(parts).astype("<i2").tobytes(), rate, [c.text for c in chosen]


async def stream_session(
    ws_url: str, audio: bytes, rate: int, texts: list[str], stats: StreamStats
) -> None:
    """One session at real-time pace; its verdict goes into `stats`."""
    frame = 2 * int(rate * STREAM_FRAME_SECONDS)
    events: list[dict[str, Any]] = []
    problem = None
    code: int | None = None
    try:
        async with asyncio.timeout(len(audio) / 2 / rate + 120):
            async with connect(f"{ws_url}?sample_rate={rate}", max_size=None) as ws:

                async def read() -> None:
                    async for message in ws:
                        events.append(json.loads(message))

                reader = asyncio.create_task(read())
                # a message that breaks a recursive JSON parser: one `invalid_json` error event,
                # and the session goes on (issue 22; it closed the socket with 1006)
                await ws.send(NESTED_JSON)
                loop = asyncio.get_running_loop()
                started = loop.time()
                for n, offset in enumerate(range(0, len(audio), frame), start=1):
                    await ws.send(audio[offset : offset + frame])
                    await asyncio.sleep(max(0.0, started + n * STREAM_FRAME_SECONDS - loop.time()))
                await ws.send(json.dumps({"type": "end"}))
                await reader
                code = ws.close_code
    except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    finals = [e for e in events if e.get("type") == "transcript.final"]
    errors = [e for e in events if e.get("type") == "error"]
    nested = [e for e in errors if e.get("error", {}).get("code") == "invalid_json"]
    errors = [e for e in errors if e not in nested[:1]]
    if problem is None and len(nested) != 1:
        problem = f"{len(nested)} invalid_json events for one deeply nested message"
    if problem is None:
        if not events or events[0].get("type") != "session.created":
            problem = "no session.created first"
        elif errors:
            problem = f"error events: {errors}"
        elif not finals or [f["utterance"] for f in finals] != list(range(len(finals))):
            problem = f"finals out of order or missing: {[f.get('utterance') for f in finals]}"
        elif events[-1].get("type") != "session.ended":
            problem = f"last event {events[-1].get('type')}, not session.ended"
        elif code != 1000:
            problem = f"close code {code}"
    stats.finals += len(finals)
    stats.finals_matching += sum(f.get("text") in texts for f in finals)
    if problem is None:
        stats.completed += 1
    else:
        stats.failed += 1
        stats.failures.append(problem)


async def stream_until(
    ws_url: str,
    clips: list[Clip],
    streams: int,
    done: asyncio.Event,
    stats: StreamStats,
    rng: random.Random,
) -> None:
    """`streams` clients, each running session after session until `done` is set."""

    async def client(index: int) -> None:
        await asyncio.sleep(index * 0.25)  # staggered, so the sessions' phrases do not align
        while not done.is_set():
            audio, rate, texts = session_audio(clips, rng)
            await stream_session(ws_url, audio, rate, texts, stats)

    await asyncio.gather(*(client(i) for i in range(streams)))


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    """Every figure of one run (what `--json` writes)."""

    model: str
    requests: int
    concurrency: int
    streams: int
    seed: int
    held_concurrency_mean: float = 0.0
    held_concurrency_max: int = 0
    sent: int = 0
    answered: int = 0
    transport_errors: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    server_by_status: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    good_ok: int = 0
    good_shed: int = 0
    shed_without_retry_after: int = 0
    bad_ok: int = 0
    wrong: int = 0
    wrong_examples: list[str] = field(default_factory=list)
    latency_p50_s: float = 0.0
    latency_p99_s: float = 0.0
    streams_completed: int = 0
    streams_failed: int = 0
    stream_finals: int = 0
    stream_finals_matching: int = 0
    stream_failures: list[str] = field(default_factory=list)
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_growth_pct: float = 0.0
    rss_peak_mb: float = 0.0
    rss_during_mb: list[float] = field(default_factory=list)  # every 0.5 s of the load
    threads_before: int = 0
    threads_after: int = 0
    tasks_before: int = 0
    tasks_after: int = 0
    queue_after: int = 0
    streams_active_after: int = 0
    exit_code: int | None = None
    load_seconds: float = 0.0  # first upload sent to last answer received
    load_with_streams_seconds: float = 0.0  # until the last streaming session ended too
    wall_seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)
    passed: bool = False


def reference_clips(server: Server, clips: list[Clip], model: str) -> list[Clip]:
    """Each sample alone: the transcript it gets is what every good upload of it must get."""
    references = []
    for clip in clips:
        response = httpx.post(
            server.url + TRANSCRIBE,
            files={"file": (clip.name, clip.wav)},
            data={"model": model},
            timeout=120,
        )
        response.raise_for_status()
        references.append(Clip(**{**asdict(clip), "text": response.json()["text"]}))
    return references


def bad_kinds_for(server: Server, clip: Clip) -> dict[str, tuple[float, int, str]]:
    """The bad kinds for this model: translation is only bad where the model cannot translate."""
    probe = httpx.post(server.url + TRANSLATE, files={"file": (clip.name, clip.wav)}, timeout=120)
    kinds = dict(BAD_KINDS)
    if probe.status_code == 200:
        del kinds["translate-unsupported"]
    return kinds


async def _load(
    server: Server,
    clips: list[Clip],
    items: list[Planned],
    args: argparse.Namespace,
    model: str,
    bad_kinds: dict[str, tuple[float, int, str]],
    inflight: InFlight,
    stats: StreamStats,
    rss: list[tuple[float, float]] | None = None,
) -> list[Outcome | None]:
    """The uploads with the streams running alongside until they are done; `rss` gets the
    server's resident memory (seconds, MB) every half second meanwhile."""
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.timeout)
    done = asyncio.Event()
    ws_url = server.url.replace("http://", "ws://") + "/v1/audio/stream"
    rng = random.Random(args.seed + 2)
    async with httpx.AsyncClient(base_url=server.url, timeout=timeout, limits=limits) as client:
        streaming = asyncio.create_task(stream_until(ws_url, clips, args.streams, done, stats, rng))
        sampling = asyncio.create_task(sample_rss(server, done, rss if rss is not None else []))
        try:
            return await drive(client, items, args.concurrency, clips, model, bad_kinds, inflight)
        finally:
            done.set()
            await streaming
            await sampling


async def sample_rss(server: Server, done: asyncio.Event, out: list[tuple[float, float]]) -> None:
    started = time.perf_counter()
    while not done.is_set():
        out.append((time.perf_counter() - started, server.rss_mb))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 0.5)


def wait_settled(url: str, threads_before: int, timeout: float) -> list[Sample]:
    """Poll until the thread count is back to the warmed-up count (idle pool threads exit)."""
    give_up = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if gauge(samples, "stt_threads") <= threads_before or time.monotonic() > give_up:
            return samples
        time.sleep(0.5)


def run(args: argparse.Namespace) -> Report:
    started = time.perf_counter()
    model_dir: Path = args.model
    model = model_dir.name
    report = Report(model, args.requests, args.concurrency, args.streams, args.seed)
    env = {
        "STT_MAX_QUEUE_SIZE": str(max(256, 4 * (args.concurrency + 2 * args.streams))),
        "STT_REQUEST_TIMEOUT_S": str(args.timeout),
        "STT_MAX_REQUEST_TIMEOUT_S": str(args.timeout),
        "STT_MAX_STREAMS": str(max(32, 2 * args.streams)),
        "STT_MODEL_NAME": model,
    }
    clips = load_clips(model_dir)
    with running_server(model_dir, env) as server:
        clips = reference_clips(server, clips, model)
        bad_kinds = bad_kinds_for(server, clips[0])
        # warm-up: a round at full concurrency with the streams open, so thread pools and
        # allocator arenas reach their working size before the baseline is read
        warm = plan(
            max(2 * args.concurrency, 32), len(clips), random.Random(args.seed + 1), bad_kinds
        )
        asyncio.run(_load(server, clips, warm, args, model, bad_kinds, InFlight(), StreamStats()))
        before = wait_drained(server.url)
        report.rss_start_mb = server.rss_mb
        report.threads_before = int(gauge(before, "stt_threads"))
        report.tasks_before = int(gauge(before, "stt_event_loop_tasks"))
        counted_before = requests_by_status(before, AUDIO_ENDPOINTS)

        items = plan(args.requests, len(clips), random.Random(args.seed), bad_kinds)
        inflight = InFlight()
        stats = StreamStats()
        load_started = time.perf_counter()
        rss: list[tuple[float, float]] = []
        outcomes = asyncio.run(
            _load(server, clips, items, args, model, bad_kinds, inflight, stats, rss)
        )
        report.rss_during_mb = [round(mb, 1) for _, mb in rss]
        report.load_seconds = inflight.seconds
        report.load_with_streams_seconds = time.perf_counter() - load_started
        report.held_concurrency_mean = inflight.mean
        report.held_concurrency_max = inflight.peak

        drained = wait_drained(server.url)
        report.queue_after = int(gauge(drained, "stt_queue_depth"))
        report.streams_active_after = int(gauge(drained, "stt_streams_active"))
        counted_after = requests_by_status(drained, AUDIO_ENDPOINTS)
        settled = wait_settled(server.url, report.threads_before, SETTLE_SECONDS)
        report.threads_after = int(gauge(settled, "stt_threads"))
        report.tasks_after = int(gauge(settled, "stt_event_loop_tasks"))
        report.rss_end_mb = server.rss_mb
        report.rss_peak_mb = server.peak_rss_mb
        report.exit_code = server.stop()

    report.wall_seconds = time.perf_counter() - started
    server_counts = counted_after - counted_before
    report.server_by_status = {str(k): v for k, v in sorted(server_counts.items())}
    tally(report, outcomes, stats)
    report.rss_growth_pct = 100 * (report.rss_end_mb / report.rss_start_mb - 1)
    report.checks = checks(report)
    report.passed = all(c.ok for c in report.checks)
    return report


def tally(report: Report, outcomes: list[Outcome | None], stats: StreamStats) -> None:
    answered = [o for o in outcomes if o is not None]
    report.sent = len(outcomes)
    report.answered = sum(o.status is not None for o in answered)
    report.transport_errors = sum(o.transport_error is not None for o in answered)
    statuses = Counter(
        str(o.status) if o.status is not None else f"transport:{o.transport_error}"
        for o in answered
    )
    report.by_status = dict(sorted(statuses.items()))
    by_kind: dict[str, Counter[str]] = {}
    for o in answered:
        label = str(o.status) if o.status is not None else "transport"
        by_kind.setdefault(o.kind, Counter())[label] += 1
        if o.problem is not None:
            by_kind[o.kind]["wrong"] += 1
    report.by_kind = {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())}
    report.good_ok = sum(o.good and o.status == 200 and o.problem is None for o in answered)
    report.good_shed = sum(o.shed for o in answered)
    report.shed_without_retry_after = sum(o.shed and not o.retry_after for o in answered)
    report.bad_ok = sum(not o.good and o.problem is None for o in answered)
    wrong = [o for o in answered if o.problem is not None]
    report.wrong = len(wrong)
    report.wrong_examples = [f"{o.kind}: {o.problem}" for o in wrong[:10]]
    latencies = [o.latency for o in answered if o.status == 200]
    report.latency_p50_s = percentile(latencies, 50)
    report.latency_p99_s = percentile(latencies, 99)
    report.streams_completed = stats.completed
    report.streams_failed = stats.failed
    report.stream_finals = stats.finals
    report.stream_finals_matching = stats.finals_matching
    report.stream_failures = stats.failures[:10]


def checks(r: Report) -> list[Check]:
    client_total = sum(r.by_status.values())
    server_counts = {k: v for k, v in r.by_status.items() if not k.startswith("transport")}
    return [
        Check(
            "every request answered exactly once",
            r.sent == r.requests and client_total == r.sent and r.transport_errors == 0,
            f"{r.requests} planned, {r.sent} sent, {client_total} outcomes "
            f"({r.answered} responses, {r.transport_errors} transport errors)",
        ),
        Check(
            "the server counted the same answers",
            r.server_by_status == server_counts,
            f"server {r.server_by_status} vs client {server_counts}",
        ),
        Check(
            "good uploads: 200 with the reference transcript (or shed with Retry-After)",
            r.wrong == 0 and r.shed_without_retry_after == 0,
            f"{r.good_ok} ok, {r.good_shed} shed ({r.shed_without_retry_after} without "
            f"Retry-After), {r.wrong} wrong answers in all",
        ),
        Check(
            "bad uploads: their documented status and code",
            r.wrong == 0,
            f"{r.bad_ok} as documented",
        ),
        Check(
            "streaming sessions: finals in order, session.ended, close 1000",
            r.streams_failed == 0 and r.streams_completed >= r.streams,
            f"{r.streams_completed} completed, {r.streams_failed} failed",
        ),
        Check(
            "drained: queue empty, no session open",
            r.queue_after == 0 and r.streams_active_after == 0,
            f"queue {r.queue_after}, open sessions {r.streams_active_after}",
        ),
        Check(
            f"RSS growth after warm-up <= {MAX_RSS_GROWTH:.0%}",
            r.rss_growth_pct <= 100 * MAX_RSS_GROWTH,
            f"{r.rss_start_mb:.0f} MB -> {r.rss_end_mb:.0f} MB ({r.rss_growth_pct:+.1f}%)",
        ),
        Check(
            "threads back to the warmed-up count",
            r.threads_after <= r.threads_before,
            f"{r.threads_before} -> {r.threads_after}",
        ),
        Check(
            f"event-loop tasks at most warmed-up + {TASK_SLACK}",
            r.tasks_after <= r.tasks_before + TASK_SLACK,
            f"{r.tasks_before} -> {r.tasks_after}",
        ),
        Check(
            "clean exit on SIGTERM",
            r.exit_code in CLEAN_EXIT,
            f"exit status {r.exit_code}",
        ),
    ]


def print_report(r: Report) -> None:
    print(
        f"\nsoak: {r.model}, {r.requests} requests at concurrency {r.concurrency} "
        f"(held: mean {r.held_concurrency_mean:.1f}, max {r.held_concurrency_max}), "
        f"{r.streams} streams alongside, seed {r.seed}"
    )
    print(
        f"uploads: {r.load_seconds:.1f} s ({r.sent / max(r.load_seconds, 1e-9):.1f} req/s; "
        f"200s: p50 {r.latency_p50_s:.3f} s, p99 {r.latency_p99_s:.3f} s); the streams' last "
        f"sessions ended at {r.load_with_streams_seconds:.1f} s; whole run "
        f"(start-up, warm-up, drain, shutdown) {r.wall_seconds:.1f} s\n"
    )
    print(
        f"sent {r.sent}: by status (client) {r.by_status}; by status (server) {r.server_by_status}"
    )
    print(f"good: {r.good_ok} ok, {r.good_shed} shed; bad: {r.bad_ok} as documented\n")
    labels = sorted({label for counts in r.by_kind.values() for label in counts})
    print("| kind | sent | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for kind, counts in r.by_kind.items():
        sent = sum(v for k, v in counts.items() if k != "wrong")
        cells = [str(counts.get(label, "")) for label in labels]
        print(f"| {kind} | {sent} | " + " | ".join(cells) + " |")
    print(
        f"\nstreams: {r.streams_completed} sessions completed, {r.streams_failed} failed; "
        f"{r.stream_finals} finals, {r.stream_finals_matching} equal to a sample's transcript"
    )
    print(
        f"memory: RSS {r.rss_start_mb:.0f} MB after warm-up -> {r.rss_end_mb:.0f} MB at the end "
        f"({r.rss_growth_pct:+.1f}%); peak {r.rss_peak_mb:.0f} MB"
    )
    if r.rss_during_mb:
        during = r.rss_during_mb
        marks = [during[min(len(during) - 1, i * len(during) // 4)] for i in range(4)]
        print(
            "RSS during the load at 0/25/50/75/100%: "
            + " / ".join(f"{mb:.0f}" for mb in [*marks, during[-1]])
            + " MB"
        )
    print(f"threads: {r.threads_before} after warm-up -> {r.threads_after} after the drain")
    print(f"event-loop tasks: {r.tasks_before} after warm-up -> {r.tasks_after} after the drain")
    for example in r.wrong_examples + r.stream_failures:
        print(f"  wrong: {example}")
    print()
    common.print_verdict(r.checks, r.passed)


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("bench.soak", __doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="client timeout and server deadline (s)"
    )
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.streams < 0:
        parser.error("--requests and --concurrency must be >= 1, --streams >= 0")
    report = run(args)
    print_report(report)
    common.write_json(args.json, asdict(report))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
