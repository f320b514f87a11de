"""`python -m model_store {compose,synthesize,synthesize2,samples,train,evaluate,build}`: the
recipe's commands. `build` is the whole recipe in one command (both stages, evaluation, card)."""

import argparse
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

DEFAULT_CORPUS = Path("data/corpus")
DEFAULT_CORPUS2 = Path("data/corpus2")
BUNDLED = Path(__file__).parent / "w2v2-bert-commands-en"
STAGE1 = {"max_steps": 3500, "lr": 0.0008, "warmup_steps": 300}
STAGE2 = {
    "max_steps": 2500,
    "lr": 0.0005,
    "warmup_steps": 100,
    "eval_every": 300,
    "eval_size": 160,
    "save_every": 100,
    "export_best": True,
    "freeze_conv_layers": 2,
}


def _value(text: str) -> Any:
    """`--set key=value` values are JSON where they parse as JSON, strings otherwise."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        out[key] = _value(value)
    return out


def cmd_compose(args: argparse.Namespace) -> None:
    from model_store import compose

    out = Path(args.out)
    overrides = _overrides(args.set)
    if args.default:
        compose.compose_default(out, seed=args.seed)
    elif args.from_configs:
        from transformers import AutoFeatureExtractor, AutoTokenizer

        enc_over, dec_over = compose.split_overrides(overrides)
        encoder = compose.load_config(args.encoder, **enc_over)
        decoder = compose.load_config(
            args.decoder, is_decoder=True, add_cross_attention=True, **dec_over
        )
        compose.compose_configs(
            encoder,
            decoder,
            AutoTokenizer.from_pretrained(args.tokenizer or args.decoder),
            AutoFeatureExtractor.from_pretrained(args.feature_extractor or args.encoder),
            out,
            seed=args.seed,
        )
    else:
        model = compose.compose_pretrained(args.encoder, args.decoder, out, **overrides)
        new = compose.newly_initialised(model)
        print(f"newly initialised (cross-attention, train before use): {len(new)} tensors")
    print(f"wrote {out}")


def cmd_synthesize(args: argparse.Namespace) -> None:
    from model_store import corpus

    corpus.require_espeak()
    for spec in corpus.default_specs(args.train_size):
        manifest = corpus.synthesize_split(spec, Path(args.out), workers=args.workers)
        split = corpus.CorpusSplit(Path(args.out), spec.name)
        print(f"{spec.name}: {len(split)} utterances, {split.seconds():.0f} s ({manifest})")


def cmd_synthesize2(args: argparse.Namespace) -> None:
    from model_store import multisynth
    from model_store.corpus import CorpusSplit

    multisynth.require_synthesizers()
    for mix in multisynth.stage2_mixes(args.train_size):
        manifest = multisynth.synthesize(mix, Path(args.out), workers=args.workers)
        split = CorpusSplit(Path(args.out), mix.name)
        print(f"{mix.name}: {len(split)} utterances, {split.seconds():.0f} s ({manifest})")


def cmd_samples(args: argparse.Namespace) -> None:
    from model_store.corpus import export_samples

    texts = export_samples(Path(args.corpus), args.split, args.count, Path(args.out))
    print(f"wrote {len(texts)} samples to {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    from model_store.train import TrainConfig, Trainer

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    extra = _overrides(args.set)
    unknown = set(extra) - known
    if unknown:
        raise SystemExit(f"unknown training settings: {sorted(unknown)}")
    cfg = TrainConfig(init=args.init, corpus=args.corpus, out=args.out, **extra)
    print(f"final checkpoint: {Trainer(cfg).run()}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from model_store.evaluate import evaluate_samples, evaluate_split, write_card

    scores = [
        evaluate_split(Path(args.model), Path(args.corpus), split, limit=args.limit)
        for split in args.splits
    ]
    samples = Path(args.model) / "samples"
    if args.samples and samples.is_dir():
        scores.append(evaluate_samples(Path(args.model), samples))
    if args.suite:
        from model_store.evaluate import evaluate_suite

        scores = evaluate_suite(Path(args.model), Path(args.suite)) + scores
    for s in scores:
        print(json.dumps(dataclasses.asdict(s)))
    if args.card:
        write_card(Path(args.model), scores)
        print(f"model card updated: {Path(args.model) / 'README.md'}")


def _train(init: Path, corpus: Path, out: Path, settings: dict[str, Any]) -> Path:
    from model_store.train import TrainConfig, Trainer

    final = Trainer(TrainConfig(init=str(init), corpus=str(corpus), out=str(out), **settings)).run()
    assert final is not None
    return final


def cmd_build(args: argparse.Namespace) -> None:
    """The whole recipe: stage 1 (espeak-ng corpus, training from scratch), stage 2 (the
    multi-synthesizer augmented corpus, fine-tuning stage 1), evaluation and the card's table.
    Every step is cached or resumable: run it again after an interruption and it goes on.
    `--stage1-from` skips stage 1 and fine-tunes the given weights (e.g. the shipped model)."""
    from model_store import corpus, multisynth
    from model_store.evaluate import evaluate_samples, evaluate_split, evaluate_suite, write_card

    runs, times = Path(args.runs), {}
    runs.mkdir(parents=True, exist_ok=True)

    def timed(name: str, fn: Any, *a: Any) -> Any:
        started = time.monotonic()
        print(f"== {name}", flush=True)
        result = fn(*a)
        times[name] = round((time.monotonic() - started) / 60, 1)
        print(f"== {name}: {times[name]} min", flush=True)
        (runs / "build_times.json").write_text(json.dumps(times, indent=1) + "\n")
        return result

    corpus.require_espeak()
    multisynth.require_synthesizers()
    specs = corpus.default_specs(args.train_size)
    if args.stage1_from:
        stage1 = Path(args.stage1_from)
        tests = [s for s in specs if s.name.startswith("test_")]
    else:
        tests = specs
    timed(
        "stage 1 corpus",
        lambda: [
            corpus.synthesize_split(s, Path(args.corpus), workers=args.workers) for s in tests
        ],
    )
    if not args.stage1_from:
        from model_store import compose

        timed("stage 1 compose", compose.compose_default, runs / "init", 0)
        stage1 = timed(
            "stage 1 training",
            _train,
            runs / "init",
            Path(args.corpus),
            runs / "stage1",
            {**STAGE1, "threads": args.threads},
        )
    timed(
        "stage 2 corpus",
        lambda: [
            multisynth.synthesize(m, Path(args.corpus2), workers=args.workers)
            for m in multisynth.stage2_mixes(args.train2_size)
        ],
    )
    settings = {**STAGE2, "threads": args.threads, **_overrides(args.set)}
    final = timed("stage 2 training", _train, stage1, Path(args.corpus2), runs / "stage2", settings)
    model = Path(args.model)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(final / name, model / name)

    def evaluate() -> None:
        scores = evaluate_suite(model, Path(args.corpus2))
        scores += [
            evaluate_split(model, Path(args.corpus), s.name)
            for s in tests
            if s.name.startswith("test_")
        ]
        if (model / "samples").is_dir():
            scores.append(evaluate_samples(model, model / "samples"))
        for s in scores:
            print(json.dumps(dataclasses.asdict(s)))
        write_card(model, scores)

    timed("evaluation", evaluate)
    print(f"model card updated: {model / 'README.md'}; step times: {json.dumps(times)}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m model_store", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compose", help="join an encoder and a decoder into a servable checkpoint")
    p.add_argument("--encoder", help="pretrained encoder folder or hub id (or config source)")
    p.add_argument("--decoder", help="pretrained decoder folder or hub id (or config source)")
    p.add_argument("--from-configs", action="store_true", help="random init from the configs")
    p.add_argument("--default", action="store_true", help="the bundled model's untrained shape")
    p.add_argument("--tokenizer", help="tokenizer source (default: the decoder's)")
    p.add_argument("--feature-extractor", help="feature extractor source (default: the encoder's)")
    p.add_argument("--set", action="append", default=[], metavar="encoder_X=V|decoder_Y=V")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_compose)

    p = sub.add_parser("synthesize", help="speak the domain corpus with espeak-ng (cached)")
    p.add_argument("--out", default=str(DEFAULT_CORPUS))
    p.add_argument("--train-size", type=int, default=40_000)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_synthesize)

    p = sub.add_parser(
        "synthesize2",
        help="the second edition's corpus: espeak-ng + Festival, "
        "augmented; flite evaluation sets (cached)",
    )
    p.add_argument("--out", default=str(DEFAULT_CORPUS2))
    p.add_argument("--train-size", type=int, default=28_000)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_synthesize2)

    p = sub.add_parser("samples", help="export held-out utterances as WAV files + texts.json")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--split", default="test_voices")
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_samples)

    p = sub.add_parser("train", help="fine-tune a checkpoint (resumes from OUT/last)")
    p.add_argument("--init", required=True)
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--out", required=True)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SETTING=VALUE",
        help="any TrainConfig field, e.g. max_steps=3000",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="WER, CER and exact match on corpus splits")
    p.add_argument("--model", required=True)
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--splits", nargs="*", default=["test_voices", "test_rates"])
    p.add_argument("--limit", type=int)
    p.add_argument("--samples", action="store_true", help="also score MODEL/samples/*.wav")
    p.add_argument("--card", action="store_true", help="write the scores into the model card")
    p.add_argument(
        "--suite",
        metavar="CORPUS2",
        help="also the second edition's splits "
        "(flite voices, unseen espeak-ng, padding, containers, non-speech)",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("build", help="the whole recipe: both stages, evaluation, card")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--corpus2", default=str(DEFAULT_CORPUS2))
    p.add_argument("--runs", default="runs")
    p.add_argument("--model", default=str(BUNDLED), help="where the result and its card go")
    p.add_argument("--train-size", type=int, default=40_000, help="stage 1 training utterances")
    p.add_argument("--train2-size", type=int, default=28_000, help="stage 2 training clips")
    p.add_argument("--stage1-from", help="skip stage 1: fine-tune these weights")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SETTING=VALUE",
        help="stage 2 TrainConfig overrides, e.g. max_minutes=55",
    )
    p.set_defaults(func=cmd_build)

    args = parser.parse_args(argv)
    if args.command == "compose" and not args.default and not (args.encoder and args.decoder):
        parser.error("compose needs --encoder and --decoder (or --default)")
    args.func(args)


if __name__ == "__main__":
    main()
