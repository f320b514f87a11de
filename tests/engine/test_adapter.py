"""The model adapter on tiny real checkpoints: loading, start-up checks, cached generation."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from service.engine.adapter import ModelAdapter
from service.engine.types import GenerationParams
from service.errors import InvalidRequest, StartupError, Unsupported
from tests.checkpoints import KINDS


def clip(seconds: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, int(seconds * 16_000)).astype(np.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_loads_and_describes_each_kind(checkpoints: dict[str, Path], kind: str) -> None:
    adapter = ModelAdapter(checkpoints[kind], "tiny")
    info = adapter.info
    assert info.sampling_rate == 16_000
    features = kind == "speech2text" or kind.startswith("whisper")
    assert info.input_name == ("input_features" if features else "input_values")
    assert info.padding_invariant == (kind not in ("wav2vec2-groupnorm-bert", "speech2text"))
    assert info.max_input_seconds == (30.0 if kind.startswith("whisper") else None)
    assert adapter.dtype == torch.float32
    (row,) = adapter.transcribe([clip(1.0)], GenerationParams(max_new_tokens=6))
    assert 0 < len(row.tokens) <= 6
    assert len(row.logprobs) == len(row.tokens)
    assert all(lp <= 0 for lp in row.logprobs)
    assert row.text == adapter.tokenizer.decode(row.tokens, skip_special_tokens=True).strip()


@pytest.mark.parametrize(
    "kind", ["wav2vec2-bert", "hubert-gpt2", "speech2text", "whisper", "whisper-en"]
)
def test_encoder_runs_once_and_decoder_uses_the_kv_cache(
    checkpoints: dict[str, Path], kind: str
) -> None:
    adapter = ModelAdapter(checkpoints[kind], "tiny")
    model = adapter.model
    encoder = model.get_encoder()
    own_decoder = kind == "speech2text" or kind.startswith("whisper")
    decoder = model.get_decoder() if own_decoder else model.decoder
    encoder_calls = []
    decoder_lengths = []
    encoder.register_forward_hook(lambda *_: encoder_calls.append(1))

    def record(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        decoder_lengths.append(ids.shape[1])

    decoder.register_forward_pre_hook(record, with_kwargs=True)
    (row,) = adapter.transcribe([clip(1.0)], GenerationParams(max_new_tokens=6))
    assert encoder_calls == [1]
    assert len(decoder_lengths) >= len(row.tokens)
    if kind == "whisper":  # language detection: one step on <|startoftranscript|>; then the
        # prompt <|startoftranscript|><|lang|><|transcribe|><|notimestamps|>
        assert decoder_lengths[:2] == [1, 4]
        decoder_lengths.pop(0)
    elif kind == "whisper-en":  # no language or task: <|startoftranscript|><|notimestamps|>
        assert decoder_lengths[0] == 2
    else:
        assert decoder_lengths[0] == 1  # the start token
    assert set(decoder_lengths[1:]) == {1}  # each later step feeds one token: cached keys/values


def test_beam_search_scores_at_least_greedy(checkpoints: dict[str, Path]) -> None:
    adapter = ModelAdapter(checkpoints["wav2vec2-bert"], "tiny")
    audio = [clip(1.0, seed=3)]
    greedy = adapter.transcribe(audio, GenerationParams(max_new_tokens=6))[0]
    beam = adapter.transcribe(audio, GenerationParams(max_new_tokens=6, num_beams=4))[0]
    assert sum(beam.logprobs) >= sum(greedy.logprobs) - 1e-4


def test_seeded_sampling_is_reproducible(checkpoints: dict[str, Path]) -> None:
    adapter = ModelAdapter(checkpoints["wav2vec2-bert"], "tiny")
    params = GenerationParams(max_new_tokens=6, do_sample=True, temperature=2.0, seed=11)
    first = adapter.transcribe([clip(1.0)], params)[0].tokens
    torch.manual_seed(999)  # the global RNG does not leak into a seeded request
    assert adapter.transcribe([clip(1.0)], params)[0].tokens == first


def test_cannot_translate_without_language_tokens(checkpoints: dict[str, Path]) -> None:
    adapter = ModelAdapter(checkpoints["wav2vec2-bert"], "tiny")
    assert not adapter.info.can_translate
    with pytest.raises(Unsupported, match="cannot translate"):
        adapter.validate(GenerationParams(task="translate"))


def test_max_new_tokens_is_capped_by_the_decoder_positions(checkpoints: dict[str, Path]) -> None:
    adapter = ModelAdapter(checkpoints["wav2vec2-bert"], "tiny")
    kwargs = adapter.generate_kwargs(GenerationParams(max_new_tokens=10_000))
    assert kwargs["max_new_tokens"] == adapter.max_target_length - 2
    assert kwargs["use_cache"] is True


def _broken_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("breakage", "named"),
    [
        ("tokenizer", "tokenizer"),
        ("feature_extractor", "feature extractor"),
        ("decoder_start_token_id", "decoder_start_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("config", "config.json"),
    ],
)
def test_incomplete_checkpoint_fails_at_startup_naming_the_fix(
    checkpoints: dict[str, Path], tmp_path: Path, breakage: str, named: str
) -> None:
    folder = _broken_copy(checkpoints["wav2vec2-bert"], tmp_path / "broken")
    if breakage == "tokenizer":
        for name in (
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.txt",
            "special_tokens_map.json",
        ):
            (folder / name).unlink(missing_ok=True)
    elif breakage == "feature_extractor":
        (folder / "preprocessor_config.json").unlink()
    elif breakage == "config":
        (folder / "config.json").unlink()
    else:
        for name in ("config.json", "generation_config.json"):
            data = json.loads((folder / name).read_text())
            data.pop(breakage, None)
            data.get("decoder", {}).pop(breakage, None)
            (folder / name).write_text(json.dumps(data))
    with pytest.raises(StartupError, match=named) as info:
        ModelAdapter(folder, "broken")
    assert "save" in str(info.value) or "set" in str(info.value) or "point" in str(info.value)


def test_translation_forces_the_target_language_token(checkpoints: dict[str, Path]) -> None:
    """mBART-style decoders: the target language's token is forced as the first output."""
    adapter = ModelAdapter(checkpoints["wav2vec2-bart"], "tiny")
    vocab = adapter.tokenizer.get_vocab()
    codes = {"en_XX": vocab["a"], "fr_XX": vocab["b"]}  # stand-ins for language tokens
    adapter.tokenizer.lang_code_to_id = codes
    assert adapter._language_code("fr") == "fr_XX"
    kwargs = adapter.generate_kwargs(GenerationParams(task="translate", language="fr"))
    assert kwargs["forced_bos_token_id"] == codes["fr_XX"]
    adapter.info = adapter._describe("tiny", adapter.model.config)
    assert adapter.info.can_translate
    adapter.validate(GenerationParams(task="translate", language="fr"))
    with pytest.raises(InvalidRequest, match="unknown language"):
        adapter.validate(GenerationParams(task="translate", language="xx"))
    inputs = adapter.features([clip(1.0)])
    out = adapter.model.generate(**inputs, **{**kwargs, "max_new_tokens": 3})
    assert out.sequences[0, 1].item() == codes["fr_XX"]


def test_a_row_whose_client_left_stops_generating(checkpoints: dict[str, Path]) -> None:
    """The engine passes `wanted`; rows no longer wanted stop at the next decoding step."""
    adapter = ModelAdapter(checkpoints["wav2vec2-bert"], "tiny")
    steps: list[int] = []
    adapter.model.decoder.register_forward_hook(lambda *_: steps.append(1))
    params = GenerationParams(max_new_tokens=8)
    adapter.transcribe([clip(1.0), clip(1.0, seed=1)], params)
    full = len(steps)
    assert full == 8  # the tiny decoders never emit EOS: every row runs to max_new_tokens
    steps.clear()
    alive = [True, True]

    def wanted() -> list[bool]:
        if len(steps) >= 2:
            alive[:] = [False, False]  # both clients disconnect after two steps
        return list(alive)

    adapter.transcribe([clip(1.0), clip(1.0, seed=1)], params, wanted)
    assert len(steps) <= 3
