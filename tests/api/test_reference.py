"""Every test checkpoint kind through a real server equals plain `model.generate`.

The oracle is transformers itself: the folder loaded with the Auto classes, its own feature
extractor and `generate` with the checkpoint's generation config, on the audio the upload holds.
The service's tokens (verbose_json segment tokens, through the official OpenAI client) and its
text must be exactly those. The clips are 2.0 s long, a rung of the length-bucket ladder, so the
service's padding for padding-sensitive kinds (group-norm wav2vec2, Speech2Text) adds nothing and
the reference is generate on the clip as uploaded.
"""

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import soundfile as sf
import soxr
import torch
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModelForSpeechSeq2Seq,
    AutoTokenizer,
    SpeechEncoderDecoderModel,
)

from service.api.app import create_app
from service.engine.buckets import bucket_samples
from tests.checkpoints import KINDS
from tests.conftest import LiveServer, encode, settings_for, speak

pytestmark = pytest.mark.slow
RATE = 16_000
SECONDS = 2.0
# kinds whose random decoder writes different tokens for the two clips (the others' output
# barely depends on the audio; their check is still token for token against generate)
FOLLOW_THE_AUDIO = (
    "wav2vec2-bert",
    "hubert-gpt2",
    "wav2vec2-groupnorm-bert",
    "whisper",
    "whisper-en",
)


def clip(text: str, seed: int) -> np.ndarray:
    """Speech padded with faint noise to exactly SECONDS (a bucket rung: no service padding)."""
    voice = soxr.resample(speak(text), 22_050, RATE).astype(np.float32)[: int(SECONDS * RATE)]
    noise = np.random.default_rng(seed).normal(0, 0.01, int(SECONDS * RATE)).astype(np.float32)
    noise[: len(voice)] += voice
    assert bucket_samples(len(noise), RATE) == len(noise)
    return noise


@pytest.fixture(scope="module")
def uploads() -> list[bytes]:
    return [
        encode(clip("turn on the lights", 0), RATE, "WAV", "PCM_16"),
        encode(clip("three four five", 1), RATE, "WAV", "PCM_16"),
    ]


class Reference:
    """The checkpoint as transformers loads it, with nothing of the service."""

    def __init__(self, folder: Path) -> None:
        config = AutoConfig.from_pretrained(folder)
        cls: Any = (
            SpeechEncoderDecoderModel
            if config.model_type == "speech-encoder-decoder"
            else AutoModelForSpeechSeq2Seq
        )
        self.model = cls.from_pretrained(folder).eval()
        self.extractor = AutoFeatureExtractor.from_pretrained(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.whisper = config.model_type == "whisper"

    def generate(self, wav: bytes, **kwargs: Any) -> tuple[list[int], list[int]]:
        """(decoder prompt, text tokens) of `generate` on the WAV's samples."""
        audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
        assert rate == RATE
        padding = {} if self.whisper else {"padding": True}  # Whisper pads to 30 s itself
        feats = self.extractor([audio], sampling_rate=RATE, return_tensors="pt", **padding)
        name = self.extractor.model_input_names[0]
        inputs = {name: feats[name]}
        if "attention_mask" in feats:
            inputs["attention_mask"] = feats["attention_mask"]
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, return_dict_in_generate=True, output_scores=True, **kwargs
            )
        sequence = out.sequences[0].tolist()
        steps = len(out.scores)
        prompt, generated = sequence[: len(sequence) - steps], sequence[len(sequence) - steps :]
        eos = self.model.generation_config.eos_token_id
        special = set(self.tokenizer.all_special_ids)
        first_special = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        tokens = []
        for token in generated:
            if token == eos:
                break
            if token in special or (self.whisper and token >= first_special):
                continue  # Whisper: specials and timestamps are not text
            tokens.append(token)
        return prompt, tokens


@pytest.fixture(scope="module", params=KINDS)
def served(
    request: pytest.FixtureRequest, checkpoints: dict[str, Path]
) -> Iterator[tuple[str, LiveServer, Reference]]:
    kind = request.param
    settings = settings_for(checkpoints[kind], cpu_workers=1, cpu_threads=1)
    with LiveServer(create_app(settings)) as server:
        yield kind, server, Reference(checkpoints[kind])


def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(api_key="unused", base_url=server.url + "/v1", max_retries=0)


def test_upload_tokens_equal_generate(
    served: tuple[str, LiveServer, Reference], uploads: list[bytes]
) -> None:
    kind, server, reference = served
    outputs = []
    for wav in uploads:
        result = client(server).audio.transcriptions.create(
            model="tiny", file=("a.wav", wav), response_format="verbose_json"
        )
        # a multilingual Whisper request always names its task (<|transcribe|>)
        task = {"task": "transcribe"} if kind == "whisper" else {}
        prompt, tokens = reference.generate(wav, **task)
        assert tokens, f"{kind}: the reference generated no text tokens"
        assert result.segments is not None
        assert [t for s in result.segments for t in s.tokens] == tokens, kind
        outputs.append(tokens)
        expected = reference.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        assert result.text == expected
        if kind == "whisper":  # the language generate detected is the one reported
            detected = reference.tokenizer.convert_ids_to_tokens(prompt[1])
            assert result.language == detected.strip("<|>")
        elif kind == "whisper-en":
            assert result.language == "en"
    if kind in FOLLOW_THE_AUDIO:  # the oracle is not vacuous: different audio, other tokens
        assert outputs[0] != outputs[1], kind
