"""The paths a GPU takes, exercised on a CPU: the padded batched encoder, bfloat16, the OOM split
with the device cache cleared, CUDA memory gauges and a pool of several devices.

Where a GPU would be needed, the device is faked (its name, its memory figures, its cache), never
the model: every transcript here comes from a real tiny checkpoint (or the bundled model), and
the padded encoder path is forced with `ModelAdapter(encode_separately=False)`, the seam that
exists for this.
"""

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from service.engine import engine as engine_module
from service.engine.adapter import ModelAdapter
from service.engine.engine import Engine
from service.engine.fastpath import FastPathOptions
from service.engine.types import GenerationParams
from service.settings import DEFAULT_MODEL_DIR, Settings
from tests.conftest import settings_for

INVARIANT_KINDS = ["wav2vec2-bert", "hubert-gpt2", "wav2vec2-bart"]
PARAMS = GenerationParams(max_new_tokens=8)
LENGTHS = [1.0, 0.45, 1.7, 0.8]  # seconds: padding is most of the shorter rows' input


def clips(lengths: list[float]) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.normal(0, 0.1, int(s * 16_000)).astype(np.float32) for s in lengths]


def encoder_batches(adapter: ModelAdapter) -> list[tuple[int, int]]:
    """(rows, samples) of every encoder forward from now on."""
    seen: list[tuple[int, int]] = []

    def record(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs = kwargs.get("input_values", args[0] if args else None)
        seen.append((int(inputs.shape[0]), int(inputs.shape[-1])))

    adapter.model.get_encoder().register_forward_pre_hook(record, with_kwargs=True)
    return seen


# --------------------------------------------------------------------- padded batched encoder


@pytest.mark.parametrize("kind", INVARIANT_KINDS)
def test_padded_batch_encoder_gives_each_row_its_tokens_alone(
    checkpoints: dict[str, Path], kind: str
) -> None:
    adapter = ModelAdapter(checkpoints[kind], "tiny", encode_separately=False)
    assert adapter.info.padding_invariant
    assert not adapter.info.encode_separately  # the CUDA path, on this CPU
    audio = clips(LENGTHS)
    alone = [adapter.transcribe([a], PARAMS)[0].tokens for a in audio]
    seen = encoder_batches(adapter)
    together = [row.tokens for row in adapter.transcribe(audio, PARAMS)]
    # one encoder call on all four rows, padded to the longest: the path really was taken
    assert seen == [(len(audio), max(len(a) for a in audio))]
    assert together == alone
    assert len({tuple(t) for t in alone}) > 1  # the rows differ: a mixed-up batch would show


def test_padding_reaches_a_group_norm_encoder_on_that_path(checkpoints: dict[str, Path]) -> None:
    """The contrast that shows the check above can fail: group-norm wav2vec2 normalises over
    the padding, so padded to another row's length its tokens change. The scheduler therefore
    only batches such rows within one length bucket (`test_engine_batches_are_invariant...`)."""
    adapter = ModelAdapter(checkpoints["wav2vec2-groupnorm-bert"], "tiny", encode_separately=False)
    assert not adapter.info.padding_invariant
    audio = clips(LENGTHS)
    alone = [adapter.transcribe([a], PARAMS)[0].tokens for a in audio]
    together = [row.tokens for row in adapter.transcribe(audio, PARAMS)]
    assert together != alone


def forced_engine(model_dir: Path, **overrides: object) -> Engine:
    """An engine whose one replica runs the encoder on padded batches, as on CUDA."""
    options = {"warmup": False, "cpu_threads": 1, "cpu_workers": 1, **overrides}
    settings = settings_for(model_dir, **options)
    adapter = ModelAdapter(model_dir, "tiny", encode_separately=False)
    engine = Engine(settings, [adapter])
    engine.start()
    return engine


@pytest.mark.parametrize("kind", [*INVARIANT_KINDS, "wav2vec2-groupnorm-bert"])
def test_engine_batches_are_invariant_on_the_padded_encoder_path(
    checkpoints: dict[str, Path], kind: str
) -> None:
    engine = forced_engine(checkpoints[kind], max_wait_ms=500, max_batch_size=8)
    assert not engine.info.encode_separately
    audio = clips([1.0, 0.8, 1.1, 1.0, 0.9, 1.0])

    async def run() -> tuple[list[Any], list[Any]]:
        alone = [await engine.transcribe(a, PARAMS) for a in audio]
        together = await asyncio.gather(*(engine.transcribe(a, PARAMS) for a in audio))
        return alone, list(together)

    try:
        alone, together = asyncio.run(run())
    finally:
        engine.stop()
    assert max(r.batch_size for r in together) > 1
    assert [r.tokens for r in together] == [r.tokens for r in alone]


# --------------------------------------------------------------------------------- bfloat16


@pytest.mark.parametrize("kind", [*INVARIANT_KINDS, "speech2text", "wav2vec2-groupnorm-bert"])
def test_bfloat16_runs_every_kind_in_bfloat16(checkpoints: dict[str, Path], kind: str) -> None:
    adapter = ModelAdapter(checkpoints[kind], "tiny", dtype="bfloat16")
    assert {p.dtype for p in adapter.model.parameters()} == {torch.bfloat16}
    hidden: list[torch.dtype] = []
    adapter.model.get_encoder().register_forward_hook(
        lambda _m, _i, out: hidden.append(out.last_hidden_state.dtype)
    )
    rows = adapter.transcribe(clips([1.0, 0.8]), PARAMS)
    assert hidden
    assert set(hidden) == {torch.bfloat16}
    for row in rows:
        assert len(row.tokens) == PARAMS.max_new_tokens  # the tiny decoders never stop early
        assert row.text
        assert all(np.isfinite(lp) and lp <= 0 for lp in row.logprobs)


@pytest.mark.slow
def test_bfloat16_bundled_model_transcribes_its_samples_as_float32_does() -> None:
    """`STT_DTYPE=bfloat16` on a CPU, the bundled model through the engine: each shipped
    sample's transcript equals float32's and the reference text."""
    samples = DEFAULT_MODEL_DIR / "samples"
    texts: dict[str, str] = json.loads((samples / "texts.json").read_text())
    import soundfile as sf

    audio = [sf.read(samples / name, dtype="float32")[0] for name in texts]

    def transcripts(dtype: str) -> list[str]:
        settings = Settings(dtype=dtype, cpu_workers=1, warmup=False)  # type: ignore[arg-type]
        engine = Engine.load(settings)
        engine.start()
        try:
            assert engine.adapter.dtype == getattr(torch, dtype)

            async def run() -> list[str]:
                params = GenerationParams(max_new_tokens=32)
                return [(await engine.transcribe(a, params)).text for a in audio]

            return asyncio.run(run())
        finally:
            engine.stop()

    half = transcripts("bfloat16")
    assert half == transcripts("float32")
    assert half == list(texts.values())


# ------------------------------------------------------------------ fake CUDA devices


class FakeCuda:
    """What the service reads from `torch.cuda`, for devices that are not there: a device
    count, per-device memory figures and a cache-clearing call that is counted."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
        self.count = count
        self.cleared = 0
        self.allocated = {f"cuda:{i}": 1_000_000 * (i + 1) for i in range(count)}
        self.reserved = {f"cuda:{i}": 4_000_000 * (i + 1) for i in range(count)}
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: self.allocated[str(d)])
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: self.reserved[str(d)])
        monkeypatch.setattr(torch.cuda, "empty_cache", self._clear)

    def _clear(self) -> None:
        self.cleared += 1


class FakeCudaReplica(ModelAdapter):
    """A replica the engine asked for on `cuda:N`. The model really runs, on the CPU, on the
    path CUDA takes (padded batched encoder); `requested` keeps what the engine asked for."""

    requested: ClassVar[list[tuple[str, str]]] = []

    def __init__(
        self,
        model_dir: Path,
        name: str,
        device: str = "cpu",
        dtype: str = "auto",
        *,
        fast: FastPathOptions | None = None,
    ):
        FakeCudaReplica.requested.append((device, dtype))
        super().__init__(model_dir, name, "cpu", "float32", encode_separately=False, fast=fast)
        self.fake_device = device


def fake_gpu_engine(
    monkeypatch: pytest.MonkeyPatch, model_dir: Path, **overrides: object
) -> Engine:
    """`Engine.load` with `STT_DEVICE=auto` on a machine that reports the fake CUDA devices.

    Each worker is named after its replica's device, as on a real GPU host (the pool's OOM
    handling and the metrics read that name)."""
    FakeCudaReplica.requested = []
    monkeypatch.setattr(engine_module, "ModelAdapter", FakeCudaReplica)
    settings = settings_for(model_dir, device="auto", **overrides)
    engine = Engine.load(settings)
    for worker in engine.pool.workers:
        worker.device = worker.adapter.fake_device  # type: ignore[attr-defined]
    engine.start()
    return engine


def scrape(engine: Engine) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = engine.metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch, checkpoints: dict[str, Path]) -> Iterator[Any]:
    cuda = FakeCuda(monkeypatch, 2)
    threads = torch.get_num_threads()
    engine = fake_gpu_engine(
        monkeypatch, checkpoints["wav2vec2-bert"], max_batch_size=2, max_wait_ms=0
    )
    try:
        yield cuda, engine, threads
    finally:
        engine.stop()


def test_a_pool_of_two_gpus_has_a_replica_and_a_worker_on_each(two_gpus: Any) -> None:
    cuda, engine, threads = two_gpus
    # one replica per device, each loaded with the dtype a GPU gets by default (float16)
    assert FakeCudaReplica.requested == [("cuda:0", "auto"), ("cuda:1", "auto")]
    assert ModelAdapter._dtype("auto", torch.device("cuda:0")) == torch.float16
    replicas = [w.adapter for w in engine.pool.workers]
    assert replicas[0] is not replicas[1]
    assert [w.device for w in engine.pool.workers] == ["cuda:0", "cuda:1"]
    assert torch.get_num_threads() == threads  # GPU workers leave torch's CPU threads alone

    # both workers hold a batch at the same time: the first two batches meet at a barrier
    met = threading.Barrier(2, timeout=60)
    ran: list[str] = []

    def both_busy(worker: Any, jobs: Any) -> None:
        ran.append(worker.device)
        if len(ran) <= 2:
            met.wait()

    engine.pool.before_batch = both_busy
    audio = clips([1.0, 0.9, 1.1, 1.0, 0.8, 1.2, 1.0, 0.95])
    reference = ModelAdapter(engine.settings.model_dir, "cpu")
    alone = [reference.transcribe([a], PARAMS)[0] for a in audio]

    async def run() -> list[Any]:
        return list(await asyncio.gather(*(engine.transcribe(a, PARAMS) for a in audio)))

    results = asyncio.run(run())
    assert sorted(set(ran[:2])) == ["cuda:0", "cuda:1"]
    assert [r.tokens for r in results] == [row.tokens for row in alone]

    samples = scrape(engine)
    for device in ("cuda:0", "cuda:1"):
        up = samples[("stt_worker_up", (("device", device), ("worker", device[-1])))]
        assert up == 1.0
        batches = ("stt_worker_batches_total", (("device", device), ("worker", device[-1])))
        assert samples[batches] >= 1
        key = (("device", device),)
        assert samples[("stt_cuda_memory_allocated_bytes", key)] == cuda.allocated[device]
        assert samples[("stt_cuda_memory_reserved_bytes", key)] == cuda.reserved[device]
    cuda.allocated["cuda:1"] = 123_456_789  # read at scrape time, not cached
    assert scrape(engine)[("stt_cuda_memory_allocated_bytes", (("device", "cuda:1"),))] == (
        123_456_789
    )


def test_out_of_memory_on_a_gpu_splits_the_batch_and_clears_the_cache(
    monkeypatch: pytest.MonkeyPatch, checkpoints: dict[str, Path]
) -> None:
    """A device that fits one row: the real encoder raises torch.OutOfMemoryError on a padded
    batch of more; the worker clears the device cache and splits the batch until every row
    runs, each getting the tokens it gets alone."""
    cuda = FakeCuda(monkeypatch, 1)
    engine = fake_gpu_engine(
        monkeypatch, checkpoints["wav2vec2-bert"], max_batch_size=4, max_wait_ms=500
    )
    adapter = engine.pool.workers[0].adapter
    sizes: list[int] = []

    def small_device(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rows = kwargs.get("input_values", args[0] if args else None).shape[0]
        sizes.append(rows)
        if rows > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (fake device: one row fits)")

    audio = clips([1.0, 0.9, 1.1, 1.0])  # similar lengths: the scheduler batches them
    try:
        alone = [adapter.transcribe([a], PARAMS)[0].tokens for a in audio]
        adapter.model.get_encoder().register_forward_pre_hook(small_device, with_kwargs=True)

        async def run() -> list[Any]:
            return list(await asyncio.gather(*(engine.transcribe(a, PARAMS) for a in audio)))

        results = asyncio.run(run())
        failures = scrape(engine)[("stt_batch_failures_total", (("error", "out_of_memory"),))]
    finally:
        engine.stop()
    assert [r.tokens for r in results] == alone
    assert sizes[0] == 4  # they shared a batch, which the device could not hold
    assert sorted(sizes) == [1, 1, 1, 1, 2, 2, 4]
    assert cuda.cleared == 3  # after each out-of-memory batch
    assert failures == 3
