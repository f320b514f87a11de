"""`python -m service` with workers that a test can hold (`tests.conftest.HeldService`).

While the file named by `SPEECH_TEST_HOLD_FILE` exists, a worker that has taken a batch waits
before running it (the pool's `before_batch` hook, there for fault injection), so whatever is
queued stays queued until the test removes the file: a test states "these requests are queued"
without racing the batcher. The wait also ends when the pool stops (a drain that timed out).
"""

import os
import time
from pathlib import Path

from service.__main__ import main
from service.engine.pool import Worker, WorkerPool
from service.engine.types import Job

HOLD_FILE = Path(os.environ["SPEECH_TEST_HOLD_FILE"])


def _held(pool: WorkerPool, worker: Worker, jobs: list[Job]) -> None:
    while HOLD_FILE.exists() and not pool.stopping.is_set():
        time.sleep(0.01)


WorkerPool.before_batch = _held  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
