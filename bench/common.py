"""Pieces every script shares: speech to send, percentiles, WAV bodies, the argument parser's
common options, the pass/fail lines and the JSON report."""

import argparse
import io
import json
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import soundfile as sf

from service.settings import DEFAULT_MODEL_DIR

SPEECH_RATE = 22_050  # espeak-ng's native rate


def speak(text: str, rate: int = 160, voice: str = "en-us") -> npt.NDArray[np.float32]:
    """espeak-ng speech as float32 at its native 22.05 kHz (`SPEECH_RATE`)."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is required: apt-get install -y espeak-ng")
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(rate), "--stdout", text],
        check=True,
        capture_output=True,
    ).stdout
    # espeak-ng's streamed header has no length; the PCM follows the 44-byte header.
    return np.frombuffer(wav[44:], dtype="<i2").astype(np.float32) / np.float32(32768.0)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, NaN for no values (a table cell, not an error)."""
    return float(np.percentile(values, q)) if len(values) else float("nan")


def wav_bytes(audio: npt.NDArray[Any], rate: int) -> bytes:
    """A 16-bit PCM WAV file of `audio` (float in [-1, 1] or int16)."""
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A script's parser with the options they all take: `--model`, `--seed`, `--json`."""
    made = argparse.ArgumentParser(
        prog=f"python -m {prog}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    made.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="checkpoint folder")
    made.add_argument("--seed", type=int, default=0)
    made.add_argument("--json", type=Path, help="also write the figures here")
    return made


def write_json(path: Path | None, body: object) -> None:
    if path is not None:
        path.write_text(json.dumps(body, indent=1))


class Check(Protocol):
    name: str
    ok: bool
    detail: str


def print_verdict(checks: Iterable[Check], passed: bool) -> None:
    """One `[ok]`/`[FAIL]` line per check, then PASS or FAIL."""
    for check in checks:
        print(f"[{'ok' if check.ok else 'FAIL'}] {check.name}: {check.detail}")
    print("\nPASS" if passed else "\nFAIL")
