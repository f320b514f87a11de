"""Synthesize a spoken corpus of the domain with espeak-ng, split by voice.

Each utterance is spoken by one espeak-ng voice (an English accent plus a voice variant) at a
speaking rate, pitch and word gap, with light noise and gain, resampled to 16 kHz. Variants are
split three ways (train / dev / test) so that evaluation voices are never heard in training, and
the `test_rates` split also uses speaking rates outside the training range.

A split is stored as one int16 array (`<split>.npy`, memory-mapped when read) and a JSON-lines
manifest of offsets and texts. A split whose manifest exists with the same parameters is reused.
"""

import dataclasses
import hashlib
import json
import multiprocessing
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from model_store.domain import sentence

SAMPLE_RATE = 16_000
ACCENTS = (
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-rp",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
TRAIN_RATES = (130, 190)
HELD_OUT_RATES = ((95, 115), (205, 230))
_EXCLUDED_VARIANTS = {"whisper", "whisperf"}  # unvoiced speech is outside the domain


@dataclasses.dataclass(frozen=True)
class Utterance:
    """What to speak and how."""

    text: str
    accent: str
    variant: str
    rate: int
    pitch: int
    word_gap: int
    seed: int

    @property
    def voice(self) -> str:
        return f"{self.accent}+{self.variant}"


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """How many utterances of which voices and rates make a split."""

    name: str
    size: int
    variant_group: str  # train | dev | test
    held_out_rates: bool
    seed: int


def espeak_variants() -> list[str]:
    """Voice variant names installed with espeak-ng, whispering ones excluded."""
    listing = subprocess.run(
        ["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[1:]
    names = {line.split()[4].removeprefix("!v/") for line in listing if len(line.split()) >= 5}
    return sorted(names - _EXCLUDED_VARIANTS)


def variant_groups(variants: list[str]) -> dict[str, list[str]]:
    """A fixed three-way split of the variants: every 8th to test, the next of each 16 to dev."""
    groups: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    for i, name in enumerate(variants):
        group = "test" if i % 8 == 3 else "dev" if i % 16 == 6 else "train"
        groups[group].append(name)
    return groups


def plan(spec: SplitSpec, variants: list[str]) -> list[Utterance]:
    """The utterances of a split, drawn deterministically from its seed."""
    rng = random.Random(spec.seed)
    pool = variant_groups(variants)[spec.variant_group]
    plans = []
    for i in range(spec.size):
        if spec.held_out_rates:
            low, high = rng.choice(HELD_OUT_RATES)
        else:
            low, high = TRAIN_RATES
        plans.append(
            Utterance(
                text=sentence(rng),
                accent=rng.choice(ACCENTS),
                variant=rng.choice(pool),
                rate=rng.randint(low, high),
                pitch=rng.randint(15, 85),
                word_gap=rng.randint(0, 4),
                seed=spec.seed * 1_000_003 + i,
            )
        )
    return plans


def speak(utt: Utterance, workdir: Path) -> np.ndarray:
    """Speak one utterance; returns int16 samples at 16 kHz with silence, gain and noise."""
    path = workdir / f"{utt.seed}.wav"
    subprocess.run(
        [
            "espeak-ng",
            "-v",
            utt.voice,
            "-s",
            str(utt.rate),
            "-p",
            str(utt.pitch),
            "-g",
            str(utt.word_gap),
            "-w",
            str(path),
            utt.text,
        ],
        check=True,
        capture_output=True,
    )
    audio, rate = sf.read(path, dtype="float32")
    path.unlink()
    audio = soxr.resample(audio, rate, SAMPLE_RATE)
    rng = np.random.default_rng(utt.seed)
    lead, tail = rng.uniform(0.05, 0.35, size=2)
    audio = np.concatenate(
        [
            np.zeros(int(lead * SAMPLE_RATE), np.float32),
            audio,
            np.zeros(int(tail * SAMPLE_RATE), np.float32),
        ]
    )
    peak = float(np.abs(audio).max()) or 1.0
    audio = audio / peak * rng.uniform(0.2, 0.9)
    speech_rms = float(np.sqrt(np.mean(audio**2)))
    snr_db = rng.uniform(18, 45)
    audio = audio + rng.normal(0, speech_rms / 10 ** (snr_db / 20), audio.shape)
    return np.clip(audio * 32767, -32768, 32767).astype(np.int16)


def _speak_chunk(chunk: list[Utterance]) -> list[np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        return [speak(utt, Path(tmp)) for utt in chunk]


def _chunks(items: list[Utterance], size: int) -> Iterator[list[Utterance]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def synthesize_split(spec: SplitSpec, out_dir: Path, workers: int = 2) -> Path:
    """Write one split (cached: skipped when an identical split exists). Returns its manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = espeak_variants()
    key = hashlib.sha256(json.dumps([dataclasses.asdict(spec), variants]).encode()).hexdigest()
    manifest = out_dir / f"{spec.name}.jsonl"
    stamp = out_dir / f"{spec.name}.key"
    if manifest.exists() and stamp.exists() and stamp.read_text() == key:
        return manifest
    utterances = plan(spec, variants)
    tmp_audio = out_dir / f"{spec.name}.tmp.bin"
    rows = []
    offset = 0
    with tmp_audio.open("wb") as sink, multiprocessing.Pool(workers) as pool:
        spoken = pool.imap(_speak_chunk, _chunks(utterances, 64))
        for chunk, audios in zip(_chunks(utterances, 64), spoken, strict=True):
            for utt, audio in zip(chunk, audios, strict=True):
                sink.write(audio.tobytes())
                rows.append(
                    {
                        **dataclasses.asdict(utt),
                        "voice": utt.voice,
                        "offset": offset,
                        "length": len(audio),
                    }
                )
                offset += len(audio)
    samples = np.memmap(tmp_audio, dtype=np.int16, mode="r")
    np.save(out_dir / f"{spec.name}.npy", samples)
    del samples
    tmp_audio.unlink()
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    stamp.write_text(key)
    return manifest


@dataclasses.dataclass(frozen=True)
class Example:
    """One corpus utterance as read back: float32 audio at 16 kHz and its text."""

    audio: np.ndarray
    text: str
    voice: str
    rate: int


class CorpusSplit:
    """A split read back from disk; audio is memory-mapped, not loaded."""

    def __init__(self, directory: Path, name: str) -> None:
        self.name = name
        self.rows = [json.loads(line) for line in (directory / f"{name}.jsonl").open()]
        self._samples = np.load(directory / f"{name}.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Example:
        row = self.rows[index]
        raw = self._samples[row["offset"] : row["offset"] + row["length"]]
        return Example(
            np.asarray(raw, dtype=np.float32) / 32768.0, row["text"], row["voice"], row["rate"]
        )

    def seconds(self) -> float:
        return sum(row["length"] for row in self.rows) / SAMPLE_RATE


def default_specs(train_size: int) -> list[SplitSpec]:
    """The splits the bundled model's recipe uses."""
    return [
        SplitSpec("train", train_size, "train", held_out_rates=False, seed=1),
        SplitSpec("dev", 400, "dev", held_out_rates=False, seed=2),
        SplitSpec("test_voices", 1000, "test", held_out_rates=False, seed=3),
        SplitSpec("test_rates", 500, "test", held_out_rates=True, seed=4),
    ]


def require_espeak() -> None:
    """Fail early with the fix when espeak-ng is missing."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng not found: install it with `apt-get install -y espeak-ng`")


def export_samples(corpus_dir: Path, split: str, count: int, out_dir: Path) -> dict[str, str]:
    """Write `count` utterances of a split as 16-bit WAVs plus `texts.json` (name → text)."""
    data = CorpusSplit(corpus_dir, split)
    out_dir.mkdir(parents=True, exist_ok=True)
    step = max(1, len(data) // count)
    texts = {}
    for n, index in enumerate(range(0, step * count, step)):
        example = data[index]
        words = "-".join(example.text.split()[:3])
        name = f"{n:02d}-{words}.wav"
        sf.write(out_dir / name, example.audio, SAMPLE_RATE, subtype="PCM_16")
        texts[name] = example.text
    (out_dir / "texts.json").write_text(json.dumps(texts, indent=1) + "\n")
    return texts
