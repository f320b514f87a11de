"""`python -m model_store {compose,synthesize,samples,train,evaluate}`: the recipe's commands."""

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

DEFAULT_CORPUS = Path("data/corpus")


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
    for s in scores:
        print(json.dumps(dataclasses.asdict(s)))
    if args.card:
        write_card(Path(args.model), scores)
        print(f"model card updated: {Path(args.model) / 'README.md'}")


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
    p.add_argument("--splits", nargs="+", default=["test_voices", "test_rates"])
    p.add_argument("--limit", type=int)
    p.add_argument("--samples", action="store_true", help="also score MODEL/samples/*.wav")
    p.add_argument("--card", action="store_true", help="write the scores into the model card")
    p.set_defaults(func=cmd_evaluate)

    args = parser.parse_args(argv)
    if args.command == "compose" and not args.default and not (args.encoder and args.decoder):
        parser.error("compose needs --encoder and --decoder (or --default)")
    args.func(args)


if __name__ == "__main__":
    main()
