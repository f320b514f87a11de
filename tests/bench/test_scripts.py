"""Short runs of the benchmark scripts (`bench/`): each starts real servers, prints its table of
ratios and writes its figures; the tests parse both. Full-size runs are the scripts' defaults
(see the README). The soak and overload scripts have their own short runs in
`tests/reliability/test_soak.py`."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow


def run(module: str, *args: str, out: Path) -> tuple[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", module, *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, json.loads(out.read_text())


def table_rows(stdout: str, first_cell: str) -> list[list[str]]:
    """The markdown table rows whose first cell starts with `first_cell`."""
    rows = []
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith(first_cell):
            rows.append(cells)
    return rows


def test_throughput_prints_each_mode_and_their_ratios(tmp_path: Path) -> None:
    stdout, rows = run(
        "bench.throughput",
        *("--requests", "8", "--concurrency", "4", "--min-seconds", "1", "--max-seconds", "2"),
        *("--mixed", "--tiny", "--mixed-requests", "6"),
        out=tmp_path / "t.json",
    )
    closed, mixed = rows[:4], rows[4:]
    assert [r["mode"] for r in closed] == [
        "(a) service, continuous",
        "(a') service, static",
        "(b) service, one at a time",
        "(c) offline generate",
    ]
    printed = table_rows(stdout, "(")[:4]
    for row, cells in zip(closed, printed, strict=True):
        assert cells[0] == row["mode"]
        assert float(cells[1]) == pytest.approx(row["audio_per_s"], abs=0.051)
        assert row["audio_per_s"] > 0
    assert closed[2]["mean_batch"] == 1.0  # (b) really is one at a time
    assert closed[0]["stages"]["encoder"] > 0  # the stage breakdown came from /metrics
    assert closed[1]["stages"]["encoder"] > 0
    ratios = re.search(
        r"\(a\)/\(c\) throughput: ([\d.]+)x\s+\(a\)/\(b\) throughput: ([\d.]+)x\s+"
        r"\(a\)/\(a'\) throughput: ([\d.]+)x",
        stdout,
    )
    assert ratios is not None, stdout
    a, static, b, c = (r["audio_per_s"] for r in closed)
    assert float(ratios.group(1)) == pytest.approx(a / c, abs=0.006)
    assert float(ratios.group(2)) == pytest.approx(a / b, abs=0.006)
    assert float(ratios.group(3)) == pytest.approx(a / static, abs=0.006)
    # (d): both modes at each load; only the continuous service takes decoder steps
    assert [(r["mode"], r["load"]) for r in mixed] == [
        (mode, load) for mode in ("(d) continuous", "(d) static") for load in (0.5, 0.9, 1.2)
    ]
    for row in mixed:
        assert row["requests_per_s"] > 0
        assert row["p95_all"] > 0
        assert row["p95_short"] > 0
        stepped = row["mode"] == "(d) continuous"
        assert (row["rows_per_step"] is not None) == stepped
        if stepped:
            assert row["rows_per_step"] >= 1
            assert row["step_total_s"] >= row["step_model_s"] > 0
    assert len(table_rows(stdout, "(d)")) == 6


def test_stream_reports_latencies_and_exact_finals(tmp_path: Path) -> None:
    stdout, rows = run(
        "bench.stream", "--sessions", "1", "--seconds-per-session", "4", out=tmp_path / "s.json"
    )
    (row,) = rows
    assert row["sessions"] == 1
    assert row["finals"] == row["phrases"] >= 2
    assert row["exact_finals"] == row["finals"]  # the bundled model's finals are word-exact
    assert row["errors"] == 0
    assert row["uncovered_frames"] == 0
    assert 0 < row["final_p50"] <= row["final_p95"]
    assert math.isfinite(row["partial_p95"])
    (cells,) = table_rows(stdout, "1")
    assert float(cells[3]) == pytest.approx(row["final_p50"], abs=0.0006)
    assert cells[6] == f"{row['sessions_ok']}/{row['sessions']}"


def test_long_audio_segments_match_the_utterances(tmp_path: Path) -> None:
    stdout, report = run(
        "bench.long_audio",
        *("--minutes", "0.5", "--concurrency", "2", "--repeats", "1"),
        out=tmp_path / "l.json",
    )
    count = report["utterances"]
    assert count >= 8
    assert report["segments_timed_within_tolerance"] == count
    assert report["texts_agreeing"] == count
    assert report["repeats_identical"]
    assert [r["count"] for r in report["rows"]] == [count, count]
    ratio = re.search(r"\(a\)/\(b\) throughput \(audio s/s\): ([\d.]+)x", stdout)
    assert ratio is not None, stdout
    a, b = (r["audio_per_s"] for r in report["rows"])
    assert float(ratio.group(1)) == pytest.approx(a / b, abs=0.006)


def test_stream_realtime_sessions_account_for_every_phrase(tmp_path: Path) -> None:
    stdout, rows = run(
        "bench.stream",
        *("--protocol", "realtime", "--sessions", "2", "--seconds-per-session", "5"),
        out=tmp_path / "r.json",
    )
    (row,) = rows
    assert row["sessions"] == 2
    assert row["completed"] == row["phrases"] >= 4  # one completed per phrase, none lost
    assert row["sessions_ok"] == 2
    assert row["equal_to_upload"] == row["phrases"]  # each transcript equals its upload
    assert row["errors"] == 0
    assert row["early_delta_share"] > 0  # some text came while the speaker was talking
    assert 0 < row["completed_p50"] <= row["completed_p95"] <= row["speech_end_p95"]
    assert 0 < row["delta_p50"] <= row["delta_p95"]
    (cells,) = table_rows(stdout, "2")
    assert float(cells[2]) == pytest.approx(row["delta_p95"], abs=0.0006)
    assert float(cells[4]) == pytest.approx(row["completed_p95"], abs=0.0006)
    assert cells[8] == f"{row['equal_to_upload']}/{row['phrases']}"
    assert "target: 16 concurrent real-time Realtime sessions" in stdout


def test_attacks_reports_each_attack(tmp_path: Path) -> None:
    """A small run (2-minute files, 3 long uploads, 2 s of short uploads per attack)."""
    args = ("--minutes", "2", "--uploads", "3", "--seconds", "2", "--long-timeout", "30")
    stdout, report = run("bench.attacks", *args, out=tmp_path / "attacks.json")
    assert len(table_rows(stdout, "none (baseline)")) == 1, stdout
    assert len(table_rows(stdout, "3 long uploads")) == 1, stdout
    assert len(table_rows(stdout, "6 slow decodes")) == 1, stdout
    assert len(table_rows(stdout, "8 greedy streams")) == 1, stdout
    assert sum(report["long_uploads"]["statuses"].values()) == 3
    assert report["long_uploads"]["peak_rss_mb"] >= report["long_uploads"]["rss_before_mb"]
    assert sum(report["slow_decodes"]["slow_statuses"].values()) == 6
    for name in ("baseline", "slow_decodes", "streams"):
        assert report[name]["statuses"].get("200", 0) >= 1, report[name]
        assert report[name]["p50_s"] <= report[name]["p99_s"] <= report[name]["max_s"]
    assert len(report["streams"]["partials_per_session"]) == 8


def test_stream_agreement_compares_stream_finals_with_uploads(tmp_path: Path) -> None:
    from model_store.multisynth import Mix, synthesize

    corpus = tmp_path / "corpus"
    for mix in (
        Mix("test_espeak", espeak=3, espeak_group="test", wpm=(100, 240), condition="light"),
        Mix("test_flite", flite=3, condition="light", seed=3),
        Mix("test_nonspeech", empty=2, condition="light", seed=4),
    ):
        synthesize(mix, corpus, workers=1)
    stdout, result = run(
        "bench.stream_agreement", "--corpus", str(corpus), "--count", "6", out=tmp_path / "a.json"
    )
    assert result["utterances"] == 6
    assert result["equal"] == 6 - len(result["disagreements"])
    assert result["equal_share"] == pytest.approx(result["equal"] / 6, abs=1e-4)
    assert result["nonspeech_clips"] == 2
    for d in result["disagreements"]:
        assert d["upload"] != d["stream"]
    assert json.loads(stdout[: stdout.index("}") + 1])["equal"] == result["equal"]


def test_fastpath_prints_offline_and_service_rows_side_by_side(tmp_path: Path) -> None:
    stdout, rows = run(
        "bench.fastpath",
        "throughput",
        *("--skip-base-size", "--requests", "4", "--concurrency", "2", "--repeats", "1"),
        *("--max-seconds", "2", "--modes", "eager fp32"),
        out=tmp_path / "f.json",
    )
    assert [(r["clips"], r["mode"]) for r in rows] == [
        ("1-2 s", "offline eager fp32"),
        ("1-2 s", "service (defaults)"),
        ("1-3 s", "offline eager fp32"),
        ("1-3 s", "service (defaults)"),
    ]
    printed = table_rows(stdout, "w2v2-bert-commands-en")
    assert len(printed) == 4
    for row, cells in zip(rows, printed, strict=True):
        assert float(cells[3]) == pytest.approx(row["audio_per_s"], abs=0.051)
        assert row["audio_per_s"] > 0
    assert rows[0]["same_tokens"] == 1.0  # the reference row against itself
    assert rows[1]["client_cpu_s"] > 0  # the load generator's own cost is reported
    assert rows[1]["compiles"] == 0  # the default compiles nothing
