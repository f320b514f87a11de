"""Evaluate a checkpoint on a corpus split: WER, CER and exact-match rate, batched."""

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import soundfile as sf
import torch
from transformers import AutoFeatureExtractor, AutoTokenizer, SpeechEncoderDecoderModel

from model_store.corpus import CorpusSplit


def normalize(text: str) -> str:
    """Lower case, no punctuation, single spaces: the form references are compared in."""
    kept = "".join(c if c.isalnum() or c in " '" else " " for c in text.lower())
    return " ".join(kept.split())


def word_error_rate(refs: list[str], hyps: list[str]) -> float:
    return float(jiwer.wer([normalize(r) for r in refs], [normalize(h) or "<empty>" for h in hyps]))


@torch.inference_mode()
def transcribe_batch(
    model: SpeechEncoderDecoderModel,
    feature_extractor: Any,
    tokenizer: Any,
    audios: list[np.ndarray],
    max_new_tokens: int = 32,
) -> list[str]:
    """Greedy transcripts of a batch of 16 kHz float32 clips."""
    feats = feature_extractor(
        audios, sampling_rate=16_000, padding=True, return_attention_mask=True, return_tensors="pt"
    )
    device = next(model.parameters()).device
    out = model.generate(
        input_values=feats["input_values"].to(device, next(model.parameters()).dtype),
        attention_mask=feats["attention_mask"].to(device),
        max_new_tokens=max_new_tokens,
        num_beams=1,
        do_sample=False,
    )
    return list(tokenizer.batch_decode(out, skip_special_tokens=True))


@dataclasses.dataclass(frozen=True)
class Scores:
    """Accuracy of a checkpoint on one split."""

    split: str
    utterances: int
    audio_seconds: float
    wer: float
    cer: float
    exact_match: float


def score(split: str, refs: list[str], hyps: list[str], audio_seconds: float) -> Scores:
    """WER, CER and exact-match rate of normalized hypotheses against references."""
    refs = [normalize(r) for r in refs]
    hyps = [normalize(h) for h in hyps]
    return Scores(
        split=split,
        utterances=len(refs),
        audio_seconds=round(audio_seconds, 1),
        wer=round(word_error_rate(refs, hyps), 4),
        cer=round(float(jiwer.cer(refs, [h or "<empty>" for h in hyps])), 4),
        exact_match=round(float(np.mean([r == h for r, h in zip(refs, hyps, strict=True)])), 4),
    )


@functools.lru_cache(maxsize=2)  # one load for all the splits of an `evaluate` command
def load_for_eval(model_dir: Path) -> tuple[SpeechEncoderDecoderModel, Any, Any]:
    model = SpeechEncoderDecoderModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    return (
        model,
        AutoFeatureExtractor.from_pretrained(model_dir),
        AutoTokenizer.from_pretrained(model_dir),
    )


def transcribe_all(model_dir: Path, audios: list[np.ndarray], batch_size: int = 32) -> list[str]:
    """Transcripts in input order, computed in length-sorted batches."""
    model, feature_extractor, tokenizer = load_for_eval(model_dir)
    order = sorted(range(len(audios)), key=lambda i: len(audios[i]))
    out: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        texts = transcribe_batch(model, feature_extractor, tokenizer, [audios[i] for i in chunk])
        out.update(zip(chunk, texts, strict=True))
    return [out[i] for i in range(len(audios))]


def evaluate_split(
    model_dir: Path, corpus_dir: Path, split: str, batch_size: int = 32, limit: int | None = None
) -> Scores:
    """Transcribe a corpus split and score it against its texts."""
    data = CorpusSplit(corpus_dir, split)
    examples = [data[i] for i in range(len(data) if limit is None else min(limit, len(data)))]
    audios = [ex.audio for ex in examples]
    hyps = transcribe_all(model_dir, audios, batch_size)
    seconds = sum(len(a) for a in audios) / 16_000
    return score(split, [ex.text for ex in examples], hyps, seconds)


def load_samples(samples_dir: Path) -> tuple[list[np.ndarray], list[str]]:
    """The shipped sample WAVs and their texts (`texts.json`: file name → text)."""
    texts: dict[str, str] = json.loads((samples_dir / "texts.json").read_text())
    audios = []
    for name in sorted(texts):
        audio, rate = sf.read(samples_dir / name, dtype="float32")
        if rate != 16_000:
            raise ValueError(f"{name}: expected 16 kHz, got {rate}")
        audios.append(audio)
    return audios, [texts[name] for name in sorted(texts)]


def evaluate_samples(model_dir: Path, samples_dir: Path) -> Scores:
    audios, refs = load_samples(samples_dir)
    hyps = transcribe_all(model_dir, audios)
    return score("samples", refs, hyps, sum(len(a) for a in audios) / 16_000)


CARD_START = "<!-- scores:start -->"
CARD_END = "<!-- scores:end -->"


def scores_table(scores: list[Scores]) -> str:
    rows = [
        "| split | utterances | audio (s) | WER | CER | exact match |",
        "|---|---|---|---|---|---|",
    ]
    rows += [
        f"| {s.split} | {s.utterances} | {s.audio_seconds} | {s.wer:.2%} | {s.cer:.2%} "
        f"| {s.exact_match:.2%} |"
        for s in scores
    ]
    return "\n".join(rows)


def write_card(model_dir: Path, scores: list[Scores]) -> None:
    """Put the scores table between the card's score markers (the rest is hand-written)."""
    card = model_dir / "README.md"
    text = (
        card.read_text() if card.exists() else f"# {model_dir.name}\n\n{CARD_START}\n{CARD_END}\n"
    )
    if CARD_START not in text or CARD_END not in text:
        text += f"\n{CARD_START}\n{CARD_END}\n"
    head, rest = text.split(CARD_START, 1)
    _, tail = rest.split(CARD_END, 1)
    scores_json = json.dumps([dataclasses.asdict(s) for s in scores], indent=1)
    (model_dir / "scores.json").write_text(scores_json + "\n")
    card.write_text(f"{head}{CARD_START}\n{scores_table(scores)}\n{CARD_END}{tail}")
