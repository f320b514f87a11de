"""Evaluate a checkpoint on a corpus split: WER, CER and exact-match rate, batched."""

import dataclasses
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
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


def evaluate_split(
    model_dir: Path, corpus_dir: Path, split: str, batch_size: int = 32, limit: int | None = None
) -> Scores:
    """Transcribe a split (length-sorted batches) and score it against its texts."""
    model = SpeechEncoderDecoderModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    feature_extractor = AutoFeatureExtractor.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = CorpusSplit(corpus_dir, split)
    indices = list(range(len(data) if limit is None else min(limit, len(data))))
    indices.sort(key=lambda i: data.rows[i]["length"])
    refs: dict[int, str] = {}
    hyps: dict[int, str] = {}
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        examples = [data[i] for i in chunk]
        texts = transcribe_batch(model, feature_extractor, tokenizer, [ex.audio for ex in examples])
        for i, ex, text in zip(chunk, examples, texts, strict=True):
            refs[i], hyps[i] = normalize(ex.text), normalize(text)
    ref_list = [refs[i] for i in sorted(refs)]
    hyp_list = [hyps[i] for i in sorted(refs)]
    return Scores(
        split=split,
        utterances=len(ref_list),
        audio_seconds=round(sum(data.rows[i]["length"] for i in indices) / 16_000, 1),
        wer=round(word_error_rate(ref_list, hyp_list), 4),
        cer=round(float(jiwer.cer(ref_list, [h or "<empty>" for h in hyp_list])), 4),
        exact_match=round(
            float(np.mean([r == h for r, h in zip(ref_list, hyp_list, strict=True)])), 4
        ),
    )
