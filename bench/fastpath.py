"""Benchmark and exactness check of the fast paths (service/engine/fastpath.py), side by side.

    python -m bench.fastpath throughput     # bundled + base-size model, both clip sets
    python -m bench.fastpath exactness      # tokens: compiled vs eager on test_voices

`throughput` measures, in one run, on the bundled model and on a random base-size model
(wav2vec2-base + BERT-base shape, `bench.throughput.build_base_size`): offline eager fp32
`generate` on length-sorted batches (the reference limit), offline with each fast path
(`STT_COMPILE=encoder`, `all`, and `STT_QUANTIZE=int8` where torchao is installed), and the
service at `--concurrency` over HTTP with the settings given by `--service-env` (default:
the service's defaults), on `--min/--max-seconds` clips and on 1-3 s command-length clips.
The load generator runs in this process; its own CPU time is reported beside each service row
so that it is not mistaken for the service's (both share the machine's cores).

`exactness` synthesizes a test split of the bundled model's corpus with espeak-ng
(`model_store.corpus`, cached under `--corpus-dir`), transcribes every utterance alone with the
eager model and with the fast path, and reports how many give the same tokens (the budget:
99.5% for fp32 compiled paths), the utterances that differ, and the WER of both (what int8
quantization costs).
"""

import argparse
import asyncio
import dataclasses
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench import common
from bench.common import wav_bytes
from bench.serverproc import running_server, scrape
from bench.throughput import RATE, _drive, build_base_size, make_clips

FAST_PATHS = {  # offline rows: name -> (STT_COMPILE, STT_QUANTIZE)
    "eager fp32": ("off", "off"),
    "compile encoder": ("encoder", "off"),
    "compile all": ("all", "off"),
    "int8 (torchao)": ("off", "int8"),
}


@dataclass
class Row:
    """One configuration's figures on one clip set."""

    model: str
    clips: str
    mode: str
    audio_per_s: float
    requests_per_s: float
    start_s: float  # load + warm-up (offline) or until /ready (service)
    compiles: int  # graphs compiled (offline: during warm-up; service: from /metrics)
    same_tokens: float | None  # share of clips whose tokens equal eager fp32's (offline)
    client_cpu_s: float | None = None  # the load generator's own CPU seconds (service rows)
    mean_batch: float | None = None


def torchao_installed() -> bool:
    try:
        import torchao  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Offline:
    """One offline pass set: speed, start-up and each clip's tokens."""

    audio_per_s: float
    requests_per_s: float
    start_s: float
    compiles: int
    tokens: list[list[int]]


def offline(
    model_dir: Path, clips: list[np.ndarray], mode: str, batch_size: int, repeats: int
) -> Offline:
    """The adapter (load, warm-up, fast path `mode`) on length-sorted batches, best of
    `repeats` passes: a noisy neighbour only slows one."""
    import torch

    from service.engine import fastpath
    from service.engine.adapter import ModelAdapter
    from service.engine.fastpath import FastPathOptions
    from service.engine.types import GenerationParams

    torch.set_num_threads(os.cpu_count() or 1)
    compile_mode, quantize = FAST_PATHS[mode]
    compiles = fastpath.stats.compiles
    started = time.perf_counter()
    adapter = ModelAdapter(
        model_dir,
        "offline",
        fast=FastPathOptions(compile=compile_mode, quantize=quantize),  # type: ignore[arg-type]
    )
    adapter.warm_up()
    start_s = time.perf_counter() - started
    compiles = fastpath.stats.compiles - compiles
    params = GenerationParams(max_new_tokens=adapter.default_max_new_tokens)
    adapter.transcribe(clips[:batch_size], params)  # a batch's first run, as the service's
    order = sorted(range(len(clips)), key=lambda i: len(clips[i]))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    tokens: list[list[int]] = [[] for _ in clips]
    walls = []
    for _ in range(repeats):
        begin = time.perf_counter()
        for batch in batches:
            rows = adapter.transcribe([clips[i] for i in batch], params)
            for i, row in zip(batch, rows, strict=True):
                tokens[i] = row.tokens
        walls.append(time.perf_counter() - begin)
    audio = sum(len(c) for c in clips) / RATE
    return Offline(audio / min(walls), len(clips) / min(walls), start_s, compiles, tokens)


def service(
    model_dir: Path, clips: list[np.ndarray], env: dict[str, str], args: argparse.Namespace
) -> tuple[float, float, float, int, float, float]:
    """Audio s/s, req/s, seconds to /ready, compiles, client CPU seconds, mean batch."""
    full_env = {
        "STT_MAX_BATCH_SIZE": "16",
        "STT_MAX_AUDIO_SECONDS": "600",
        "STT_MAX_QUEUE_SIZE": "10000",
        "STT_REQUEST_TIMEOUT_S": "3600",
        "STT_MAX_REQUEST_TIMEOUT_S": "3600",
        **env,
    }
    started = time.perf_counter()
    with running_server(model_dir, full_env) as server:
        ready_s = time.perf_counter() - started
        bodies = [wav_bytes(c, RATE) for c in clips]
        asyncio.run(_drive(server.url, bodies[: args.concurrency], args.concurrency))  # warm
        cpu = time.process_time()
        begin = time.perf_counter()
        _, batches = asyncio.run(_drive(server.url, bodies, args.concurrency))
        wall = time.perf_counter() - begin
        client_cpu = time.process_time() - cpu
        compiles = int(sum(v for n, _, v in scrape(server.url) if n == "stt_compiles_total"))
    audio = sum(len(c) for c in clips) / RATE
    mean_batch = len(batches) / sum(1 / b for b in batches)
    return audio / wall, len(clips) / wall, ready_s, compiles, client_cpu, mean_batch


def throughput(args: argparse.Namespace) -> list[Row]:
    env = dict(pair.split("=", 1) for pair in args.service_env)
    modes = [m for m in FAST_PATHS if m != "int8 (torchao)" or torchao_installed()]
    modes = [m for m in modes if m in args.modes] if args.modes else modes
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {args.model.name: args.model}
        if not args.skip_base_size:
            models["base-size random"] = build_base_size(Path(tmp) / "base", args.tokens)
        clip_sets = {
            f"{args.min_seconds:g}-{args.max_seconds:g} s": (args.min_seconds, args.max_seconds),
            "1-3 s": (1.0, 3.0),
        }
        for name, model_dir in models.items():
            for label, (low, high) in clip_sets.items():
                clips = make_clips(args.model, args.requests, low, high, args.seed)
                reference: list[list[int]] | None = None
                for mode in modes:
                    run = offline(model_dir, clips, mode, 16, args.repeats)
                    reference = reference or run.tokens
                    same = sum(a == b for a, b in zip(run.tokens, reference, strict=True))
                    rows.append(
                        Row(name, label, f"offline {mode}", run.audio_per_s, run.requests_per_s,
                            run.start_s, run.compiles, same / len(clips))
                    )  # fmt: skip
                speed, rps, ready_s, compiles, client_cpu, batch = service(
                    model_dir, clips, env, args
                )
                mode = "service " + (" ".join(args.service_env) or "(defaults)")
                rows.append(
                    Row(name, label, mode, speed, rps, ready_s, compiles, None, client_cpu, batch)
                )
    return rows


def print_throughput(rows: list[Row], args: argparse.Namespace) -> None:
    print(f"\n{args.requests} requests per clip set, concurrency {args.concurrency}\n")
    print(
        "| model | clips | mode | audio s/s | vs eager | req/s | start s | compiles "
        "| same tokens | client CPU s | mean batch |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        eager = next(
            r.audio_per_s
            for r in rows
            if (r.model, r.clips, r.mode) == (row.model, row.clips, "offline eager fp32")
        )
        same = f"{row.same_tokens:.1%}" if row.same_tokens is not None else "-"
        cpu = f"{row.client_cpu_s:.1f}" if row.client_cpu_s is not None else "-"
        batch = f"{row.mean_batch:.1f}" if row.mean_batch is not None else "-"
        print(
            f"| {row.model} | {row.clips} | {row.mode} | {row.audio_per_s:.1f} "
            f"| {row.audio_per_s / eager:.2f}x | {row.requests_per_s:.2f} | {row.start_s:.1f} "
            f"| {row.compiles} | {same} | {cpu} | {batch} |"
        )


@dataclass
class Exactness:
    """Tokens of the fast path against eager fp32 on one corpus split."""

    split: str
    mode: str
    utterances: int
    same_tokens: int
    eager_wer: float
    fast_wer: float
    differing: list[int]  # utterance indices whose tokens differ


def exactness(args: argparse.Namespace) -> Exactness:
    from model_store.corpus import CorpusSplit, default_specs, synthesize_split
    from model_store.evaluate import word_error_rate
    from service.engine.adapter import ModelAdapter
    from service.engine.fastpath import FastPathOptions
    from service.engine.types import GenerationParams

    spec = next(s for s in default_specs(0) if s.name == args.split)
    if args.limit is not None and args.limit < spec.size:
        # a split's plan is drawn in order from its seed: the first N of the full split
        spec = dataclasses.replace(spec, name=f"{spec.name}-first{args.limit}", size=args.limit)
    synthesize_split(spec, args.corpus_dir)
    data = CorpusSplit(args.corpus_dir, spec.name)
    count = len(data)
    examples = [data[i] for i in range(count)]
    compile_mode, quantize = FAST_PATHS[args.mode]
    eager = ModelAdapter(args.model, "eager")
    fast = ModelAdapter(
        args.model,
        "fast",
        fast=FastPathOptions(compile=compile_mode, quantize=quantize),  # type: ignore[arg-type]
    )
    fast.warm_up()
    params = GenerationParams(max_new_tokens=eager.default_max_new_tokens)
    want = [eager.transcribe([ex.audio], params)[0] for ex in examples]
    got = [fast.transcribe([ex.audio], params)[0] for ex in examples]
    refs = [ex.text for ex in examples]
    differing = [i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a.tokens != b.tokens]
    return Exactness(
        args.split,
        args.mode,
        count,
        count - len(differing),
        word_error_rate(refs, [r.text for r in want]),
        word_error_rate(refs, [r.text for r in got]),
        differing,
    )


def main(argv: list[str] | None = None) -> None:
    parser = common.parser("bench.fastpath", __doc__)
    parser.add_argument("command", choices=["throughput", "exactness"])
    bench = parser.add_argument_group("throughput")
    bench.add_argument("--requests", type=int, default=64)
    bench.add_argument("--concurrency", type=int, default=16)
    bench.add_argument("--min-seconds", type=float, default=1.0)
    bench.add_argument("--max-seconds", type=float, default=15.0)
    bench.add_argument("--tokens", type=int, default=20, help="base-size: tokens per request")
    bench.add_argument("--repeats", type=int, default=3, help="offline passes (best taken)")
    bench.add_argument("--skip-base-size", action="store_true")
    bench.add_argument("--modes", nargs="*", choices=list(FAST_PATHS), help="offline rows")
    bench.add_argument(
        "--service-env", nargs="*", default=[], metavar="STT_X=V", help="the service's settings"
    )
    check = parser.add_argument_group("exactness")
    check.add_argument("--split", default="test_voices", choices=["test_voices", "test_rates"])
    check.add_argument("--mode", default="compile encoder", choices=list(FAST_PATHS)[1:])
    check.add_argument("--limit", type=int, help="only the first N utterances")
    check.add_argument(
        "--corpus-dir", type=Path, default=Path(tempfile.gettempdir()) / "stt-corpus"
    )
    args = parser.parse_args(argv)
    if args.command == "throughput":
        rows = throughput(args)
        print_throughput(rows, args)
        common.write_json(args.json, [asdict(r) for r in rows])
        return
    result = exactness(args)
    print(
        f"\n{result.split}, {result.mode}: {result.same_tokens} of {result.utterances} "
        f"utterances give eager's tokens ({result.same_tokens / max(1, result.utterances):.2%}); "
        f"WER eager {result.eager_wer:.4f}, {result.mode} {result.fast_wer:.4f}"
    )
    if result.differing:
        print("differing utterances:", ", ".join(map(str, result.differing)))
    common.write_json(args.json, asdict(result))


if __name__ == "__main__":
    main()
