"""The second-edition corpus: the domain spoken by several synthesizers, under recording conditions.

Training speech comes from espeak-ng (every English accent, the training third of its voice
variants, 80-260 wpm) and Festival (its three English voices, kal and ked diphones and the slt HTS
voice, each with random speaking rate and pitch, and for HTS a random frequency warp), then
`model_store.augment` puts each clip through a random chain of speaker, room, noise, channel and
level changes. About 5% of training clips contain no speech at all (silence, noise, hum, far
babble) and are labelled with the empty text, so the model learns to say nothing.

`flite` is reserved for evaluation: it is never used in a training or dev split. Its `awb` and
`rms` voices are speakers no training synthesizer has; its `kal16` and `slt` share speakers with
Festival's kal and slt (different synthesis engines), so they are scored apart.

Splits use the storage of `model_store.corpus` (int16 `.npy` + JSON-lines manifest, cached by a
key of the split's parameters) so `CorpusSplit` and the trainer read them unchanged.
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
from tqdm import tqdm

from model_store import augment
from model_store.corpus import ACCENTS, espeak_variants, variant_groups
from model_store.domain import sentence

SAMPLE_RATE = 16_000
FESTIVAL_VOICES = {
    "kal": "voice_kal_diphone",
    "ked": "voice_ked_diphone",
    "slt": "voice_cmu_us_slt_arctic_hts",
}
FLITE_VOICES = ("awb", "rms", "kal16", "slt")
TRAIN_WPM = (80, 260)
TEST_WPM = (100, 240)
CHUNK = 48


@dataclasses.dataclass(frozen=True)
class Item:
    """One clip to make: who speaks what, how, and what happens to it afterwards.

    `synth` is espeak, festival, flite or none (no speech: a silence or noise clip, empty text).
    `rate` is espeak's words per minute (0 for the others); `params` the synthesizer's prosody
    settings; `condition` is `augment` (the random chain), `light` (50-300 ms of silence each
    side, a faint noise floor) or `padded` (0-2 s of silence or a noise floor each side).
    """

    synth: str
    voice: str
    text: str
    rate: int
    params: tuple[tuple[str, float], ...]
    condition: str
    seed: int


@dataclasses.dataclass(frozen=True)
class Mix:
    """A split's recipe: counts per source, a condition, a seed."""

    name: str
    espeak: int = 0
    festival: int = 0
    flite: int = 0
    empty: int = 0
    espeak_group: str = "train"
    wpm: tuple[int, int] = TRAIN_WPM
    condition: str = "augment"
    seed: int = 0


def stage2_mixes(train_size: int) -> list[Mix]:
    """The splits of the second-edition recipe (train and dev) and its evaluation sets."""
    empty = train_size // 20
    speech = train_size - empty
    return [
        Mix("train", espeak=speech // 2, festival=speech - speech // 2, empty=empty, seed=11),
        Mix("dev", espeak=150, festival=150, empty=20, espeak_group="dev", seed=12),
        Mix("test_flite", flite=400, condition="light", seed=13),
        Mix("dev_flite", flite=80, condition="light", seed=14),
        Mix(
            "test_espeak", espeak=400, espeak_group="test", wpm=TEST_WPM, condition="light", seed=15
        ),
        Mix(
            "test_padded",
            espeak=100,
            flite=100,
            espeak_group="test",
            wpm=TEST_WPM,
            condition="padded",
            seed=16,
        ),
        Mix("test_nonspeech", empty=60, condition="light", seed=17),
    ]


def _festival_params(rng: random.Random, voice: str) -> tuple[tuple[str, float], ...]:
    if voice == "slt":
        return (
            ("speed", round(rng.uniform(0.75, 1.35), 3)),  # hts_engine -r (> 1: faster)
            ("semitones", round(rng.uniform(-7, 5), 2)),  # hts_engine -fm
            ("alpha", round(rng.uniform(0.38, 0.50), 3)),  # hts_engine -a: frequency warp
        )
    return (
        ("stretch", round(rng.uniform(0.7, 1.45), 3)),  # Duration_Stretch (> 1: slower)
        ("f0_mean", round(rng.uniform(70, 200), 1)),
        ("f0_std", round(rng.uniform(4, 40), 1)),
    )


def plan(mix: Mix, variants: list[str]) -> list[Item]:
    """The items of a split, drawn deterministically from its seed and shuffled."""
    rng = random.Random(mix.seed)
    pool = variant_groups(variants)[mix.espeak_group]
    items: list[Item] = []
    for _ in range(mix.espeak):
        items.append(
            Item(
                "espeak",
                f"{rng.choice(ACCENTS)}+{rng.choice(pool)}",
                sentence(rng),
                rng.randint(*mix.wpm),
                (("pitch", rng.randint(0, 99)), ("gap", rng.randint(0, 6))),
                mix.condition,
                0,
            )
        )
    for _ in range(mix.festival):
        voice = rng.choice(sorted(FESTIVAL_VOICES))
        items.append(
            Item(
                "festival", voice, sentence(rng), 0, _festival_params(rng, voice), mix.condition, 0
            )
        )
    for _ in range(mix.flite):
        voice = FLITE_VOICES[len(items) % len(FLITE_VOICES)]
        items.append(
            Item(
                "flite",
                voice,
                sentence(rng),
                0,
                (("stretch", round(rng.uniform(0.85, 1.2), 3)),),
                mix.condition,
                0,
            )
        )
    for _ in range(mix.empty):
        items.append(
            Item(
                "none",
                "none",
                "",
                0,
                (("seconds", round(rng.uniform(0.3, 4), 2)),),
                mix.condition,
                0,
            )
        )
    rng.shuffle(items)
    return [dataclasses.replace(it, seed=mix.seed * 1_000_003 + i) for i, it in enumerate(items)]


def _read16k(path: Path) -> augment.Audio:
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    mono = audio.mean(axis=1)
    return np.ascontiguousarray(soxr.resample(mono, rate, SAMPLE_RATE), dtype=np.float32)


def _espeak(item: Item, path: Path) -> None:
    p = dict(item.params)
    subprocess.run(
        [
            "espeak-ng",
            "-v",
            item.voice,
            "-s",
            str(item.rate),
            "-p",
            str(int(p["pitch"])),
            "-g",
            str(int(p["gap"])),
            "-w",
            str(path),
            item.text,
        ],
        check=True,
        capture_output=True,
    )


def _flite(item: Item, path: Path) -> None:
    p = dict(item.params)
    subprocess.run(
        [
            "flite",
            "-voice",
            item.voice,
            "--setf",
            f"duration_stretch={p['stretch']}",
            "-t",
            item.text,
            "-o",
            str(path),
        ],
        check=True,
        capture_output=True,
    )


def _festival_script(items: list[tuple[Item, Path]]) -> str:
    """One Scheme program speaking every item (one Festival start-up per chunk, not per clip)."""
    lines = []
    for item, path in items:
        p = dict(item.params)
        lines.append(f"({FESTIVAL_VOICES[item.voice]})")
        if item.voice == "slt":
            lines.append(
                "(set! hts_engine_params (append cmu_us_slt_arctic_hts::hts_engine_params "
                f'(list (list "-r" {p["speed"]}) (list "-fm" {p["semitones"]}) '
                f'(list "-a" {p["alpha"]}))))'
            )
        else:
            lines.append(f"(Parameter.set 'Duration_Stretch {p['stretch']})")
            lines.append(
                f"(set! int_lr_params '((target_f0_mean {p['f0_mean']}) (target_f0_std "
                f"{p['f0_std']}) (model_f0_mean 170) (model_f0_std 34)))"
            )
        lines.append(f'(set! u (Utterance Text "{item.text}"))')
        lines.append("(utt.synth u)")
        lines.append(f'(utt.save.wave u "{path}" \'riff)')
    return "\n".join(lines) + "\n"


def _festival(items: list[tuple[Item, Path]], workdir: Path) -> None:
    script = workdir / "speak.scm"
    script.write_text(_festival_script(items))
    subprocess.run(["festival", "-b", str(script)], check=True, capture_output=True, timeout=600)


def _finish(item: Item, audio: augment.Audio, others: list[augment.Audio]) -> augment.Audio:
    """Apply the item's condition to its clean 16 kHz speech."""
    rng = np.random.default_rng(item.seed)
    if item.synth == "none":
        return augment.noise_only(rng, dict(item.params)["seconds"], others)
    peak = float(np.abs(audio).max()) or 1.0
    audio = (audio / peak).astype(np.float32)
    if item.condition == "augment":
        return augment.augment(audio, rng, others)[0]
    if item.condition == "padded":
        lead, tail = rng.uniform(0, 2, size=2)
    else:
        lead, tail = rng.uniform(0.05, 0.3, size=2)
    zeros = [np.zeros(int(s * SAMPLE_RATE), np.float32) for s in (lead, tail)]
    out = augment.pad(audio, *zeros)
    out = augment.add_noise(
        out,
        augment.coloured_noise(rng, len(out), "white"),
        float(rng.uniform(30, 50)),
        augment.rms(audio),
    )
    return augment.level(out, float(rng.uniform(0.2, 0.9)))


def render_chunk(chunk: list[Item]) -> list[np.ndarray]:
    """Speak and condition a chunk of items; int16 arrays at 16 kHz in the chunk's order."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = [work / f"{i}.wav" for i in range(len(chunk))]
        festival = [(it, p) for it, p in zip(chunk, paths, strict=True) if it.synth == "festival"]
        if festival:
            _festival(festival, work)
        clean: list[augment.Audio | None] = []
        for item, path in zip(chunk, paths, strict=True):
            if item.synth == "espeak":
                _espeak(item, path)
            elif item.synth == "flite":
                _flite(item, path)
            clean.append(_read16k(path) if item.synth != "none" else None)
        others = [c for c in clean if c is not None]
        out = []
        for item, audio in zip(chunk, clean, strict=True):
            others_for = [o for o in others if o is not audio]
            done = _finish(
                item, audio if audio is not None else np.zeros(0, np.float32), others_for
            )
            out.append(np.clip(done * 32767, -32768, 32767).astype(np.int16))
        return out


def _chunks(items: list[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def synthesize(mix: Mix, out_dir: Path, workers: int = 2) -> Path:
    """Write one split (cached by its parameters and the code's inputs). Returns its manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = espeak_variants()
    key = hashlib.sha256(
        json.dumps([dataclasses.asdict(mix), variants, "multisynth-v2"]).encode()
    ).hexdigest()
    manifest = out_dir / f"{mix.name}.jsonl"
    stamp = out_dir / f"{mix.name}.key"
    if manifest.exists() and stamp.exists() and stamp.read_text() == key:
        return manifest
    items = plan(mix, variants)
    tmp_audio = out_dir / f"{mix.name}.tmp.bin"
    rows = []
    offset = 0
    chunks = list(_chunks(items, CHUNK))
    with (
        tmp_audio.open("wb") as sink,
        multiprocessing.Pool(workers) as pool,
        tqdm(total=len(items), desc=mix.name, dynamic_ncols=True, mininterval=5) as bar,
    ):
        for chunk, audios in zip(chunks, pool.imap(render_chunk, chunks), strict=True):
            for item, audio in zip(chunk, audios, strict=True):
                sink.write(audio.tobytes())
                rows.append({**dataclasses.asdict(item), "offset": offset, "length": len(audio)})
                offset += len(audio)
            bar.update(len(chunk))
    samples = np.memmap(tmp_audio, dtype=np.int16, mode="r")
    np.save(out_dir / f"{mix.name}.npy", samples)
    del samples
    tmp_audio.unlink()
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    stamp.write_text(key)
    return manifest


def require_synthesizers(flite: bool = True) -> None:
    """Fail early with the fix when a synthesizer is missing."""
    missing = [
        n
        for n in ("espeak-ng", "festival", *(["flite"] if flite else []))
        if shutil.which(n) is None
    ]
    if missing:
        raise SystemExit(
            f"missing {missing}: apt-get install -y espeak-ng festival festvox-kallpc16k "
            "festvox-kdlpc16k festvox-us-slt-hts flite"
        )
