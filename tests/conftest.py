"""Shared fixtures: tiny checkpoints, spoken audio, and a real uvicorn server on loopback."""

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import uvicorn
from fastapi import FastAPI

from service.api.app import create_app
from service.api.transport import uvicorn_options
from service.settings import Settings
from tests.checkpoints import KINDS, build_checkpoint


class LiveServer:
    """uvicorn serving an app on 127.0.0.1 (free port) in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.started = threading.Event()
        outer = self

        class _Server(uvicorn.Server):
            async def startup(self, sockets: object = None) -> None:
                await super().startup(sockets)  # type: ignore[arg-type]
                outer.started.set()

        # the transport the command line serves with (head limits, read timeouts)
        options = uvicorn_options(app.state.settings, app.state.metrics)
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **options)
        self.server = _Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        while not self.started.wait(0.05):
            if not self.thread.is_alive():
                raise RuntimeError("server exited during start-up (see the log above)")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny test checkpoint kind, built once per test session."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {kind: build_checkpoint(kind, root / kind) for kind in KINDS}


def settings_for(model_dir: Path, **overrides: object) -> Settings:
    return Settings(model_dir=model_dir, model_name="tiny", **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_server(checkpoints: dict[str, Path]) -> Iterator[LiveServer]:
    """A live server on the tiny wav2vec2 + BERT checkpoint, small limits for limit tests."""
    settings = settings_for(
        checkpoints["wav2vec2-bert"], max_upload_bytes=2_000_000, max_audio_seconds=20
    )
    with LiveServer(create_app(settings)) as server:
        yield server


def speak(text: str, rate: int = 160, voice: str = "en-us") -> np.ndarray:
    """espeak-ng speech as float32 at its native 22.05 kHz."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is required: apt-get install -y espeak-ng")
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(rate), "--stdout", text],
        check=True,
        capture_output=True,
    ).stdout
    # espeak-ng's streamed header has no length; the PCM follows the 44-byte header.
    return np.frombuffer(wav[44:], dtype="<i2").astype(np.float32) / 32768.0


def encode(audio: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.fixture(scope="session")
def speech_wav() -> bytes:
    """'turn on the lights' spoken by espeak-ng, as a 22.05 kHz 16-bit WAV file."""
    return encode(speak("turn on the lights"), 22_050, "WAV", "PCM_16")


class ServiceProcess:
    """`python -m service` (the README's serve command) as a child process. The server binds a
    free port itself (`--port 0`) and the port is read from its log: no race for the port."""

    module = "service"

    def __init__(self, *args: str, **env: str) -> None:
        full_env = {**os.environ, **env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, "--host", "127.0.0.1", "--port", "0", *args],
            env=full_env,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self._logged = threading.Condition()
        self.port = 0
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # uvicorn says this once load + warm-up are done
            self.log.append(line)
            found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                break
        else:
            raise RuntimeError("service exited during start-up:\n" + "".join(self.log))
        # keep draining so a chatty server never blocks on a full pipe
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr or []:
            with self._logged:
                self.log.append(line)
                self._logged.notify_all()
        with self._logged:
            self._logged.notify_all()

    def wait_for_log(self, text: str, timeout: float = 60) -> str:
        """The first log line containing `text`, waiting (on the log, no polling) until it is
        written; AssertionError if the process exits or `timeout` passes first."""
        with self._logged:
            found = self._logged.wait_for(
                lambda: any(text in line for line in self.log) or self.proc.poll() is not None,
                timeout,
            )
            lines = [line for line in self.log if text in line]
        assert found, f"{text!r} never logged:\n" + "".join(self.log[-40:])
        assert lines, f"{text!r} never logged:\n" + "".join(self.log[-40:])
        return lines[0]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> int:
        """SIGTERM, then the exit status (uvicorn re-raises SIGTERM after a clean shutdown)."""
        self.proc.terminate()
        return self.proc.wait(60)


class HeldService(ServiceProcess):
    """`python -m service` whose workers can be held (`tests/held_service.py`): while held,
    a worker that takes a batch waits before running it, so queued requests stay queued for
    as long as a test needs, on any machine, instead of for a `max_wait_ms` window."""

    module = "tests.held_service"

    def __init__(self, hold_file: Path, *args: str, **env: str) -> None:
        self.hold_file = hold_file
        root = str(Path(__file__).resolve().parent.parent)  # `tests` importable in the child
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        super().__init__(*args, **env, SPEECH_TEST_HOLD_FILE=str(hold_file), PYTHONPATH=path)

    def hold(self) -> None:
        self.hold_file.touch()

    def release(self) -> None:
        self.hold_file.unlink(missing_ok=True)


class WorkerHold:
    """Holds an in-process engine's workers before their next batch until `release()`:
    `entered` is set once a worker holds a batch (whose jobs have left the queue)."""

    def __init__(self, engine: Any) -> None:
        self.pool = engine.pool
        self.entered = threading.Event()
        self.released = threading.Event()
        self.pool.before_batch = self._wait

    def _wait(self, worker: object, jobs: object) -> None:
        self.entered.set()
        self.released.wait(60)

    def release(self) -> None:
        self.released.set()
        del self.pool.before_batch  # back to the class's hook


class QueueHold:
    """Keeps an in-process engine's idle workers from taking work until `release()`: each
    waits before asking the scheduler for a batch, so uploads sent meanwhile all queue and
    then form one batch together (up to `max_batch_size`), however long they took to arrive.
    `parked` is set once a worker waits outside the queue (it can no longer be inside it)."""

    def __init__(self, engine: Any) -> None:
        self.scheduler = engine.scheduler
        self.parked = threading.Event()
        self.released = threading.Event()
        take = self.scheduler.next_batch

        def held(timeout: float | None = None) -> Any:
            self.parked.set()
            self.released.wait(60)
            return take(timeout)

        self.scheduler.next_batch = held

    def release(self) -> None:
        if not self.released.is_set():
            del self.scheduler.next_batch  # back to the class's method
            self.released.set()


CLEAN_EXIT = (0, -signal.SIGTERM)
