"""The tiny checkpoints of `tests.checkpoints` load back offline with the Auto classes and
generate without extra arguments."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModelForSpeechSeq2Seq,
    AutoTokenizer,
    SpeechEncoderDecoderModel,
)

from tests.checkpoints import (
    KINDS,
    MAX_NEW_TOKENS,
    WHISPER_KINDS,
    WHISPER_MAX_NEW_TOKENS,
    build_checkpoint,
)

SAMPLING_RATE = 16_000
# Kinds whose encoder takes an attention mask and ignores padding exactly (Speech2Text's strided
# conv front end lets padding leak into the last real frame; group norm takes no mask at all).
# Whisper pads every input to 30 s anyway.
PADDING_INVARIANT = ("wav2vec2-bert", "hubert-gpt2", "wav2vec2-bart", *WHISPER_KINDS)


def load(path: Path) -> tuple[Any, Any, Any]:
    """Model, feature extractor and tokenizer, the way the service loads a folder."""
    config = AutoConfig.from_pretrained(path)
    if config.model_type == "speech-encoder-decoder":
        model = SpeechEncoderDecoderModel.from_pretrained(path)
    else:
        model = AutoModelForSpeechSeq2Seq.from_pretrained(path)
    model.eval()
    return model, AutoFeatureExtractor.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def clips(*seconds: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(int(s * SAMPLING_RATE))).astype(np.float32) for s in seconds]


def features(feature_extractor: Any, audio: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Padded to the longest input, except Whisper's: its extractor pads to 30 s itself."""
    whisper = type(feature_extractor).__name__ == "WhisperFeatureExtractor"
    padding = {} if whisper else {"padding": True}
    batch = feature_extractor(audio, sampling_rate=SAMPLING_RATE, return_tensors="pt", **padding)
    name = feature_extractor.model_input_names[0]
    inputs = {name: batch[name]}
    if "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs


def generate(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sequences with their decoder prompt (Whisper's plain output drops it)."""
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, return_dict_in_generate=True)
    return out.sequences


def generate_defaults(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(**inputs, return_dict_in_generate=True).sequences


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny: with several intra-op threads on a busy machine, generate()
    spends seconds waiting on thread hand-offs instead of milliseconds computing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=KINDS)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    kind = request.param
    return build_checkpoint(kind, tmp_path_factory.mktemp(kind))


def test_folder_holds_everything(checkpoint: Path) -> None:
    names = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "generation_config.json", "preprocessor_config.json"} <= names
    assert "model.safetensors" in names
    assert "tokenizer_config.json" in names


def test_token_ids_agree(checkpoint: Path) -> None:
    model, _, tokenizer = load(checkpoint)
    generation = model.generation_config
    for name in ("decoder_start_token_id", "pad_token_id", "eos_token_id"):
        assert getattr(generation, name) is not None, name
        assert getattr(model.config, name) == getattr(generation, name), name
    assert generation.pad_token_id == tokenizer.pad_token_id
    assert generation.eos_token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id)
    start = generation.decoder_start_token_id
    if kind_of(checkpoint) in WHISPER_KINDS:
        assert start == tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
        assert generation.max_new_tokens == WHISPER_MAX_NEW_TOKENS
    else:
        assert start in (tokenizer.cls_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
        assert generation.max_new_tokens == MAX_NEW_TOKENS
    assert model.get_output_embeddings().out_features == len(tokenizer)


def test_loads_and_generates(checkpoint: Path) -> None:
    model, feature_extractor, tokenizer = load(checkpoint)
    out = generate(model, features(feature_extractor, clips(1.0, 0.6)))

    assert out.dim() == 2
    assert out.dtype == torch.long
    assert out.shape[0] == 2
    assert (out[:, 0] == model.generation_config.decoder_start_token_id).all()
    # The EOS logit is suppressed: the random decoder writes real tokens up to the limit.
    assert out.shape[1] == prompt_length(checkpoint) + MAX_NEW_TOKENS
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    assert len(texts) == 2
    assert all(isinstance(text, str) and text.strip() for text in texts)


def test_generates_from_config_alone(checkpoint: Path) -> None:
    """No generate() arguments at all: max_new_tokens and the ids come from the folder."""
    model, feature_extractor, _ = load(checkpoint)
    out = generate_defaults(model, features(feature_extractor, clips(1.0)))
    limit = WHISPER_MAX_NEW_TOKENS if kind_of(checkpoint) in WHISPER_KINDS else MAX_NEW_TOKENS
    assert out.shape == (1, prompt_length(checkpoint) + limit)


def test_attention_mask_matches_the_kind(checkpoint: Path) -> None:
    _, feature_extractor, _ = load(checkpoint)
    inputs = features(feature_extractor, clips(1.0, 0.5))
    masked = "groupnorm" not in checkpoint.name and kind_of(checkpoint) not in WHISPER_KINDS
    assert ("attention_mask" in inputs) == masked


def prompt_length(checkpoint: Path) -> int:
    """The decoder prompt `generate` returns with the output: the start token; Whisper's
    <|startoftranscript|><|lang|><|notimestamps|> with no task given (the language detected),
    <|startoftranscript|><|notimestamps|> English-only."""
    return {"whisper": 3, "whisper-en": 2}.get(kind_of(checkpoint), 1)


def kind_of(checkpoint: Path) -> str:
    """The kind a fixture folder was built as (`tmp_path_factory.mktemp` numbers the names)."""
    return checkpoint.name.rstrip("0123456789")


@pytest.mark.parametrize("kind", WHISPER_KINDS)
def test_whisper_tokenizer_is_the_real_one(kind: str, tmp_path: Path) -> None:
    """OpenAI's vocabulary and special-token layout: ids as in openai/whisper-* checkpoints."""
    tokenizer = AutoTokenizer.from_pretrained(build_checkpoint(kind, tmp_path / kind))
    ids = tokenizer.convert_tokens_to_ids
    if kind == "whisper":  # large-v3 layout: 100 languages
        assert len(tokenizer) == 51_866
        assert ids(["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|yue|>"]) == [
            50257, 50258, 50259, 50358,
        ]  # fmt: skip
        assert ids(["<|translate|>", "<|transcribe|>", "<|notimestamps|>"]) == [
            50359, 50360, 50364,
        ]  # fmt: skip
        assert tokenizer.encode("Hello world", add_special_tokens=False) == [15947, 1002]
    else:  # the .en models: GPT-2's 50,256 tokens, then the specials with 99 languages
        assert len(tokenizer) == 51_864
        assert ids(["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"]) == [
            50256, 50257, 50362,
        ]  # fmt: skip
        assert tokenizer.encode("Hello world", add_special_tokens=False) == [15496, 995]
    assert ids("<|0.00|>") == ids("<|notimestamps|>") + 1
    assert ids("<|30.00|>") == len(tokenizer) - 1
    text = "Grüße, naïve café — 東京 🙂"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("kind", PADDING_INVARIANT)
def test_padded_batch_matches_single_requests(kind: str, tmp_path: Path) -> None:
    model, feature_extractor, _ = load(build_checkpoint(kind, tmp_path))
    audio = clips(1.0, 0.45, seed=1)
    batch = generate(model, features(feature_extractor, audio))
    for row, clip in zip(batch, audio, strict=True):
        assert torch.equal(row, generate(model, features(feature_extractor, [clip]))[0])


@pytest.mark.parametrize("kind", KINDS)
def test_build_is_deterministic(kind: str, tmp_path: Path) -> None:
    first = build_checkpoint(kind, tmp_path / "a") / "model.safetensors"
    again = build_checkpoint(kind, tmp_path / "b") / "model.safetensors"
    other = build_checkpoint(kind, tmp_path / "c", seed=1) / "model.safetensors"
    assert first.read_bytes() == again.read_bytes()
    assert first.read_bytes() != other.read_bytes()


def test_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown checkpoint kind"):
        build_checkpoint("whisper-large", tmp_path)
