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

    def __init__(self, *args: str, **env: str) -> None:
        full_env = {**os.environ, **env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", "0", *args],
            env=full_env,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
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
        threading.Thread(
            target=lambda: self.log.extend(self.proc.stderr or []), daemon=True
        ).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> int:
        """SIGTERM, then the exit status (uvicorn re-raises SIGTERM after a clean shutdown)."""
        self.proc.terminate()
        return self.proc.wait(60)


CLEAN_EXIT = (0, -signal.SIGTERM)
