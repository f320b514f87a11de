"""Benchmark: one long upload (windows cut at pauses) vs the same speech as short requests.

    python -m bench.long_audio                       # an hour of speech, the bundled model
    python -m bench.long_audio --minutes 20 --concurrency 16

A recording of `--minutes` minutes is built from the bundled model's own phrases (espeak-ng,
each phrase spoken once and tiled with seeded pauses of 0.8-2 s) and written, as a 16 kHz 16-bit
WAV, to a temporary folder. Two servers are started alike (`python -m service`, real uvicorn
processes), one per mode, and the modes are timed alternately, `--repeats` times each, the best
run counting: (a) the whole file in one `verbose_json` request, uploaded from the file as it is
read; (b) every utterance as its own request (with 0.5 s of quiet on each side) from
`--concurrency` clients. Each server's resident memory is sampled every 0.1 s; its peak is
reported over its own warm baseline (model loaded, one short request served). The segments of
(a) are checked against where each utterance really is, and their text against (b)'s.
Ratios are what to read: absolute times on a shared machine mean little.
"""

import argparse
import asyncio
import bisect
import contextlib
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

from bench import common
from bench.common import speak, wav_bytes
from bench.serverproc import proc_status_kb, running_server

RATE = 16_000
ESPEAK_RATE = 22_050
PHRASES = (
    "turn on the lights",
    "three four five",
    "open the garage",
    "seven eight nine",
    "call mom",
    "play the radio",
    "two zero one six",
    "set a timer for five minutes",
)
LOUD = 1e-3  # a sample above this is voice: where an utterance's true bounds lie
TOLERANCE_S = 0.5  # a segment's start and end must be this close to its utterance's
QUIET_S = 0.5  # silence on each side of a short request
TRANSCRIBE = "/v1/audio/transcriptions"

Int16 = npt.NDArray[np.int16]


@dataclass
class Utterance:
    """One spoken phrase in the recording: which, and where its voice is (seconds)."""

    phrase: int
    start: float
    end: float


@dataclass
class Recording:
    """The recording on disk and what is in it."""

    path: Path
    seconds: float
    voices: list[Int16]  # each phrase, at RATE, as written
    utterances: list[Utterance]


@dataclass
class Row:
    """One mode's measurements, each on its own freshly started, warmed-up server."""

    mode: str
    audio_seconds: float
    walls: list[float]  # one per repeat
    baseline_rss_mb: float  # model loaded, one short request served
    peak_rss_over_baseline_mb: float
    settled_rss_over_baseline_mb: float  # a second after the last response
    count: int  # segments (a) or requests (b)

    @property
    def wall_seconds(self) -> float:
        """The best repeat: a noisy neighbour only slows some."""
        return min(self.walls)

    @property
    def audio_per_s(self) -> float:
        return self.audio_seconds / self.wall_seconds


@dataclass
class Report:
    """Everything the run measured (what `--json` writes)."""

    model: str
    minutes: float
    concurrency: int
    utterances: int
    file_mb: float
    hwm_reset: bool
    rows: list[Row]
    segments_timed_within_tolerance: int
    texts_agreeing: int
    repeats_identical: bool
    disagreeing: list[tuple[str, str | None, str]] = field(default_factory=list)


def to_pcm16(audio: npt.NDArray[np.float32]) -> Int16:
    """The 16-bit samples a WAV holds: both modes send exactly these, nothing rounded twice."""
    return np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)


def build_recording(path: Path, seconds: float, seed: int) -> Recording:
    """Phrases in order with random pauses until `seconds`, written to `path` as it grows.

    Only the eight spoken phrases and one pause's zeros are ever in memory, never the file.
    """
    rng = np.random.default_rng(seed)
    voices = [to_pcm16(soxr.resample(speak(p), ESPEAK_RATE, RATE, quality="HQ")) for p in PHRASES]
    loud = [np.flatnonzero(np.abs(v.astype(np.float32) / 32768.0) > LOUD) for v in voices]
    utterances: list[Utterance] = []
    at = 0
    with sf.SoundFile(path, "w", samplerate=RATE, channels=1, subtype="PCM_16", format="WAV") as f:
        while at < seconds * RATE:
            index = len(utterances) % len(PHRASES)
            voice = voices[index]
            first, last = int(loud[index][0]), int(loud[index][-1])
            utterances.append(Utterance(index, (at + first) / RATE, (at + last) / RATE))
            pause = np.zeros(int(rng.uniform(0.8, 2.0) * RATE), np.int16)
            f.write(voice)
            f.write(pause)
            at += len(voice) + len(pause)
    return Recording(path, at / RATE, voices, utterances)


def rss_mb(pid: int) -> float:
    """Resident memory now, in MB (10^6 bytes; /proc counts KiB)."""
    return proc_status_kb(pid, "VmRSS") * 1024 / 1e6


def hwm_mb(pid: int) -> float:
    """Peak resident memory since start (or the last `reset_hwm`), in MB."""
    return proc_status_kb(pid, "VmHWM") * 1024 / 1e6


def reset_hwm(pid: int) -> bool:
    """Reset the process's peak RSS to its current RSS (Linux >= 4.0), so VmHWM afterwards is
    the peak of what follows and not of the model's loading. False where it is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@contextmanager
def sampling_rss(pid: int, interval: float = 0.1) -> Iterator[list[float]]:
    """Sample the process's RSS (MB) every `interval` s in a thread while the block runs;
    the list holds the samples, then VmHWM as its last entry."""
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss_mb(pid))
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()
        samples.append(rss_mb(pid))
        samples.append(hwm_mb(pid))


def serve(model_dir: Path, recording: Recording) -> "contextlib.AbstractContextManager[Any]":
    """`python -m service` with its limits raised to take the whole recording."""
    upload_limit = max(300 * 1024 * 1024, 2 * recording.path.stat().st_size)
    seconds = str(max(3600.0, recording.seconds + 60))
    env = {
        "STT_MAX_UPLOAD_BYTES": str(upload_limit),
        "STT_MAX_AUDIO_SECONDS": seconds,
        "STT_MAX_QUEUED_AUDIO_SECONDS": seconds,
        "STT_REQUEST_TIMEOUT_S": "3600",
        "STT_MAX_REQUEST_TIMEOUT_S": "3600",
    }
    return running_server(model_dir, env)


def one_request(url: str, recording: Recording) -> list[dict[str, Any]]:
    """(a): the whole file in one `verbose_json` request, streamed from disk; its segments."""
    with (
        recording.path.open("rb") as f,
        httpx.Client(timeout=httpx.Timeout(3600, connect=10)) as client,
    ):
        response = client.post(
            url + TRANSCRIBE,
            files={"file": ("long.wav", f, "audio/wav")},
            data={"response_format": "verbose_json"},
        )
    if response.status_code != 200:
        raise SystemExit(f"long request failed: {response.status_code} {response.text[:500]}")
    segments: list[dict[str, Any]] = response.json()["segments"]
    return segments


async def _short_requests(url: str, bodies: list[bytes], concurrency: int) -> list[str]:
    texts = [""] * len(bodies)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(bodies)):
        queue.put_nowait(index)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def client_loop() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                response = await client.post(
                    url + TRANSCRIBE, files={"file": ("u.wav", bodies[index], "audio/wav")}
                )
                if response.status_code != 200:
                    raise SystemExit(f"short request failed: {response.status_code}")
                texts[index] = str(response.json()["text"])

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return texts


def short_bodies(recording: Recording) -> tuple[list[bytes], float]:
    """(b)'s request bodies, one per utterance (the eight phrases' WAVs, shared), and the
    audio seconds they carry."""
    quiet = np.zeros(int(QUIET_S * RATE), np.int16)
    per_phrase = [wav_bytes(np.concatenate([quiet, v, quiet]), RATE) for v in recording.voices]
    bodies = [per_phrase[u.phrase] for u in recording.utterances]
    seconds = sum(len(recording.voices[u.phrase]) + 2 * len(quiet) for u in recording.utterances)
    return bodies, seconds / RATE


def match(utterances: list[Utterance], segments: list[dict[str, Any]]) -> list[int | None]:
    """For each utterance, the index of the segment overlapping it most (None: no segment)."""
    starts = [float(s["start"]) for s in segments]
    matched: list[int | None] = []
    for u in utterances:
        best, overlap = None, 0.0
        first = max(0, bisect.bisect_right(starts, u.start) - 1)
        for i in range(first, len(segments)):
            s = segments[i]
            if float(s["start"]) > u.end:
                break
            shared = min(u.end, float(s["end"])) - max(u.start, float(s["start"]))
            if shared > overlap:
                best, overlap = i, shared
        matched.append(best)
    return matched


@dataclass
class Server:
    """A started, warmed-up server and the memory it has been seen to use."""

    url: str
    pid: int
    baseline: float  # RSS with the model loaded and one short request served
    hwm_reset: bool = False
    samples: list[float] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(self.samples)

    def timed(self, drive: Callable[[], None]) -> float:
        """Wall seconds of `drive()`, sampling this server's RSS meanwhile. VmHWM (since the
        reset) counts too, so a spike between two samples is not missed; without a reset it
        may be the model loading's, and only the samples count."""
        with sampling_rss(self.pid) as samples:
            started = time.perf_counter()
            drive()
            wall = time.perf_counter() - started
        self.samples.extend(samples if self.hwm_reset else samples[:-1])
        return wall


def start(stack: ExitStack, model_dir: Path, recording: Recording, warm_up: bytes) -> Server:
    service = stack.enter_context(serve(model_dir, recording))
    url, pid = service.url, service.pid
    asyncio.run(_short_requests(url, [warm_up], 1))
    return Server(url, pid, rss_mb(pid))


def run(args: argparse.Namespace) -> Report:
    """Build the recording, then time (a) and (b) alternately, `--repeats` times each, on two
    servers started alike (each mode's memory is its own); the best wall of each counts."""
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        started = time.perf_counter()
        recording = build_recording(Path(tmp) / "long.wav", args.minutes * 60, args.seed)
        file_mb = recording.path.stat().st_size / 1e6
        print(
            f"built {recording.seconds:.0f} s, {len(recording.utterances)} utterances, "
            f"{file_mb:.1f} MB in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
        bodies, short_seconds = short_bodies(recording)
        whole = start(stack, args.model, recording, bodies[0])
        split = start(stack, args.model, recording, bodies[0])
        for server in (whole, split):
            server.hwm_reset = reset_hwm(server.pid)
        runs_a: list[list[dict[str, Any]]] = []
        runs_b: list[list[str]] = []
        walls_a: list[float] = []
        walls_b: list[float] = []
        # alternating, so a slow spell of a shared machine does not fall on one mode only
        for _ in range(args.repeats):
            walls_a.append(whole.timed(lambda: runs_a.append(one_request(whole.url, recording))))
            walls_b.append(
                split.timed(
                    lambda: runs_b.append(
                        asyncio.run(_short_requests(split.url, bodies, args.concurrency))
                    )
                )
            )
            print(f"(a) {walls_a[-1]:.1f} s, (b) {walls_b[-1]:.1f} s", file=sys.stderr)
        time.sleep(1.0)  # the last batch's worker lets go of its audio within 0.5 s
        settled = {id(s): rss_mb(s.pid) for s in (whole, split)}

    segments, texts = runs_a[0], runs_b[0]
    utterances = recording.utterances
    matched = match(utterances, segments)
    timed = sum(
        1
        for u, m in zip(utterances, matched, strict=True)
        if m is not None
        and abs(float(segments[m]["start"]) - u.start) <= TOLERANCE_S
        and abs(float(segments[m]["end"]) - u.end) <= TOLERANCE_S
    )
    segment_texts = [str(segments[m]["text"]) if m is not None else None for m in matched]
    disagreeing = [
        (PHRASES[u.phrase], long, short)
        for u, long, short in zip(utterances, segment_texts, texts, strict=True)
        if long != short
    ]
    rows = [
        Row(
            "(a) one request, whole file",
            recording.seconds,
            walls_a,
            whole.baseline,
            whole.peak - whole.baseline,
            settled[id(whole)] - whole.baseline,
            len(segments),
        ),
        Row(
            f"(b) one request per utterance, {args.concurrency} clients",
            short_seconds,
            walls_b,
            split.baseline,
            split.peak - split.baseline,
            settled[id(split)] - split.baseline,
            len(texts),
        ),
    ]
    return Report(
        model=args.model.name,
        minutes=args.minutes,
        concurrency=args.concurrency,
        utterances=len(utterances),
        file_mb=file_mb,
        hwm_reset=whole.hwm_reset and split.hwm_reset,
        rows=rows,
        segments_timed_within_tolerance=timed,
        texts_agreeing=len(utterances) - len(disagreeing),
        repeats_identical=all(r == segments for r in runs_a) and all(r == texts for r in runs_b),
        disagreeing=disagreeing,
    )


def print_report(report: Report) -> None:
    a, b = report.rows
    n = report.utterances
    print(
        f"\nmodel: {report.model}; {a.audio_seconds / 60:.1f} min recording "
        f"({report.file_mb:.1f} MB WAV), {n} utterances, concurrency {report.concurrency}, "
        f"best of {len(a.walls)} alternating runs\n"
    )
    print("| mode | audio s | wall s | audio s/s | peak RSS over baseline MB | segments/requests |")
    print("|---|---|---|---|---|---|")
    for r in report.rows:
        print(
            f"| {r.mode} | {r.audio_seconds:.0f} | {r.wall_seconds:.1f} | {r.audio_per_s:.1f} "
            f"| {r.peak_rss_over_baseline_mb:.0f} | {r.count} |"
        )
    print(
        f"\n(a)/(b) throughput (audio s/s): {a.audio_per_s / b.audio_per_s:.2f}x   "
        f"(b)/(a) wall time for the same utterances: {b.wall_seconds / a.wall_seconds:.2f}x"
    )
    for r in report.rows:
        print(f"{r.mode[:3]} wall s per run: {', '.join(f'{w:.1f}' for w in r.walls)}")
    hwm = "VmHWM reset after warm-up" if report.hwm_reset else "VmHWM not resettable: samples"
    print(
        f"baseline RSS (one server per mode, model loaded, warm): (a) {a.baseline_rss_mb:.0f} MB,"
        f" (b) {b.baseline_rss_mb:.0f} MB; peak = max(0.1 s samples, VmHWM) ({hwm})"
    )
    print(
        f"RSS 1 s after the last run, over baseline: (a) {a.settled_rss_over_baseline_mb:.0f}"
        f" MB, (b) {b.settled_rss_over_baseline_mb:.0f} MB"
    )
    print(
        f"(a) segments: {a.count} for {n} utterances; timed within {TOLERANCE_S} s of the "
        f"utterance: {report.segments_timed_within_tolerance}/{n}"
    )
    print(
        f"agreement, (a) segment text == (b) text: {report.texts_agreeing}/{n} "
        f"({report.texts_agreeing / n:.1%}); every repeat's result identical to the first: "
        f"{'yes' if report.repeats_identical else 'NO'}"
    )
    for phrase, long, short in report.disagreeing[:5]:
        print(f"  differs: {phrase!r}: (a) {long!r} vs (b) {short!r}")


def main(argv: list[str] | None = None) -> None:
    parser = common.parser("bench.long_audio", __doc__)
    parser.add_argument("--minutes", type=float, default=60.0, help="length of the recording")
    parser.add_argument("--concurrency", type=int, default=16, help="(b)'s concurrent clients")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each mode")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.concurrency < 1 or args.repeats < 1:
        parser.error("--minutes must be positive, --concurrency and --repeats at least 1")
    report = run(args)
    print_report(report)
    body = asdict(report)
    for row, r in zip(body["rows"], report.rows, strict=True):
        row.update(wall_seconds=r.wall_seconds, audio_per_s=r.audio_per_s)
    common.write_json(args.json, body)


if __name__ == "__main__":
    main()
