"""Batch formation and back-pressure, with plain jobs (no model)."""

import asyncio
import itertools
import time

import numpy as np
import pytest

from service.engine.scheduler import Scheduler
from service.engine.types import GenerationParams, Job
from service.errors import DeadlineExceeded, Overloaded


def make_scheduler(**overrides: object) -> Scheduler:
    options: dict[str, object] = {
        "max_batch_size": 4,
        "max_wait_ms": 0,
        "max_batch_audio_seconds": 100,
        "max_queue_size": 8,
        "max_queued_audio_seconds": 1000,
        "sampling_rate": 16_000,
        "padding_invariant": True,
    }
    options.update(overrides)
    return Scheduler(**options)  # type: ignore[arg-type]


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def job(
    loop,
    seconds: float = 1.0,
    params: GenerationParams | None = None,
    deadline_in: float = 60,
    priority: int = 0,
) -> Job:
    return Job(
        audio=np.zeros(int(seconds * 16_000), np.float32),
        params=params or GenerationParams(),
        deadline=time.monotonic() + deadline_in,
        future=loop.create_future(),
        loop=loop,
        priority=priority,
    )


def test_batches_by_params_and_size(loop) -> None:
    sched = make_scheduler()
    first_greedy = job(loop)
    beam = job(loop, params=GenerationParams(num_beams=2))
    greedy = [first_greedy, *(job(loop) for _ in range(5))]
    for j in [first_greedy, beam, *greedy[1:]]:
        sched.submit(j)
    first = sched.next_batch(0)
    assert first == greedy[:4]  # max_batch_size, oldest first, the beam job left out
    second = sched.next_batch(0)
    assert second == [beam]  # the beam job is now the oldest: it leads its own batch
    assert sched.next_batch(0) == greedy[4:]
    assert sched.next_batch(0) == []


def test_similar_lengths_and_padded_audio_budget(loop) -> None:
    sched = make_scheduler(max_batch_audio_seconds=10)
    short, long_, mid = job(loop, 1.0), job(loop, 8.0), job(loop, 1.2)
    for j in (short, long_, mid):
        sched.submit(j)
    assert sched.next_batch(0) == [short, mid]  # 8 s is too unlike 1 s to share padding
    assert sched.next_batch(0) == [long_]
    a, b = job(loop, 4.0), job(loop, 4.0)
    c = job(loop, 4.0)
    for j in (a, b, c):
        sched.submit(j)
    assert sched.next_batch(0) == [a, b]  # 3 x 4 s would pad to 12 s > 10 s


def test_without_padding_invariance_only_one_length_bucket_shares_a_batch(loop) -> None:
    sched = make_scheduler(padding_invariant=False)
    a, b, c = job(loop, 1.0), job(loop, 1.1), job(loop, 0.8)  # buckets 1.0, 1.25, 1.0 s
    for j in (a, b, c):
        sched.submit(j)
    assert sched.next_batch(0) == [a, c]
    assert sched.next_batch(0) == [b]


def test_length_buckets_are_a_geometric_ladder() -> None:
    from service.engine.buckets import bucket_seconds

    rungs = sorted({bucket_seconds(s / 100) for s in range(1, 3000)})
    assert rungs[:6] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    assert all(b / a <= 1.34 for a, b in itertools.pairwise(rungs[3:]))
    assert all(bucket_seconds(s / 100) >= s / 100 for s in range(1, 3000))


def test_full_queue_rejects_at_once_with_retry_after(loop) -> None:
    sched = make_scheduler(max_queue_size=2)
    sched.submit(job(loop))
    sched.submit(job(loop))
    started = time.monotonic()
    with pytest.raises(Overloaded) as info:
        sched.submit(job(loop))
    assert time.monotonic() - started < 0.1
    assert info.value.status == 429
    assert int(info.value.headers()["Retry-After"]) >= 1
    sched_audio = make_scheduler(max_queued_audio_seconds=5)
    sched_audio.submit(job(loop, 4.0))
    with pytest.raises(Overloaded, match="too much audio"):
        sched_audio.submit(job(loop, 2.0))


def test_estimated_wait_beyond_the_deadline_is_rejected(loop) -> None:
    sched = make_scheduler()
    sched.record_throughput(audio_seconds=1.0, wall_seconds=1.0)  # 1 s of audio per second
    sched.submit(job(loop, 5.0))
    with pytest.raises(Overloaded) as info:
        sched.submit(job(loop, 1.0, deadline_in=2.0))  # would wait ~5 s
    assert info.value.code == "deadline"
    sched.submit(job(loop, 1.0, deadline_in=30.0))


def test_expired_and_cancelled_jobs_are_dropped_before_compute(loop) -> None:
    dropped: list[str] = []
    sched = make_scheduler(on_drop=lambda j, reason: dropped.append(reason))
    expired = job(loop, deadline_in=-1)
    gone = job(loop)
    live = job(loop)
    sched.submit(gone)
    sched.submit(live)
    sched._jobs.insert(0, expired)  # already past its deadline when a worker looks
    sched._queued_samples += expired.samples
    sched.cancel(gone)
    assert sched.next_batch(0) == [live]
    assert sorted(dropped) == ["client_gone", "deadline"]
    loop.run_until_complete(asyncio.sleep(0))  # deliver the failure set from the "worker"
    assert isinstance(expired.future.exception(), DeadlineExceeded)
    assert sched.depth == 0
    assert sched.queued_seconds == 0


def test_priority_jumps_the_queue(loop) -> None:
    sched = make_scheduler(max_batch_size=1)
    upload = job(loop)
    partial = job(loop, priority=10)
    sched.submit(upload)
    sched.submit(partial)
    assert sched.next_batch(0) == [partial]
    assert sched.next_batch(0) == [upload]


def test_lone_request_waits_at_most_max_wait(loop) -> None:
    sched = make_scheduler(max_wait_ms=50)
    lone = job(loop)
    sched.submit(lone)
    started = time.monotonic()
    assert sched.next_batch(1.0) == [lone]
    waited = time.monotonic() - started
    assert 0.03 <= waited < 0.5


def test_a_full_batch_does_not_wait(loop) -> None:
    sched = make_scheduler(max_wait_ms=5000, max_batch_size=2)
    a, b = job(loop), job(loop)
    sched.submit(a)
    sched.submit(b)
    started = time.monotonic()
    assert sched.next_batch(1.0) == [a, b]
    assert time.monotonic() - started < 0.5


def test_length_free_batches_any_lengths_within_the_audio_budget(loop) -> None:
    sched = make_scheduler(length_free=True, max_batch_audio_seconds=10, padding_invariant=False)
    jobs = [job(loop, s) for s in (1.0, 8.0, 0.5, 2.0)]
    for j in jobs:
        sched.submit(j)
    assert sched.next_batch(0) == jobs[:3]  # 9.5 s of real audio; the 2 s clip would exceed 10
    assert sched.next_batch(0) == [jobs[3]]
