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


def _error_rate(refs: list[str], hyps: list[str], unit: str) -> float:
    """Errors over reference units (words or characters), corpus-wide. A clip whose reference is
    empty (no speech) adds every unit of its hypothesis as insertions; an empty hypothesis of a
    non-empty reference is all deletions."""
    pairs = [(r, h) for r, h in zip(refs, hyps, strict=True) if r]
    if unit == "word":
        inserted = sum(len(h.split()) for r, h in zip(refs, hyps, strict=True) if not r)
        total = sum(len(r.split()) for r, _ in pairs)
        if pairs:
            out = jiwer.process_words([r for r, _ in pairs], [h or "<empty>" for _, h in pairs])
            errors = out.substitutions + out.deletions + out.insertions
            # "<empty>" counted as one substitution + (n-1) deletions: n errors either way
        else:
            errors = 0
    else:
        inserted = sum(len(h) for r, h in zip(refs, hyps, strict=True) if not r)
        total = sum(len(r) for r, _ in pairs)
        if pairs:
            chars = jiwer.process_characters([r for r, _ in pairs], [h or "~" for _, h in pairs])
            errors = chars.substitutions + chars.deletions + chars.insertions
        else:
            errors = 0
    return (errors + inserted) / max(total, 1)


def word_error_rate(refs: list[str], hyps: list[str]) -> float:
    return _error_rate([normalize(r) for r in refs], [normalize(h) for h in hyps], "word")


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
        wer=round(_error_rate(refs, hyps, "word"), 4),
        cer=round(_error_rate(refs, hyps, "char"), 4),
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
        f"| {s.split} | {s.utterances} | {s.audio_seconds} | "
        + (
            f"{s.wer:.0f} words out | — "  # no reference words: the count of words output
            if s.split == "nonspeech"
            else f"{s.wer:.2%} | {s.cer:.2%} "
        )
        + f"| {s.exact_match:.2%} |"
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


# --- the second edition's evaluation: unseen synthesizer, unseen voices, containers, silence ---

CONTAINERS = ("wav", "flac", "ogg", "mp3")
CONTAINER_RATE = 22_050


def encode_container(audio: np.ndarray, fmt: str, rate: int = CONTAINER_RATE) -> bytes:
    """16 kHz float32 audio as a file of `fmt` (wav: PCM16, flac, ogg: Vorbis, mp3: 64 kbit/s)
    at `rate` Hz, as a user would upload it."""
    import io

    import av
    import soxr

    pcm = np.clip(soxr.resample(audio, 16_000, rate), -1, 1).astype(np.float32)
    buf = io.BytesIO()
    if fmt in ("wav", "flac", "ogg"):
        subtype = {"wav": "PCM_16", "flac": "PCM_16", "ogg": "VORBIS"}[fmt]
        sf.write(buf, pcm, rate, format=fmt.upper(), subtype=subtype)
        return buf.getvalue()
    if fmt != "mp3":
        raise ValueError(f"unknown container {fmt}")
    with av.open(buf, "w", format="mp3") as out:
        stream = out.add_stream("libmp3lame", rate=rate)
        stream.bit_rate = 64_000
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


def decode_like_service(data: bytes) -> np.ndarray:
    """What the service's upload path makes of a file: its decoder, to 16 kHz mono float32."""
    from service.audio.decode import decode_audio

    return decode_audio(data, sample_rate=16_000, max_seconds=120)


def _examples(corpus_dir: Path, split: str, voice: str | None = None) -> tuple[list, list]:
    data = CorpusSplit(corpus_dir, split)
    examples = [data[i] for i in range(len(data))]
    if voice is not None:
        examples = [ex for ex in examples if ex.voice == voice]
    return [ex.audio for ex in examples], [ex.text for ex in examples]


def evaluate_audios(
    model_dir: Path, name: str, audios: list[np.ndarray], refs: list[str]
) -> Scores:
    hyps = transcribe_all(model_dir, audios)
    return score(name, refs, hyps, sum(len(a) for a in audios) / 16_000)


def evaluate_suite(model_dir: Path, corpus_dir: Path, containers: int = 100) -> list[Scores]:
    """Every split of the second edition's card, from the `stage2_mixes` corpus:

    - `flite` (all four voices) and `flite_<voice>` apart: a synthesizer never trained on;
    - `espeak_unseen`: espeak-ng variants never trained on, 100-240 wpm;
    - `padded`: espeak-ng (unseen variants) and flite with 0-2 s of silence each side;
    - `<container>_22k`: `containers` clips (half espeak-ng, half flite) encoded at 22.05 kHz as
      WAV, FLAC, OGG Vorbis and MP3 and decoded by the service's own decoder;
    - `nonspeech`: clips without speech (silence, noise floors, coloured noise, hum, far
      babble); its WER column holds the number of words output over all clips, its exact-match
      column the share of clips transcribed as nothing. The model alone, no VAD gate.
    - `dev`: the training recipe's dev split (unseen espeak-ng variants, Festival; augmented).
    """
    from model_store.multisynth import FLITE_VOICES

    scores = []
    audios, refs = _examples(corpus_dir, "test_flite")
    scores.append(evaluate_audios(model_dir, "flite", audios, refs))
    for voice in FLITE_VOICES:
        audios, refs = _examples(corpus_dir, "test_flite", voice)
        scores.append(evaluate_audios(model_dir, f"flite_{voice}", audios, refs))
    audios, refs = _examples(corpus_dir, "test_espeak")
    scores.append(evaluate_audios(model_dir, "espeak_unseen", audios, refs))
    audios, refs = _examples(corpus_dir, "test_padded")
    scores.append(evaluate_audios(model_dir, "padded", audios, refs))
    e_audio, e_refs = _examples(corpus_dir, "test_espeak")
    f_audio, f_refs = _examples(corpus_dir, "test_flite")
    half = containers // 2
    mixed = e_audio[:half] + f_audio[:half]
    mixed_refs = e_refs[:half] + f_refs[:half]
    for fmt in CONTAINERS:
        decoded = [decode_like_service(encode_container(a, fmt)) for a in mixed]
        scores.append(evaluate_audios(model_dir, f"{fmt}_22k", decoded, mixed_refs))
    audios, refs = _examples(corpus_dir, "test_nonspeech")
    scores.append(evaluate_audios(model_dir, "nonspeech", audios, refs))
    audios, refs = _examples(corpus_dir, "dev")
    scores.append(evaluate_audios(model_dir, "dev", audios, refs))
    return scores
