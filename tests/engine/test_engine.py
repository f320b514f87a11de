"""The engine on tiny real checkpoints: batching, invariance, cancellation, fault isolation."""

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from service.engine.engine import ClientGone, Engine
from service.engine.types import GenerationParams
from service.errors import DeadlineExceeded, ModelFailure, Unavailable
from tests.checkpoints import KINDS
from tests.conftest import settings_for

PARAMS = GenerationParams(max_new_tokens=6)
BATCHING = ("continuous", "static")


def intercept(engine: Engine, before: Callable[[int, bool], None]) -> None:
    """Call `before(rows, first)` ahead of each model call of the worker: a `generate` batch
    (static batching; `first` always True) or a decoder step (continuous; `first` on the
    rows' first step). `before` may raise to inject a fault."""
    adapter = engine.pool.workers[0].adapter
    if engine.settings.batching == "static":
        transcribe = adapter.transcribe

        def batch(audios, params, wanted=None, **kwargs):  # type: ignore[no-untyped-def]
            before(len(audios), True)
            return transcribe(audios, params, wanted, **kwargs)

        adapter.transcribe = batch  # type: ignore[method-assign]
        return
    step = adapter.decoder_step

    def decoder_step(ids, positions, self_mask, hidden, input_mask, cache):  # type: ignore[no-untyped-def]
        before(ids.shape[0], cache is None)
        return step(ids, positions, self_mask, hidden, input_mask, cache)

    adapter.decoder_step = decoder_step  # type: ignore[method-assign]


def clips(lengths: list[float]) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.normal(0, 0.1, int(s * 16_000)).astype(np.float32) for s in lengths]


@pytest.fixture
def engine_for(checkpoints: dict[str, Path]) -> Iterator:
    engines: list[Engine] = []

    def make(kind: str = "wav2vec2-bert", **overrides: object) -> Engine:
        options = {"warmup": False, "cpu_threads": 1, "cpu_workers": 1, **overrides}
        settings = settings_for(checkpoints[kind], **options)
        engine = Engine.load(settings)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_batching_never_changes_a_transcript(engine_for, kind: str) -> None:
    engine = engine_for(kind, max_wait_ms=200, max_batch_size=8)
    audio = clips([1.0, 0.8, 1.1, 1.0, 0.9, 1.0])

    async def run():
        alone = [await engine.transcribe(a, PARAMS) for a in audio]
        together = await asyncio.gather(*(engine.transcribe(a, PARAMS) for a in audio))
        return alone, together

    alone, together = asyncio.run(run())
    assert [r.batch_size for r in alone] == [1] * len(audio)
    assert max(r.batch_size for r in together) > 1
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    stepped = engine.scheduler.steppable is not None and engine.adapter.steppable(PARAMS)
    if engine.info.encode_separately or stepped:  # rows encoded alone: any lengths share
        assert max(r.batch_size for r in together) == len(audio)
    elif not engine.info.padding_invariant:  # only the 1.0 s bucket's five clips may share
        assert max(r.batch_size for r in together) <= 5


@pytest.mark.parametrize("batching", BATCHING)
def test_client_gone_while_queued_costs_no_compute(engine_for, batching: str) -> None:
    engine = engine_for(max_wait_ms=0, max_batch_size=1, batching=batching)
    rows_run: list[int] = []
    gate = asyncio.Event()
    intercept(engine, lambda rows, first: rows_run.append(rows) if first else None)

    async def run():
        first = asyncio.create_task(engine.transcribe(clips([1.0])[0], PARAMS))
        leaving = asyncio.create_task(
            engine.transcribe(clips([1.0])[0], PARAMS, client_gone=gate.wait)
        )
        await asyncio.sleep(0)  # let both reach the queue
        gate.set()  # the second client disconnects
        with pytest.raises(ClientGone):
            await leaving
        await first
        return await engine.transcribe(clips([0.5])[0], PARAMS)

    assert asyncio.run(run()).tokens
    assert 2 <= sum(rows_run) <= 2  # first and third; the departed request never ran
    assert engine.scheduler.depth == 0


@pytest.mark.parametrize("batching", BATCHING)
def test_a_failing_batch_fails_only_itself(engine_for, batching: str) -> None:
    engine = engine_for(batching=batching)
    calls = {"n": 0}

    def flaky(rows: int, first: bool) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")

    intercept(engine, flaky)

    async def run():
        with pytest.raises(ModelFailure, match="RuntimeError"):
            await engine.transcribe(clips([1.0])[0], PARAMS)
        return await engine.transcribe(clips([1.0])[0], PARAMS)

    assert asyncio.run(run()).tokens
    assert engine.pool.alive == 1


@pytest.mark.parametrize("batching", BATCHING)
def test_out_of_memory_splits_the_batch(engine_for, batching: str) -> None:
    engine = engine_for(max_wait_ms=200, max_batch_size=4, batching=batching)
    audio = clips([1.0, 0.9, 1.1, 1.0])
    alone = asyncio.run(_each_alone(engine, audio))
    sizes: list[int] = []

    def small_memory(rows: int, first: bool) -> None:
        sizes.append(rows)
        if rows > 1:
            raise torch.OutOfMemoryError("injected")

    intercept(engine, small_memory)

    async def run():
        return await asyncio.gather(*(engine.transcribe(a, PARAMS) for a in audio))

    results = asyncio.run(run())
    assert [r.tokens for r in results] == [r.tokens for r in alone]
    assert sizes[:7] == [4, 2, 1, 1, 2, 1, 1]  # halves, then rows alone
    assert set(sizes[7:]) <= {1}  # continuous: the rows stay apart once split


async def _each_alone(engine: Engine, audio: list[np.ndarray]) -> list:
    return [await engine.transcribe(a, PARAMS) for a in audio]


def test_a_dead_worker_is_replaced_and_its_request_answered(engine_for) -> None:
    engine = engine_for()
    pool = engine.pool
    deaths = {"n": 0}

    def die_once(worker, jobs):
        if deaths["n"] == 0:
            deaths["n"] += 1
            raise SystemExit("injected thread death")

    pool.before_batch = die_once  # type: ignore[method-assign]

    async def run():
        with pytest.raises(Unavailable, match="crashed"):
            await engine.transcribe(clips([1.0])[0], PARAMS)
        return await engine.transcribe(clips([1.0])[0], PARAMS)

    assert asyncio.run(run()).tokens
    assert pool.restarts == 1
    assert pool.alive == 1


def test_several_cpu_workers_share_the_queue(engine_for) -> None:
    engine = engine_for(cpu_workers=2, max_batch_size=1, max_wait_ms=0)
    assert [w.device for w in engine.pool.workers] == ["cpu", "cpu"]
    assert engine.pool.workers[0].adapter is not engine.pool.workers[1].adapter  # own replicas

    async def run():
        same = clips([1.0])[0]
        return await asyncio.gather(*(engine.transcribe(same, PARAMS) for _ in range(8)))

    results = asyncio.run(run())
    assert len({tuple(r.tokens) for r in results}) == 1  # same clip, same answer on any worker
    assert sum(w.batches_run for w in engine.pool.workers) == 8


def test_busy_cpu_workers_split_the_cores() -> None:
    from service.engine.pool import WorkerPool
    from tests.engine.test_scheduler import make_scheduler

    before = torch.get_num_threads()
    pool = WorkerPool([], make_scheduler(), share_cores=4)
    try:
        with pool.cpu_share():  # one busy worker: every core
            assert torch.get_num_threads() == 4
            with pool.cpu_share():  # a second starts: half each
                assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 4  # it finished: the first gets them back
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("batching", BATCHING)
def test_windows_of_one_request_batch_together_and_leave_together(
    engine_for, batching: str
) -> None:
    engine = engine_for(max_wait_ms=100, max_batch_size=4, batching=batching)
    batches: list[int] = []  # rows starting (static: a batch; continuous: first steps)
    steps: list[int] = []  # rows per model call
    intercept(engine, lambda rows, first: (steps.append(rows), first and batches.append(rows)))
    pieces = clips([1.0] * 20)

    async def run():
        alone = [await engine.transcribe(p, PARAMS) for p in pieces[:8]]
        del batches[:], steps[:]
        whole = [r async for r in engine.transcribe_pieces(pieces[:8], PARAMS)]
        if batching == "static":
            assert batches == [4, 4]  # eight windows: two full batches, not eight requests
        else:  # the first four start together; each later one joins as a row leaves
            assert batches[0] == 4
            assert sum(batches) == 8
            assert max(steps) == 4
        del batches[:]
        results = engine.transcribe_pieces(pieces, PARAMS)
        first = [await anext(results), await anext(results)]
        await results.aclose()  # the client leaves after two windows
        return alone, whole, first

    alone, whole, first = asyncio.run(run())
    assert [r.tokens for r in whole] == [r.tokens for r in alone]
    assert [r.tokens for r in first] == [r.tokens for r in alone[:2]]
    # at most: the batch that held the two windows read, and the next one, already running
    assert sum(batches) <= 8
    assert engine.scheduler.depth == 0  # nothing of the departed request is left queued


@pytest.mark.parametrize("batching", BATCHING)
def test_requests_arriving_while_a_batch_encodes_join_its_decoder_steps(
    engine_for, batching: str
) -> None:
    engine = engine_for(max_wait_ms=0, max_batch_size=8, batching=batching)
    assert engine.info.encode_separately  # a CPU engine: rows are encoded one by one
    adapter = engine.pool.workers[0].adapter
    original = adapter.features
    encoding, release = threading.Event(), threading.Event()

    def slow_first(audios):  # the first row's encoding waits until the others are queued
        if not encoding.is_set():
            encoding.set()
            release.wait(30)
        return original(audios)

    audio = clips([1.0, 0.7, 1.3, 0.9])

    async def run():
        alone = [await engine.transcribe(a, PARAMS) for a in audio]
        encoding.clear()
        adapter.features = slow_first  # type: ignore[method-assign]
        first = asyncio.create_task(engine.transcribe(audio[0], PARAMS))
        await asyncio.to_thread(encoding.wait, 30)
        rest = [asyncio.create_task(engine.transcribe(a, PARAMS)) for a in audio[1:]]
        while engine.scheduler.depth < 3:
            await asyncio.sleep(0.01)
        release.set()
        return alone, [await first, *[await r for r in rest]]

    encoding.set()  # the warm-up transcriptions in `alone` pass straight through
    alone, joined = asyncio.run(run())
    assert [r.batch_size for r in joined] == [4, 4, 4, 4]  # one batch, not 1 + 3
    assert [r.tokens for r in joined] == [r.tokens for r in alone]


def test_a_row_past_its_deadline_leaves_the_running_batch_at_the_next_step(engine_for) -> None:
    engine = engine_for(request_timeout_s=1.0, batching="continuous")
    adapter = engine.pool.workers[0].adapter
    step = adapter.decoder_step
    passed = threading.Event()
    steps: list[list[int]] = []  # per step: each row's samples

    def decoder_step(ids, positions, self_mask, hidden, input_mask, cache):  # type: ignore[no-untyped-def]
        steps.append([int(n) for n in input_mask.sum(dim=1)])
        if len(steps) == 2:  # the row is running: hold it until its deadline has passed
            assert passed.wait(30)
        return step(ids, positions, self_mask, hidden, input_mask, cache)

    adapter.decoder_step = decoder_step  # type: ignore[method-assign]
    left = engine.metrics.rows_left.labels(reason="deadline")
    before = left._value.get()

    async def run():
        with pytest.raises(DeadlineExceeded):
            await engine.transcribe(clips([1.0])[0], GenerationParams(max_new_tokens=40))
        passed.set()
        return await engine.transcribe(clips([0.5])[0], PARAMS)

    assert asyncio.run(run()).tokens
    assert left._value.get() == before + 1
    # two steps (the first and the held one), then it left: every later step is the next
    # request's alone
    assert steps[:2] == [[16_000], [16_000]]
    assert all(rows == [8_000] for rows in steps[2:])
    assert engine.scheduler.depth == 0
