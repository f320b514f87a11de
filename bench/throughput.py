"""Benchmark: the batching service vs one request at a time vs offline `generate`, side by side.

    python -m bench.throughput                      # the bundled model
    python -m bench.throughput --base-size          # random wav2vec2-base + BERT-base shape
    python -m bench.throughput --base-size --mixed  # + mixed lengths, Poisson arrivals

Each row is measured in the same run on the same clips: (a) the service with continuous
batching (the own decoding loop, `STT_BATCHING=continuous`), (a') the same service with static
batching (`STT_BATCHING=static`: one `generate` per batch), (b) the same service with
`max_batch_size=1` and one worker (a plain FastAPI + `generate` server), all real uvicorn
servers driven over HTTP by `--concurrency` clients; (c) the offline limit, the model's adapter
called directly on length-sorted batches, no HTTP.

`--mixed` adds (d): a model that never stops early (its generation config suppresses EOS)
asked for 5 to 120 tokens per request (`max_new_tokens`, drawn from 5, 10, 20, 40, 80, 120;
static batching only batches requests asking for the same count), sent as Poisson arrivals at
0.5x, 0.9x and 1.2x the capacity of the static service (measured first, closed loop, on the
same requests), to the continuous and the static service in turn: p95 latency of the short
requests (at most 20 tokens) and of all, throughput, rows per decoder step, and where a decoder
step's time goes (the decoder forward vs the rest, Python, from `/metrics`).
Ratios are what to read: absolute times on a shared machine mean little.
"""

import argparse
import asyncio
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import soundfile as sf

from bench import common
from bench.common import percentile, wav_bytes
from bench.serverproc import proc_status_kb, running_server, scrape

RATE = 16_000


@dataclass
class Row:
    """One mode's measurements."""

    mode: str
    audio_per_s: float
    requests_per_s: float
    p50: float | None
    p95: float | None
    p99: float | None
    mean_batch: float
    peak_rss_mb: float
    stages: dict[str, float] | None = None  # seconds per pipeline stage (from /metrics)


@dataclass
class OpenRow:
    """One mode at one offered load (mixed lengths, Poisson arrivals)."""

    mode: str
    load: float  # offered rate / capacity
    offered_per_s: float
    requests_per_s: float  # completed
    p95_short: float
    p95_all: float
    rows_per_step: float | None  # continuous batching only
    step_model_s: float | None  # seconds in decoder forwards
    step_total_s: float | None  # seconds in decoder steps (forward + Python)


def make_clips(model_dir: Path, count: int, low: float, high: float, seed: int) -> list[np.ndarray]:
    """Clips of uniformly random length: the model's samples back to back, else noise."""
    rng = np.random.default_rng(seed)
    samples_dir = model_dir / "samples"
    speech = [sf.read(p, dtype="float32")[0] for p in sorted(samples_dir.glob("*.wav"))]
    pool = np.concatenate(speech) if speech else rng.normal(0, 0.1, RATE * 30).astype(np.float32)
    clips = []
    for _ in range(count):
        n = int(rng.uniform(low, high) * RATE)
        start = int(rng.integers(0, max(1, len(pool) - n))) if len(pool) > n else 0
        clip = np.resize(pool[start:], n) if len(pool) - start < n else pool[start : start + n]
        clips.append(np.ascontiguousarray(clip, dtype=np.float32))
    return clips


def peak_rss_mb(pid: int) -> float:
    return proc_status_kb(pid, "VmHWM") / 1024


async def _drive(url: str, bodies: list[bytes], concurrency: int) -> tuple[list[float], list[int]]:
    latencies: list[float] = []
    batches: list[int] = []
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def client_loop() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                started = time.perf_counter()
                response = await client.post(
                    url + "/v1/audio/transcriptions", files={"file": ("a.wav", body)}
                )
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)
                batches.append(int(response.headers.get("x-batch-size", "1")))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return latencies, batches


def run_service(
    mode: str,
    model_dir: Path,
    clips: list[np.ndarray],
    args: argparse.Namespace,
    max_batch_size: int,
    extra_env: dict[str, str] | None = None,
) -> Row:
    """Start `python -m service`, warm it up, drive it, and measure it."""
    env = {
        "STT_MAX_BATCH_SIZE": str(max_batch_size),
        "STT_MAX_WAIT_MS": str(args.max_wait_ms),
        "STT_MAX_AUDIO_SECONDS": "600",
        "STT_MAX_QUEUE_SIZE": "10000",
        "STT_REQUEST_TIMEOUT_S": "3600",
        "STT_MAX_REQUEST_TIMEOUT_S": "3600",
        "STT_MAX_BATCH_AUDIO_SECONDS": str(args.max_batch_audio_seconds),
        **(extra_env or {}),
    }
    with running_server(model_dir, env) as server:
        url = server.url
        bodies = [wav_bytes(c, RATE) for c in clips]
        asyncio.run(_drive(url, bodies[: args.concurrency], args.concurrency))  # warm-up
        before = stage_seconds(url)
        started = time.perf_counter()
        latencies, batches = asyncio.run(_drive(url, bodies, args.concurrency))
        wall = time.perf_counter() - started
        after = stage_seconds(url)
        rss = server.peak_rss_mb
    audio = sum(len(c) for c in clips) / RATE
    return Row(
        mode=mode,
        audio_per_s=audio / wall,
        requests_per_s=len(clips) / wall,
        p50=percentile(latencies, 50),
        p95=percentile(latencies, 95),
        p99=percentile(latencies, 99),
        mean_batch=len(batches) / sum(1 / b for b in batches),
        peak_rss_mb=rss,
        stages={k: after[k] - before.get(k, 0.0) for k in after},
    )


def stage_seconds(url: str) -> dict[str, float]:
    """Seconds spent so far per stage (`stt_stage_duration_seconds_sum`) and busy worker time."""
    totals: dict[str, float] = {}
    for name, labels, value in scrape(url):
        if name == "stt_stage_duration_seconds_sum":
            totals[labels["stage"]] = value
        elif name == "stt_worker_busy_seconds_total":
            totals["worker busy"] = totals.get("worker busy", 0.0) + value
    return totals


def run_offline(model_dir: Path, clips: list[np.ndarray], batch_size: int, repeats: int = 3) -> Row:
    """`generate` on length-sorted batches in this process, best of `repeats` passes."""
    import torch

    from service.engine.adapter import ModelAdapter
    from service.engine.types import GenerationParams

    torch.set_num_threads(os.cpu_count() or 1)
    adapter = ModelAdapter(model_dir, "offline")
    params = GenerationParams(max_new_tokens=adapter.default_max_new_tokens)
    adapter.transcribe(clips[:batch_size], params)  # warm-up
    order = sorted(range(len(clips)), key=lambda i: len(clips[i]))
    batches = [
        [clips[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)
    ]
    walls = []
    for _ in range(repeats):  # the limit is the best pass: a noisy neighbour only slows one
        started = time.perf_counter()
        for batch in batches:
            adapter.transcribe(batch, params)
        walls.append(time.perf_counter() - started)
    wall = min(walls)
    audio = sum(len(c) for c in clips) / RATE
    return Row(
        "(c) offline generate",
        audio / wall,
        len(clips) / wall,
        None,
        None,
        None,
        len(clips) / len(batches),
        peak_rss_mb(os.getpid()),
    )


def build_base_size(out_dir: Path, tokens: int, tiny: bool = False) -> Path:
    """A random-weight wav2vec2-base encoder + BERT-base-sized decoder (about 232 M parameters),
    generating exactly `tokens` tokens so runs are comparable (`tiny`: the same, a few layers
    of 64 dimensions, for smoke runs)."""
    import torch
    from transformers import (
        BertConfig,
        BertTokenizer,
        GenerationConfig,
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
    )

    from model_store.compose import BERT_SPECIALS, compose_configs

    vocab = out_dir / "vocab.txt"
    out_dir.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(30_522 - len(BERT_SPECIALS))]
    vocab.write_text("\n".join((*BERT_SPECIALS, *words)) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab))
    small: dict[str, Any] = (
        {"hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128}
        | {"num_hidden_layers": 2}
        if tiny
        else {}
    )
    decoder = BertConfig(is_decoder=True, add_cross_attention=True, **small)
    encoder = Wav2Vec2Config(**(small | {"conv_dim": (32,) * 7} if tiny else {}))
    extractor = Wav2Vec2FeatureExtractor(return_attention_mask=False)  # as wav2vec2-base
    torch.manual_seed(0)
    model = compose_configs(encoder, decoder, tokenizer, extractor, out_dir)
    model.generation_config = GenerationConfig(
        **{
            k: getattr(model.config, k)
            for k in ("decoder_start_token_id", "pad_token_id", "eos_token_id")
        },
        suppress_tokens=[model.config.eos_token_id],  # never stops early, warns of nothing
        max_new_tokens=tokens,
    )
    model.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = common.parser("bench.throughput", __doc__)
    parser.add_argument("--base-size", action="store_true", help="random base-size model instead")
    parser.add_argument(
        "--mixed", action="store_true", help="(d): mixed lengths, Poisson arrivals (see above)"
    )
    parser.add_argument(
        "--mixed-requests", type=int, default=48, help="(d): requests per load and mode"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="(d): a tiny forced-length model (smoke runs)"
    )
    parser.add_argument("--tokens", type=int, default=20, help="base-size: tokens per request")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=15.0)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-batch-audio-seconds", type=float, default=240.0)
    parser.add_argument(
        "--cpu-workers", type=int, default=0, help="(a): STT_CPU_WORKERS (0: the default)"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = (
            build_base_size(Path(tmp) / "base", args.tokens) if args.base_size else args.model
        )
        clips = make_clips(args.model, args.requests, args.min_seconds, args.max_seconds, args.seed)
        workers = {"STT_CPU_WORKERS": str(args.cpu_workers)} if args.cpu_workers else {}
        rows = [
            run_service(
                "(a) service, continuous",
                model_dir,
                clips,
                args,
                args.max_batch_size,
                {**workers, "STT_BATCHING": "continuous"},
            ),
            run_service(
                "(a') service, static",
                model_dir,
                clips,
                args,
                args.max_batch_size,
                {**workers, "STT_BATCHING": "static"},
            ),
            # one request at a time on one worker with every core: a plain FastAPI + generate
            run_service(
                "(b) service, one at a time", model_dir, clips, args, 1, {"STT_CPU_WORKERS": "1"}
            ),
            run_offline(model_dir, clips, args.max_batch_size),
        ]
        mixed = run_mixed(Path(tmp) / "forced", clips, args, workers) if args.mixed else []
    name = "base-size random (232 M)" if args.base_size else model_dir.name
    audio = sum(len(c) for c in clips) / RATE
    print(
        f"\nmodel: {name}; {args.requests} requests, {audio:.0f} s of audio "
        f"({args.min_seconds:g}-{args.max_seconds:g} s clips), concurrency {args.concurrency}, "
        f"max_batch_size {args.max_batch_size}, max_wait_ms {args.max_wait_ms:g}\n"
    )
    print("| mode | audio s/s | req/s | p50 s | p95 s | p99 s | mean batch | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        lat = [f"{v:.3f}" if v is not None else "-" for v in (r.p50, r.p95, r.p99)]
        print(
            f"| {r.mode} | {r.audio_per_s:.1f} | {r.requests_per_s:.2f} | {' | '.join(lat)} "
            f"| {r.mean_batch:.1f} | {r.peak_rss_mb:.0f} |"
        )
    print("\nWhere the time goes (seconds summed over the run, from each server's /metrics):\n")
    stages = ["decode", "features", "encoder", "decoding", "detokenize", "worker busy"]
    print("| mode | " + " | ".join(stages) + " |")
    print("|---|" + "---|" * len(stages))
    for r in rows[:3]:
        cells = [f"{(r.stages or {}).get(stage, 0.0):.1f}" for stage in stages]
        print(f"| {r.mode} | " + " | ".join(cells) + " |")
    a, static, b, c = rows
    print(
        f"\n(a)/(c) throughput: {a.audio_per_s / c.audio_per_s:.2f}x   "
        f"(a)/(b) throughput: {a.audio_per_s / b.audio_per_s:.2f}x   "
        f"(a)/(a') throughput: {a.audio_per_s / static.audio_per_s:.2f}x"
    )
    if mixed:
        print_mixed(mixed)
    common.write_json(args.json, [asdict(r) for r in rows] + [asdict(r) for r in mixed])


TOKEN_COUNTS = (5, 10, 20, 40, 80, 120)
SHORT = 20  # tokens: a "short" request
LOADS = (0.5, 0.9, 1.2)


def run_mixed(
    out_dir: Path, clips: list[np.ndarray], args: argparse.Namespace, workers: dict[str, str]
) -> list[OpenRow]:
    """(d): capacity of the static service on the mixed requests (closed loop), then both
    services at each load, with the same Poisson arrivals."""
    model_dir = build_base_size(out_dir, max(TOKEN_COUNTS), tiny=args.tiny)
    rng = np.random.default_rng(args.seed)
    count = args.mixed_requests
    chosen = [clips[i % len(clips)] for i in range(count)]
    tokens = [int(rng.choice(TOKEN_COUNTS)) for _ in range(count)]
    gaps = rng.exponential(1.0, count)  # Poisson arrivals at rate 1, scaled per load
    env = {
        "STT_MAX_BATCH_SIZE": str(args.max_batch_size),
        "STT_MAX_WAIT_MS": str(args.max_wait_ms),
        "STT_MAX_QUEUE_SIZE": "10000",
        "STT_REQUEST_TIMEOUT_S": "3600",
        "STT_MAX_REQUEST_TIMEOUT_S": "3600",
        **workers,
    }
    modes = {
        "(d) continuous": {**env, "STT_BATCHING": "continuous"},
        "(d) static": {**env, "STT_BATCHING": "static"},
    }
    bodies = [wav_bytes(c, RATE) for c in chosen]
    with running_server(model_dir, modes["(d) static"]) as server:
        asyncio.run(_open_loop(server.url, bodies[:4], tokens[:4], None))  # warm-up
        started = time.perf_counter()
        asyncio.run(_open_loop(server.url, bodies, tokens, None, args.concurrency))
        capacity = count / (time.perf_counter() - started)
    rows = []
    for mode, mode_env in modes.items():
        with running_server(model_dir, mode_env) as server:
            asyncio.run(_open_loop(server.url, bodies[:4], tokens[:4], None))  # warm-up
            for load in LOADS:
                arrivals = np.cumsum(gaps) / (capacity * load)
                before = step_seconds(server.url)
                started = time.perf_counter()
                latencies = asyncio.run(_open_loop(server.url, bodies, tokens, arrivals))
                wall = time.perf_counter() - started
                after = step_seconds(server.url)
                short = [t for t, n in zip(latencies, tokens, strict=True) if n <= SHORT]
                steps = after["steps"] - before["steps"]
                rows.append(
                    OpenRow(
                        mode=mode,
                        load=load,
                        offered_per_s=capacity * load,
                        requests_per_s=count / wall,
                        p95_short=percentile(short, 95),
                        p95_all=percentile(latencies, 95),
                        rows_per_step=(after["rows"] - before["rows"]) / steps if steps else None,
                        step_model_s=after["model"] - before["model"] if steps else None,
                        step_total_s=after["total"] - before["total"] if steps else None,
                    )
                )
    return rows


async def _open_loop(
    url: str,
    bodies: list[bytes],
    tokens: list[int],
    arrivals: np.ndarray | None,
    concurrency: int = 4,
) -> list[float]:
    """Send each body asking for its token count: at its arrival time (seconds from now), or,
    without arrivals, closed loop with `concurrency` clients. Each request's latency."""
    latencies = [0.0] * len(bodies)
    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=None)) as c:

        async def one(index: int) -> None:
            if arrivals is not None:
                await asyncio.sleep(max(0.0, arrivals[index] - (time.perf_counter() - zero)))
            started = time.perf_counter()
            response = await c.post(
                url + "/v1/audio/transcriptions",
                files={"file": ("a.wav", bodies[index])},
                data={"max_new_tokens": str(tokens[index])},
            )
            response.raise_for_status()
            latencies[index] = time.perf_counter() - started

        zero = time.perf_counter()
        if arrivals is not None:
            await asyncio.gather(*(one(i) for i in range(len(bodies))))
        else:
            queue = list(range(len(bodies)))

            async def client() -> None:
                while queue:
                    await one(queue.pop(0))

            await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies


def step_seconds(url: str) -> dict[str, float]:
    """Decoder steps so far (continuous batching): count, rows, model and total seconds."""
    totals = {"steps": 0.0, "rows": 0.0, "model": 0.0, "total": 0.0}
    for name, labels, value in scrape(url):
        if name == "stt_decoder_step_duration_seconds_sum":
            totals[labels["part"]] = value
        elif name == "stt_decoder_step_duration_seconds_count" and labels["part"] == "total":
            totals["steps"] = value
        elif name == "stt_decoder_step_rows_sum":
            totals["rows"] = value
    return totals


def print_mixed(rows: list[OpenRow]) -> None:
    print(
        f"\n(d) mixed lengths ({', '.join(map(str, TOKEN_COUNTS))} tokens), Poisson arrivals; "
        f"short: at most {SHORT} tokens\n"
    )
    print(
        "| mode | load | offered req/s | done req/s | p95 short s | p95 all s | rows/step "
        "| step model s | step Python s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        python = (r.step_total_s or 0) - (r.step_model_s or 0)
        steps = (
            [f"{r.rows_per_step:.1f}", f"{r.step_model_s:.1f}", f"{python:.1f}"]
            if r.rows_per_step is not None
            else ["-", "-", "-"]
        )
        print(
            f"| {r.mode} | {r.load:g}x | {r.offered_per_s:.2f} | {r.requests_per_s:.2f} "
            f"| {r.p95_short:.3f} | {r.p95_all:.3f} | {' | '.join(steps)} |"
        )
    for load in LOADS:
        cont = next(r for r in rows if r.load == load and "continuous" in r.mode)
        static = next(r for r in rows if r.load == load and "static" in r.mode)
        print(
            f"{load:g}x: p95 short continuous/static {cont.p95_short / static.p95_short:.2f}x, "
            f"throughput {cont.requests_per_s / static.requests_per_s:.2f}x"
        )


if __name__ == "__main__":
    main()
