"""Resource attacks from the second reliability pass (issue 22), measured on a real server.

    python -m bench.attacks                      # the attacks at full size (59-minute files)
    python -m bench.attacks --minutes 10 --json attacks.json

The attacks run one after another against one `python -m service` (bundled model unless
`--model`, default settings), the long uploads first, so that the peak memory (VmHWM) read
after them is theirs:

- baseline: short uploads (the model's samples), one at a time, for `--seconds`;
- long uploads: `--uploads` concurrent uploads of a FLAC that decodes to `--minutes` minutes
  (silence with one spoken sample a minute: a small file, a large decoded signal, real windows
  to transcribe), each with a deadline of `--long-timeout` seconds. Reports what was admitted
  and refused, and the server's peak resident memory against its RSS before the attack;
- slow decodes: six concurrent uploads of `--minutes` minutes of 192 kHz silence as FLAC (13 s
  of decoding an hour on the CI machine), then short uploads one at a time for `--seconds`;
- streaming: eight websocket sessions at 4x real time with `num_beams=8`,
  `max_utterance_seconds=120`, `partial_interval_ms=100`, speech without pauses, and short
  uploads one at a time for `--seconds`.

It prints one table: per attack, what the attackers got, and the short uploads' statuses and
latency percentiles beside it. Nothing is asserted here (tests/reliability/test_attacks.py
holds the scaled-down checks); the figures go in the README's reliability section.
"""

import asyncio
import contextlib
import io
import itertools
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from bench import common
from bench.serverproc import Server, running_server

TRANSCRIBE = "/v1/audio/transcriptions"
RATE = 16_000


def samples(model_dir: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((model_dir / "samples").glob("*.wav"))]


def speech_16k(model_dir: Path) -> npt.NDArray[np.float32]:
    """Every sample, resampled to 16 kHz mono and joined without pauses."""
    parts = []
    for path in sorted((model_dir / "samples").glob("*.wav")):
        audio, rate = sf.read(path, dtype="float32")
        if audio.ndim > 1:
            audio = audio.mean(axis=1)
        parts.append(soxr.resample(audio, rate, RATE).astype(np.float32))
    return np.concatenate(parts)


def long_flac(minutes: int, speech: npt.NDArray[np.float32]) -> bytes:
    """`minutes` of silence at 16 kHz with a spoken second or two at the start of each minute."""
    minute = np.zeros(60 * RATE, np.float32)
    minute[: min(len(speech), 2 * RATE)] = speech[: 2 * RATE]
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", RATE, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(minutes):
            f.write(minute)
    return buf.getvalue()


def slow_flac(minutes: int) -> bytes:
    """`minutes` of silence at 192 kHz as FLAC: tiny, and slow to decode."""
    buf = io.BytesIO()
    rate = 192_000
    block = np.zeros(rate * 10, np.int16)
    with sf.SoundFile(buf, "w", rate, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(minutes * 6):
            f.write(block)
    return buf.getvalue()


async def post(
    client: httpx.AsyncClient, url: str, body: bytes, name: str, **fields: object
) -> tuple[int, str, float]:
    """Upload; (status, error code or "", seconds)."""
    started = time.monotonic()
    try:
        response = await client.post(
            url + TRANSCRIBE,
            files={"file": (name, body)},
            data={k: str(v) for k, v in fields.items()},
            timeout=600,
        )
    except httpx.TransportError as exc:
        return 0, type(exc).__name__, time.monotonic() - started
    code = ""
    if response.status_code != 200:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            code = response.json()["error"]["code"]
    return response.status_code, code, time.monotonic() - started


async def short_uploads(url: str, clips: list[bytes], seconds: float) -> dict[str, Any]:
    """Short uploads one after another for `seconds`: statuses and latency percentiles."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    give_up = time.monotonic() + seconds
    async with httpx.AsyncClient() as client:
        for clip in itertools.cycle(clips):
            if time.monotonic() >= give_up:
                break
            status, code, took = await post(client, url, clip, "a.wav")
            statuses[f"{status} {code}".strip()] += 1
            if status == 200:
                latencies.append(took)
    return {
        "statuses": dict(statuses),
        "p50_s": round(float(np.percentile(latencies, 50)), 3) if latencies else None,
        "p99_s": round(float(np.percentile(latencies, 99)), 3) if latencies else None,
        "max_s": round(max(latencies), 3) if latencies else None,
    }


async def attack_long_uploads(
    server: Server, body: bytes, uploads: int, timeout: float
) -> dict[str, Any]:
    before = server.rss_mb
    async with httpx.AsyncClient() as client:
        results = await asyncio.gather(
            *(post(client, server.url, body, "long.flac", timeout=timeout) for _ in range(uploads))
        )
    statuses = Counter(f"{s} {c}".strip() for s, c, _ in results)
    return {
        "file_mb": round(len(body) / 1e6, 2),
        "statuses": dict(statuses),
        "rss_before_mb": round(before, 1),
        "peak_rss_mb": round(server.peak_rss_mb, 1),
    }


async def attack_slow_decodes(
    server: Server, body: bytes, clips: list[bytes], seconds: float
) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        slow = [asyncio.create_task(post(client, server.url, body, "slow.flac")) for _ in range(6)]
        await asyncio.sleep(0.5)
        short = await short_uploads(server.url, clips, seconds)
        done = await asyncio.gather(*slow)
    short["slow_statuses"] = dict(Counter(f"{s} {c}".strip() for s, c, _ in done))
    return short


async def greedy_session(url: str, speech: npt.NDArray[np.float32], stop: asyncio.Event) -> int:
    config = {
        "type": "config",
        "sample_rate": RATE,
        "num_beams": 8,
        "max_utterance_seconds": 120,
        "partial_interval_ms": 100,
        "silence_duration_ms": 10_000,
    }
    pcm = (np.clip(speech, -1, 1) * 32767).astype("<i2")
    frames = [pcm[i : i + RATE // 10].tobytes() for i in range(0, len(pcm), RATE // 10)]
    partials = 0
    async with connect(url.replace("http://", "ws://") + "/v1/audio/stream") as ws:
        await ws.send(json.dumps(config))

        async def read() -> None:
            nonlocal partials
            with contextlib.suppress(ConnectionClosed):
                async for raw in ws:
                    partials += json.loads(raw).get("type") == "transcript.partial"

        reader = asyncio.create_task(read())
        for frame in itertools.cycle(frames):
            if stop.is_set():
                break
            await ws.send(frame)
            await asyncio.sleep(0.025)  # 100 ms of audio every 25 ms: 4x real time
        reader.cancel()
    return partials


async def attack_streams(
    server: Server, speech: npt.NDArray[np.float32], clips: list[bytes], seconds: float
) -> dict[str, Any]:
    stop = asyncio.Event()
    sessions = [asyncio.create_task(greedy_session(server.url, speech, stop)) for _ in range(8)]
    await asyncio.sleep(3.0)
    short = await short_uploads(server.url, clips, seconds)
    stop.set()
    short["partials_per_session"] = await asyncio.gather(*sessions)
    return short


def _statuses(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} x {status}" for status, n in counts.items()) or "-"


def print_table(report: dict[str, Any]) -> None:
    """The README's table: one row per attack."""
    print(
        "| attack | what the attackers got | short uploads: status | p50 s | p99 s | max s |\n"
        "|---|---|---|---|---|---|"
    )
    rows = [
        ("none (baseline)", "-", report["baseline"]),
        (
            f"{report['uploads']} long uploads ({report['minutes']} min)",
            f"{_statuses(report['long_uploads']['statuses'])}; peak RSS "
            f"{report['long_uploads']['peak_rss_mb']} MB from "
            f"{report['long_uploads']['rss_before_mb']} MB",
            None,
        ),
        (
            f"6 slow decodes ({report['minutes']} min at 192 kHz)",
            _statuses(report["slow_decodes"]["slow_statuses"]),
            report["slow_decodes"],
        ),
        (
            "8 greedy streams",
            "partials per session: "
            + ", ".join(str(p) for p in report["streams"]["partials_per_session"]),
            report["streams"],
        ),
    ]
    for name, attackers, short in rows:
        cells = ["-", "-", "-", "-"]
        if short is not None:
            cells = [
                _statuses(short["statuses"]),
                *(str(short[key]) for key in ("p50_s", "p99_s", "max_s")),
            ]
        print(f"| {name} | {attackers} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("bench.attacks", __doc__)
    parser.add_argument("--minutes", type=int, default=59)
    parser.add_argument("--uploads", type=int, default=10)
    parser.add_argument("--long-timeout", type=float, default=60.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args(argv)
    clips = samples(args.model)
    speech = speech_16k(args.model)
    report: dict[str, Any] = {"minutes": args.minutes, "uploads": args.uploads}
    long_body, slow_body = long_flac(args.minutes, speech), slow_flac(args.minutes)
    with running_server(args.model) as server:
        report["baseline"] = asyncio.run(short_uploads(server.url, clips, args.seconds))
        # first of the attacks: the peak memory read after it is its own
        report["long_uploads"] = asyncio.run(
            attack_long_uploads(server, long_body, args.uploads, args.long_timeout)
        )
        report["slow_decodes"] = asyncio.run(
            attack_slow_decodes(server, slow_body, clips, args.seconds)
        )
        report["streams"] = asyncio.run(attack_streams(server, speech, clips, args.seconds))
    print_table(report)
    common.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
