"""Streamed final vs upload of the same utterance, through a real server; and what the service
path makes of clips without speech.

    python -m bench.stream_agreement --model model_store/w2v2-bert-commands-en \
        --corpus data/corpus2 --count 100 --json agreement.json

For each of `count` utterances (half from `test_espeak`, unseen espeak-ng variants at 100-240
wpm, half from `test_flite`, a synthesizer never trained on; both from `python -m model_store
synthesize2`), the clip with `--quiet` seconds of digital silence each side is sent once to
`POST /v1/audio/transcriptions` (WAV) and once over `WS /v1/audio/stream` (100 ms frames as
fast as the socket takes them, then `end`); the stream's finals, joined, are compared with the
upload's text after the model card's normalization. Then every clip of `test_nonspeech` goes
both ways too: the words they produce are counted (the service's VAD gate included).

Not a timing benchmark: it measures agreement, so it may run on a loaded machine.
"""

import argparse
import asyncio
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
from websockets.asyncio.client import connect

from bench import common
from bench.serverproc import running_server
from model_store.corpus import CorpusSplit
from model_store.evaluate import normalize

RATE = 16_000


@dataclass
class Agreement:
    """The measurement's result."""

    utterances: int
    equal: int
    equal_share: float
    upload_correct: int
    stream_correct: int
    nonspeech_clips: int
    nonspeech_upload_words: int
    nonspeech_stream_words: int
    disagreements: list[dict[str, str]]


def upload(url: str, clip: np.ndarray) -> str:
    response = httpx.post(
        url + "/v1/audio/transcriptions",
        files={"file": ("a.wav", common.wav_bytes(clip, RATE))},
        timeout=120,
    )
    response.raise_for_status()
    return str(response.json()["text"])


async def stream(url: str, clip: np.ndarray) -> str:
    """The finals of one session that streams `clip`, joined with spaces."""
    ws_url = url.replace("http://", "ws://") + f"/v1/audio/stream?sample_rate={RATE}"
    pcm = (np.clip(clip, -1, 1) * 32767).astype("<i2").tobytes()
    finals: list[str] = []
    async with connect(ws_url, max_size=None) as ws:
        step = RATE // 10 * 2
        for at in range(0, len(pcm), step):
            await ws.send(pcm[at : at + step])
        await ws.send(json.dumps({"type": "end"}))
        async for message in ws:
            event = json.loads(message)
            if event["type"] == "transcript.final":
                finals.append(event["text"])
            elif event["type"] == "error":
                raise RuntimeError(event)
    return " ".join(t for t in finals if t.strip())


def clips(corpus: Path, count: int, quiet: float) -> list[tuple[np.ndarray, str]]:
    pad = np.zeros(int(quiet * RATE), np.float32)
    out = []
    for split in ("test_espeak", "test_flite"):
        data = CorpusSplit(corpus, split)
        for i in range(min(count // 2, len(data))):
            ex = data[i]
            out.append((np.concatenate([pad, ex.audio, pad]), ex.text))
    return out


def measure(url: str, corpus: Path, count: int, quiet: float) -> Agreement:
    equal = upload_ok = stream_ok = 0
    disagreements = []
    items = clips(corpus, count, quiet)
    for clip, text in items:
        up, st = normalize(upload(url, clip)), normalize(asyncio.run(stream(url, clip)))
        equal += up == st
        upload_ok += up == normalize(text)
        stream_ok += st == normalize(text)
        if up != st:
            disagreements.append({"reference": text, "upload": up, "stream": st})
    nonspeech = CorpusSplit(corpus, "test_nonspeech")
    up_words = st_words = 0
    for i in range(len(nonspeech)):
        clip = nonspeech[i].audio
        up_words += len(normalize(upload(url, clip)).split())
        st_words += len(normalize(asyncio.run(stream(url, clip))).split())
    return Agreement(
        utterances=len(items),
        equal=equal,
        equal_share=round(equal / max(len(items), 1), 4),
        upload_correct=upload_ok,
        stream_correct=stream_ok,
        nonspeech_clips=len(nonspeech),
        nonspeech_upload_words=up_words,
        nonspeech_stream_words=st_words,
        disagreements=disagreements,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("model_store/w2v2-bert-commands-en"))
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus2"))
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--quiet", type=float, default=1.0, help="seconds of silence each side")
    parser.add_argument("--url", help="measure a running server instead of starting one")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.url:
        result = measure(args.url, args.corpus, args.count, args.quiet)
    else:
        with running_server(args.model) as server:
            result = measure(server.url, args.corpus, args.count, args.quiet)
    summary = {k: v for k, v in asdict(result).items() if k != "disagreements"}
    print(json.dumps(summary, indent=1))
    for d in result.disagreements[:10]:
        print(f"  ref={d['reference']!r} upload={d['upload']!r} stream={d['stream']!r}")
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=1) + "\n")


if __name__ == "__main__":
    main()
