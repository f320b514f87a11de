"""`Engines`: one engine per model of `STT_MODELS`, on its share of the cores with its own
threads, looked up by name; ready only when every engine is."""

import asyncio
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from service.engine import engine as engine_module
from service.engine.engine import Engine
from service.engine.registry import Engines
from service.engine.types import GenerationParams, Job
from service.errors import ModelNotFound
from service.metrics import Metrics
from service.settings import Settings
from tests.engine.test_gpu_paths import FakeCuda, FakeCudaReplica


def models(checkpoints: dict[str, Path], **extra: dict[str, object]) -> str:
    entries = [
        {"model": str(checkpoints["wav2vec2-bert"]), "name": "a", **extra.get("a", {})},
        {"model": str(checkpoints["hubert-gpt2"]), "name": "b", **extra.get("b", {})},
    ]
    return json.dumps(entries)


def test_each_model_runs_with_its_own_threads(checkpoints: dict[str, Path]) -> None:
    text = models(checkpoints, a={"cpu_threads": 1}, b={"cpu_threads": 2})
    engines = Engines.load(Settings(models=text, cpu_workers=1, warmup=False))  # type: ignore[arg-type]
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def recorder(name: str) -> object:
        def after_batch(worker: object, jobs: list[Job], seconds: float) -> None:
            with lock:  # in the worker thread, right after its batch
                seen[name] = torch.get_num_threads()

        return after_batch

    for engine in engines:
        engine.pool.after_batch = recorder(engine.settings.served_name)  # type: ignore[method-assign]
    engines.start()
    audio = np.random.default_rng(0).normal(0, 0.1, 16_000).astype(np.float32)

    async def both() -> None:
        params = GenerationParams(max_new_tokens=4)
        await asyncio.gather(*(e.transcribe(audio, params) for e in engines))

    try:
        asyncio.run(both())
    finally:
        engines.stop()
    assert seen == {"a": 1, "b": 2}
    assert [e.pool.threads for e in engines] == [1, 2]


def test_the_cores_are_split_and_names_resolve(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 5)
    aliases = {"b": {"aliases": ["whisper-1"]}}
    engines = Engines.load(Settings(models=models(checkpoints, **aliases), warmup=False))  # type: ignore[arg-type]
    try:
        # 5 cores: 3 for the first model, 2 for the second; small models get a worker per core,
        # one thread each, as a one-model server on that many cores would
        assert [len(e.pool.workers) for e in engines] == [3, 2]
        assert [e.pool.threads for e in engines] == [0, 0]  # several workers share their cores
        assert [e.pool.share_cores for e in engines] == [3, 2]
        assert engines.names() == ["a", "b", "whisper-1"]
        assert engines.get(None) is engines.default is engines.get("a")
        assert engines.get("whisper-1") is engines.get("b") is not engines.get("a")
        with pytest.raises(ModelNotFound, match=r"'c' is not loaded.*a, b, whisper-1"):
            engines.get("c")
        # every engine shares one in-flight audio budget
        first, second = engines
        assert first.audio_budget is second.audio_budget
        assert not engines.ready  # not started
        first.start()
        assert first.ready
        assert not engines.ready  # ready only when every model is
        second.start()
        assert engines.ready
    finally:
        engines.stop()
    assert not engines.ready


def test_one_model_is_one_engine_as_before(checkpoints: dict[str, Path]) -> None:
    settings = Settings(model_dir=checkpoints["wav2vec2-bert"], model_name="tiny", warmup=False)
    engines = Engines.load(settings)
    try:
        (engine,) = engines
        assert isinstance(engine, Engine)
        assert engine.settings is settings
        assert engines.names() == ["tiny"]
    finally:
        engines.stop()


def test_models_get_their_share_of_the_gpus(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two fake CUDA devices (tests/engine/test_gpu_paths.py: the replicas really run, on the
    CPU, on CUDA's path), three models: disjoint devices while there are enough, then shared;
    each model's workers and CUDA memory are reported under its own `model` label."""
    cuda = FakeCuda(monkeypatch, 2)
    FakeCudaReplica.requested = []
    monkeypatch.setattr(engine_module, "ModelAdapter", FakeCudaReplica)
    three = json.dumps(
        [
            {"model": str(checkpoints["wav2vec2-bert"]), "name": "a"},
            {"model": str(checkpoints["hubert-gpt2"]), "name": "b"},
            {"model": str(checkpoints["wav2vec2-bert"]), "name": "c"},
        ]
    )
    metrics = Metrics(by_model=True)
    engines = Engines.load(Settings(models=three, warmup=False), metrics)  # type: ignore[arg-type]
    try:
        asked = [device for device, _ in FakeCudaReplica.requested]
        assert asked == ["cuda:0", "cuda:1", "cuda:0"]
        for engine in engines:
            for worker in engine.pool.workers:
                worker.device = worker.adapter.fake_device  # type: ignore[attr-defined]
        engines.start()
        samples = [
            s
            for family in text_string_to_metric_families(metrics.render().decode())
            for s in family.samples
        ]
        up = {
            (s.labels["model"], s.labels["device"])
            for s in samples
            if s.name == "stt_worker_up" and s.value == 1.0
        }
        assert up == {("a", "cuda:0"), ("b", "cuda:1"), ("c", "cuda:0")}
        memory = {
            (s.labels["model"], s.labels["device"]): s.value
            for s in samples
            if s.name == "stt_cuda_memory_allocated_bytes"
        }
        # a device two models share is reported under each of them
        assert memory == {
            ("a", "cuda:0"): cuda.allocated["cuda:0"],
            ("b", "cuda:1"): cuda.allocated["cuda:1"],
            ("c", "cuda:0"): cuda.allocated["cuda:0"],
        }
    finally:
        engines.stop()
