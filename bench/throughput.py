"""Benchmark: the batching service vs one request at a time vs offline `generate`, side by side.

    python -m bench.throughput                      # the bundled model
    python -m bench.throughput --base-size          # random wav2vec2-base + BERT-base shape

Each row is measured in the same run on the same clips: (a) the service with dynamic batching,
(b) the same service with `max_batch_size=1` and one worker (a plain FastAPI + `generate`
server), both real uvicorn servers driven over HTTP by `--concurrency` clients; (c) the
offline limit, the model's adapter called directly on length-sorted batches, no HTTP.
Ratios are what to read: absolute times on a shared machine mean little.
"""

import argparse
import asyncio
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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


def build_base_size(out_dir: Path, tokens: int) -> Path:
    """A random-weight wav2vec2-base encoder + BERT-base-sized decoder (about 232 M parameters),
    generating exactly `tokens` tokens so runs are comparable."""
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
    decoder = BertConfig(is_decoder=True, add_cross_attention=True)
    extractor = Wav2Vec2FeatureExtractor(return_attention_mask=False)  # as wav2vec2-base
    torch.manual_seed(0)
    model = compose_configs(Wav2Vec2Config(), decoder, tokenizer, extractor, out_dir)
    model.generation_config = GenerationConfig(
        **{
            k: getattr(model.config, k)
            for k in ("decoder_start_token_id", "pad_token_id", "eos_token_id")
        },
        min_new_tokens=tokens,
        max_new_tokens=tokens,
    )
    model.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = common.parser("bench.throughput", __doc__)
    parser.add_argument("--base-size", action="store_true", help="random base-size model instead")
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
        rows = [
            run_service(
                "(a) service, batching",
                model_dir,
                clips,
                args,
                args.max_batch_size,
                {"STT_CPU_WORKERS": str(args.cpu_workers)} if args.cpu_workers else None,
            ),
            # one request at a time on one worker with every core: a plain FastAPI + generate
            run_service(
                "(b) service, one at a time", model_dir, clips, args, 1, {"STT_CPU_WORKERS": "1"}
            ),
            run_offline(model_dir, clips, args.max_batch_size),
        ]
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
    for r in rows[:2]:
        cells = [f"{(r.stages or {}).get(stage, 0.0):.1f}" for stage in stages]
        print(f"| {r.mode} | " + " | ".join(cells) + " |")
    a, b, c = rows
    print(
        f"\n(a)/(c) throughput: {a.audio_per_s / c.audio_per_s:.2f}x   "
        f"(a)/(b) throughput: {a.audio_per_s / b.audio_per_s:.2f}x"
    )
    common.write_json(args.json, [asdict(r) for r in rows])


if __name__ == "__main__":
    main()
