"""A real transformers 4.x Flax checkpoint, converted to PyTorch at load time (no jax).

`tests/fixtures/flax-w2v2-bert` was written by `FlaxSpeechEncoderDecoderModel.save_pretrained`
(transformers 4.44.2, flax 0.8.5) with `tests/fixtures/make_flax_checkpoint.py`, which also
saved the Flax model's logits on a fixed input: the converted model must give the same.
"""

import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from service.api.app import create_app
from service.engine.adapter import ModelAdapter
from service.engine.types import GenerationParams
from service.errors import StartupError
from tests.conftest import LiveServer, encode, settings_for
from tests.fixtures.make_flax_checkpoint import DECODER_IDS, OUT, reference_input

FIXTURE = OUT


def test_fixture_is_flax_only() -> None:
    names = {p.name for p in FIXTURE.iterdir()}
    assert "flax_model.msgpack" in names
    assert not names & {"model.safetensors", "pytorch_model.bin"}


def test_converted_logits_equal_the_flax_models() -> None:
    adapter = ModelAdapter(FIXTURE, "flax")
    model = adapter.model
    # BERT's LM head is tied to the word embeddings: absent from the file, tied after loading
    head = model.decoder.cls.predictions.decoder.weight
    assert head.data_ptr() == model.decoder.bert.embeddings.word_embeddings.weight.data_ptr()
    inputs = adapter.features([reference_input()])
    with torch.inference_mode():
        logits = model(**inputs, decoder_input_ids=torch.tensor(DECODER_IDS)).logits
    expected = np.load(FIXTURE / "reference_logits.npy")
    assert logits.shape == expected.shape
    assert np.abs(logits.numpy() - expected).max() < 1e-4


def test_service_transcribes_with_it(speech_wav: bytes) -> None:
    adapter = ModelAdapter(FIXTURE, "flax")
    audio = [reference_input()]
    with torch.inference_mode():
        reference = adapter.model.generate(**adapter.features(audio)).tolist()[0]
    row = adapter.transcribe(audio, GenerationParams(max_new_tokens=8))[0]
    special = set(adapter.tokenizer.all_special_ids)
    assert row.tokens == [t for t in reference[1:] if t not in special]
    # the upload rises and falls like speech (steady noise is answered without the model)
    spoken = audio[0] * np.abs(np.sin(np.arange(len(audio[0])) * 8 / 16_000)).astype(np.float32)
    expected = adapter.transcribe([spoken], GenerationParams(max_new_tokens=8))[0]
    settings = settings_for(FIXTURE, cpu_workers=1, cpu_threads=1)
    with LiveServer(create_app(settings)) as server:
        response = httpx.post(
            server.url + "/v1/audio/transcriptions",
            files={"file": ("a.wav", encode(spoken, 16_000, "WAV", "FLOAT"))},
            data={"response_format": "verbose_json"},
            timeout=60,
        )
    assert response.status_code == 200, response.text
    assert [t for s in response.json()["segments"] for t in s["tokens"]] == expected.tokens


def test_a_damaged_flax_file_is_a_start_up_error(tmp_path: Path) -> None:
    folder = tmp_path / "damaged"
    shutil.copytree(FIXTURE, folder)
    data = (folder / "flax_model.msgpack").read_bytes()
    (folder / "flax_model.msgpack").write_bytes(data[: len(data) // 2])
    with pytest.raises(StartupError, match=r"cannot read .*flax_model\.msgpack"):
        ModelAdapter(folder, "flax")
