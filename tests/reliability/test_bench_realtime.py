"""A short run of the streaming benchmark with OpenAI Realtime sessions (`python -m bench.stream
--protocol realtime`): it drives a real `python -m service`, and its figures must account for
every phrase. Latency targets are for the full run on a quiet machine, not asserted here."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_realtime_benchmark_accounts_for_every_phrase(tmp_path: Path) -> None:
    out = tmp_path / "realtime.json"
    args = ["--protocol", "realtime", "--sessions", "2", "--seconds-per-session", "5"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.stream", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    (row,) = json.loads(out.read_text())
    assert row["sessions"] == 2
    assert row["phrases"] >= 4
    assert row["completed"] == row["phrases"]  # one completed per phrase, none lost
    assert row["sessions_ok"] == 2
    assert row["equal_to_upload"] == row["phrases"]  # each transcript equals its upload
    assert row["errors"] == 0
    assert row["early_delta_share"] > 0  # some text came while the speaker was talking
    for name in ("delta_p50", "delta_p95", "completed_p50", "completed_p95", "speech_end_p95"):
        assert math.isfinite(row[name]), name
        assert row[name] > 0, (name, row[name])
    assert "first delta p95 s" in done.stdout
    assert "target: 16 concurrent real-time Realtime sessions" in done.stdout
