"""The command line: flags generated from the settings, precedence, start-up errors a person can
act on, and logs that are all JSON when asked and never hold a key or a forged line."""

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from service.__main__ import EXIT_CANNOT_START, parser_and_source, settings_from
from service.settings import Settings
from tests.conftest import CLEAN_EXIT, ServiceProcess

SERVE = [sys.executable, "-m", "service"]
KEY = "sk-test-Zq81secretvalue"


def run_cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SERVE, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_every_setting_with_its_variable() -> None:
    done = run_cli("--help", timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m service")
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in done.stdout, name
        assert f"STT_{name.upper()}" in done.stdout.replace("\n", "").replace(" ", ""), name
    assert "Precedence: a flag wins over its environment variable" in done.stdout


def test_flag_beats_environment_beats_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STT_PORT", "7001")
    monkeypatch.setenv("STT_MAX_BATCH_SIZE", "3")
    settings = settings_from(["--port", "9123", "--no-warmup", "--api-keys", "a,b"])
    assert settings.port == 9123  # flag over environment
    assert settings.max_batch_size == 3  # environment over default
    assert settings.warmup is False
    assert settings.keys() == ["a", "b"]
    assert settings.max_wait_ms == Settings.model_fields["max_wait_ms"].default
    monkeypatch.delenv("STT_PORT")
    assert settings_from([]).port == 8000


def test_every_setting_is_a_flag() -> None:
    parser, _ = parser_and_source()
    flags = {flag for action in parser._actions for flag in action.option_strings}
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in flags, name


def test_unknown_flag_and_impossible_setting_exit_with_one_line() -> None:
    unknown = run_cli("--portt", "1", timeout=60)
    assert unknown.returncode == 2
    assert "unrecognized arguments: --portt" in unknown.stderr
    bad = run_cli("--max-batch-size", "0", timeout=60)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1, bad.stderr
    assert "--max-batch-size (STT_MAX_BATCH_SIZE)" in lines[0]
    assert "greater than or equal to 1" in lines[0]


def test_busy_port_is_one_clear_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("--host", "127.0.0.1", "--port", str(port))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    problem = [line for line in done.stderr.splitlines() if "cannot start" in line]
    assert len(problem) == 1, done.stderr
    assert f"127.0.0.1:{port}" in problem[0]
    assert "already in use" in problem[0]
    assert "--port" in problem[0]


def test_bad_checkpoint_is_one_line_and_a_traceback_only_in_debug(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "speech-encoder-decoder"}')
    done = run_cli("--model-dir", str(tmp_path), "--port", "0")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    problem = [line for line in done.stderr.splitlines() if "cannot start" in line]
    assert len(problem) == 1, done.stderr
    assert str(tmp_path) in problem[0]
    debug = run_cli("--model-dir", str(tmp_path), "--port", "0", "--log-level", "debug")
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr


def test_serves_on_the_port_the_flag_names() -> None:
    # The port must be a number chosen here, so it is only free when chosen: if another
    # process takes it first, the server says so (see above) and the test picks another.
    for _ in range(3):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        proc = subprocess.Popen(
            [*SERVE, "--host", "127.0.0.1", "--port", str(port), "--cpu-workers", "1"],
            env={**os.environ, "STT_PORT": "1"},  # the flag wins over the environment
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stderr is not None
            log = []
            for line in proc.stderr:
                log.append(line)
                if "Uvicorn running on" in line:
                    assert f"127.0.0.1:{port}" in line
                    break
            else:
                if "already in use" in "".join(log):
                    continue  # taken in the meantime: another port
                pytest.fail("the server never started:\n" + "".join(log))
            assert httpx.get(f"http://127.0.0.1:{port}/ready", timeout=30).status_code == 200
            return
        finally:
            proc.terminate()
            assert proc.wait(60) in (*CLEAN_EXIT, EXIT_CANNOT_START)
    pytest.fail("three free ports were taken before the server could bind them")


async def _use_with_key(url: str, speech_wav: bytes) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        bearer = {"Authorization": f"Bearer {KEY}"}
        files = {"file": ("a.wav", speech_wav, "audio/wav")}
        ok = await client.post("/v1/audio/transcriptions", headers=bearer, files=files)
        assert ok.status_code == 200
        assert (await client.get("/v1/models", headers={"X-API-Key": KEY})).status_code == 200
        wrong = await client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}x"})
        assert wrong.status_code == 401
        # a path that tries to forge a log line of its own
        forged = await client.get("/v1/models%0a2026-01-01 00:00:00,000 INFO fake: forged")
        assert forged.status_code in (401, 404)
    ws_url = url.replace("http", "ws") + f"/v1/audio/stream?api_key={KEY}&sample_rate=16000"
    async with connect(ws_url) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps({"type": "end"}))
        async for _ in ws:
            pass


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_logs_hold_no_key_and_no_forged_line(log_format: str, speech_wav: bytes) -> None:
    service = ServiceProcess(
        "--log-format", log_format, "--cpu-workers", "1", STT_API_KEYS=KEY, STT_LOG_LEVEL="debug"
    )
    try:
        asyncio.run(_use_with_key(service.url, speech_wav))
    finally:
        assert service.stop() in CLEAN_EXIT
    log = "".join(service.log)
    assert KEY not in log
    assert KEY[:12] not in log  # not even a prefix of it
    assert "WebSocket /v1/audio/stream" in log  # uvicorn's websocket line is there, redacted
    assert "[REDACTED]" in log
    lines = log.splitlines()
    assert not any(line.startswith("2026-01-01 00:00:00,000 INFO fake") for line in lines)
    if log_format == "json":
        for line in lines:  # every line, transformers' and uvicorn's included
            entry = json.loads(line)
            assert {"ts", "level", "logger", "message"} <= entry.keys()
        forged = [json.loads(line) for line in lines if "forged" in line]
        assert forged
        assert all("\n" in entry.get("path", "\n") for entry in forged)
    else:
        assert any("/v1/models\\n2026-01-01" in line for line in lines)
