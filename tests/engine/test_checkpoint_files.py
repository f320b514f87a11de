"""Checkpoints held the ways users hold them: `pytorch_model.bin`, sharded safetensors, a hub id
in the local Hugging Face cache (no network); each absent one is a clear start-up error."""

import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from service.engine import checkpoint
from service.engine.adapter import ModelAdapter
from service.engine.types import GenerationParams
from service.errors import StartupError
from tests.conftest import ServiceProcess

PARAMS = GenerationParams(max_new_tokens=8)


def audio(seed: int = 0) -> list[np.ndarray]:
    return [np.random.default_rng(seed).normal(0, 0.1, 16_000).astype(np.float32)]


def copy_without_weights(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    return folder


@pytest.fixture(scope="module")
def expected(checkpoints: dict[str, Path]) -> list[int]:
    return ModelAdapter(checkpoints["wav2vec2-bert"], "tiny").transcribe(audio(), PARAMS)[0].tokens


def test_pytorch_model_bin(checkpoints: dict[str, Path], tmp_path: Path, expected: list[int]):
    source = checkpoints["wav2vec2-bert"]
    folder = copy_without_weights(source, tmp_path / "bin")
    torch.save(load_file(source / "model.safetensors"), folder / "pytorch_model.bin")
    adapter = ModelAdapter(folder, "tiny")
    assert adapter.transcribe(audio(), PARAMS)[0].tokens == expected


def test_sharded_safetensors(checkpoints: dict[str, Path], tmp_path: Path, expected: list[int]):
    source = checkpoints["wav2vec2-bert"]
    folder = copy_without_weights(source, tmp_path / "sharded")
    ModelAdapter(source, "tiny").model.save_pretrained(folder, max_shard_size="100KB")
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    assert (folder / "model.safetensors.index.json").is_file()
    assert not (folder / "model.safetensors").exists()
    assert ModelAdapter(folder, "tiny").transcribe(audio(), PARAMS)[0].tokens == expected


def test_no_weights_is_a_start_up_error(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_without_weights(checkpoints["wav2vec2-bert"], tmp_path / "empty")
    with pytest.raises(StartupError, match=r"no model weights: expected one of model\.safetensors"):
        ModelAdapter(folder, "tiny")


def fake_hub_cache(source: Path, cache: Path, repo: str) -> Path:
    """The layout `huggingface_hub` writes: refs/main names a snapshot folder of files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    model = cache / f"models--{repo.replace('/', '--')}"
    (model / "refs").mkdir(parents=True)
    (model / "refs" / "main").write_text(commit)
    shutil.copytree(source, model / "snapshots" / commit)
    return model / "snapshots" / commit


def test_hub_id_resolves_from_the_local_cache(checkpoints: dict[str, Path], tmp_path: Path):
    snapshot = fake_hub_cache(checkpoints["wav2vec2-bert"], tmp_path / "hub", "acme/tiny-asr")
    assert checkpoint.resolve("acme/tiny-asr", cache_dir=tmp_path / "hub") == snapshot
    with pytest.raises(StartupError, match="never downloads") as caught:
        checkpoint.resolve("acme/absent", cache_dir=tmp_path / "hub")
    assert "hf download acme/absent" in str(caught.value)
    with pytest.raises(StartupError, match="neither a folder nor a hub id"):
        checkpoint.resolve("/no/such/folder")


@pytest.mark.slow
def test_service_serves_a_hub_id_offline(
    checkpoints: dict[str, Path], tmp_path: Path, speech_wav: bytes
) -> None:
    """`STT_MODEL=org/name` with `HF_HUB_OFFLINE=1`: the README's serve command, no network."""
    fake_hub_cache(checkpoints["wav2vec2-bert"], tmp_path / "hub", "acme/tiny-asr")
    env = {
        "STT_MODEL": "acme/tiny-asr",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_OFFLINE": "1",
        "STT_WARMUP": "false",
        "STT_CPU_WORKERS": "1",
    }
    service = ServiceProcess(**env)
    try:
        models = httpx.get(service.url + "/v1/models", timeout=30).json()["data"]
        assert [m["id"] for m in models] == ["acme/tiny-asr"]
        response = httpx.post(
            service.url + "/v1/audio/transcriptions",
            files={"file": ("a.wav", speech_wav)},
            data={"model": "acme/tiny-asr"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert response.json()["text"]
    finally:
        service.stop()
    with pytest.raises(RuntimeError, match=r"not in .* never downloads"):
        ServiceProcess(**{**env, "STT_MODEL": "acme/absent"})
