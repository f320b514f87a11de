"""The seed's translation checkpoint shape: wav2vec2 (layer norm, attention mask) + an
mBART-50-style decoder with a multilingual tokenizer; the target language's token is forced."""

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import soundfile as sf

from service.api.app import create_app
from tests.api.test_reference import RATE, Reference, clip
from tests.conftest import LiveServer, encode, settings_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(checkpoints: dict[str, Path]) -> Iterator[tuple[LiveServer, Reference]]:
    folder = checkpoints["wav2vec2-mbart50"]
    with LiveServer(create_app(settings_for(folder, cpu_workers=1, cpu_threads=1))) as server:
        yield server, Reference(folder)


@pytest.fixture(scope="module")
def wav() -> bytes:
    return encode(clip("turn on the lights", 0), RATE, "WAV", "PCM_16")


def translate(server: LiveServer, wav: bytes, **fields: str) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/audio/translations",
        files={"file": ("a.wav", wav)},
        data={"response_format": "verbose_json", **fields},
        timeout=60,
    )


def test_the_target_language_token_is_forced(served, wav: bytes) -> None:
    server, reference = served
    codes = reference.tokenizer.lang_code_to_id
    assert min(codes.values()) > max(  # language ids come after every piece: no overlap
        i for t, i in reference.tokenizer.get_vocab().items() if t not in codes and t != "<mask>"
    )
    german = translate(server, wav, language="de").json()
    _, tokens = reference.generate(wav, forced_bos_token_id=codes["de_DE"])
    audio, _ = sf.read(io.BytesIO(wav), dtype="float32")
    feats = reference.extractor([audio], sampling_rate=RATE, return_tensors="pt")
    full = reference.model.generate(**feats, forced_bos_token_id=codes["de_DE"], max_new_tokens=2)
    assert full[0, 1].item() == codes["de_DE"]  # German's token right after </s>
    assert [t for s in german["segments"] for t in s["tokens"]] == tokens
    assert german["language"] == "de"
    _, french = reference.generate(wav, forced_bos_token_id=codes["fr_XX"])
    assert french != tokens  # the target changes the output: the forced token matters
    english = translate(server, wav).json()  # no language: English, as OpenAI translates
    _, tokens_en = reference.generate(wav, forced_bos_token_id=codes["en_XX"])
    assert [t for s in english["segments"] for t in s["tokens"]] == tokens_en
    assert english["language"] == "en"


def test_an_unknown_target_lists_the_known_ones(served, wav: bytes) -> None:
    server, _ = served
    response = translate(server, wav, language="ab")  # a real ISO 639-1 code it lacks
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "language"
    assert "'ab'" in error["message"]
    assert "de, en, es" in error["message"]


def test_the_openai_client_translates(served, wav: bytes) -> None:
    server, reference = served
    client = openai.OpenAI(api_key="unused", base_url=server.url + "/v1", max_retries=0)
    result = client.audio.translations.create(model="tiny", file=("a.wav", wav))
    codes = reference.tokenizer.lang_code_to_id
    _, tokens = reference.generate(wav, forced_bos_token_id=codes["en_XX"])
    assert result.text == reference.tokenizer.decode(tokens, skip_special_tokens=True).strip()
