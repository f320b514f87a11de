"""Short runs of the soak and overload scripts (`bench/soak.py`, `bench/overload.py`).

Each script runs once per module as a subprocess (the bundled model, a real `python -m service`)
and writes its figures as JSON; each test asserts one property on those figures, so a failure
names the property and its numbers. The full-size runs are `python -m bench.soak` and
`python -m bench.overload` with their defaults. Together these take about 45 s on 2 cores.
"""

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

SOAK = ["--requests", "300", "--concurrency", "32", "--streams", "2"]
DEADLINE = 3.0  # the overload run's server deadline (STT_REQUEST_TIMEOUT_S)
MARGIN = 0.5
OVERLOAD = ["--seconds", "6", "--capacity-seconds", "3", "--deadline", str(DEADLINE)]
OVERLOAD += ["--margin", str(MARGIN)]


def run_script(module: str, args: list[str], out: Path) -> dict[str, Any]:
    """Run `python -m <module> <args> --json <out>`; its figures, with its output and status."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    if not out.exists():
        raise AssertionError(f"{module} wrote no figures:\n{done.stdout}\n{done.stderr[-4000:]}")
    report: dict[str, Any] = json.loads(out.read_text())
    report["_returncode"] = done.returncode
    report["_stdout"] = done.stdout
    return report


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_script("bench.soak", SOAK, tmp_path_factory.mktemp("soak") / "soak.json")


@pytest.fixture(scope="module")
def overload(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("overload") / "overload.json"
    return run_script("bench.overload", OVERLOAD, out)


# ---------------------------------------------------------------------------------------------
# soak


def test_soak_answers_every_request_exactly_once(soak: dict[str, Any]) -> None:
    assert soak["sent"] == 300
    assert sum(soak["by_status"].values()) == 300, soak["by_status"]
    assert soak["transport_errors"] == 0
    assert soak["answered"] == 300
    # the server counted one answer per request, status by status
    assert soak["server_by_status"] == soak["by_status"]
    assert soak["good_ok"] + soak["good_shed"] + soak["bad_ok"] == 300
    assert soak["held_concurrency_max"] == 32


def test_soak_answers_are_right(soak: dict[str, Any]) -> None:
    # good uploads: 200 with the transcript the sample gets alone; bad: documented 4xx + code
    assert soak["wrong"] == 0, soak["wrong_examples"]
    assert soak["shed_without_retry_after"] == 0
    assert soak["good_ok"] > 200  # the mix is mostly good uploads
    assert soak["bad_ok"] > 30
    statuses = {status for counts in soak["by_kind"].values() for status in counts}
    assert statuses <= {"200", "400", "404", "429", "503"}, soak["by_kind"]


def test_soak_streams_alongside_end_cleanly(soak: dict[str, Any]) -> None:
    assert soak["streams_failed"] == 0, soak["stream_failures"]
    assert soak["streams_completed"] >= 2
    assert soak["stream_finals"] >= 2 * soak["streams_completed"]  # two phrases per session


def test_soak_leaves_no_leak(soak: dict[str, Any]) -> None:
    assert soak["queue_after"] == 0
    assert soak["streams_active_after"] == 0
    assert soak["rss_growth_pct"] <= 10.0, (soak["rss_start_mb"], soak["rss_end_mb"])
    assert soak["threads_after"] <= soak["threads_before"]
    assert soak["tasks_after"] <= soak["tasks_before"] + 3


def test_soak_passes(soak: dict[str, Any]) -> None:
    assert soak["passed"], soak["_stdout"]
    assert soak["_returncode"] == 0


# ---------------------------------------------------------------------------------------------
# overload


def phases(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    capacity, overloaded, recovery = report["phases"]
    return {"capacity": capacity, "overload": overloaded, "recovery": recovery}


def test_overload_answers_every_request(overload: dict[str, Any]) -> None:
    for name, phase in phases(overload).items():
        assert phase["transport_errors"] == 0, name
        answered = phase["ok"] + phase["shed_429"] + phase["shed_503"]
        answered += sum(phase["server_errors"].values()) + sum(phase["other_statuses"].values())
        assert answered == phase["sent"], (name, phase)


def test_overload_sheds_with_retry_after(overload: dict[str, Any]) -> None:
    phase = phases(overload)["overload"]
    assert phase["offered_rate"] > 3 * overload["capacity_rps"]
    assert phase["shed_429"] + phase["shed_503"] > 0
    for name, phase in phases(overload).items():
        assert phase["shed_with_retry_after"] == phase["shed_429"] + phase["shed_503"], name


def test_overload_accepted_requests_finish_within_the_deadline(overload: dict[str, Any]) -> None:
    for name, phase in phases(overload).items():
        if phase["ok"]:
            assert phase["accepted_p99_s"] <= DEADLINE + MARGIN, name


def test_overload_rejects_fast(overload: dict[str, Any]) -> None:
    for name, phase in phases(overload).items():
        if phase["shed_429"] + phase["shed_503"]:
            # refusals come before the body is read (p50: a few ms); the p99 is the event loop
            # waiting for the GIL behind the workers' Python and the decoding threads, on two
            # cores shared with a load generator at 4x capacity: bound it by a third of the 3 s
            # deadline, the point being that a refused client learns long before an accepted
            # one is answered
            if phase["shed_429"] + phase["shed_503"] >= 100:  # a median of a few is noise
                assert phase["reject_p50_ms"] < 250, name
            assert phase["reject_p99_ms"] < 1000, (name, phase["reject_p50_ms"])


def test_overload_gives_no_5xx_but_503(overload: dict[str, Any]) -> None:
    # the deadline covers waiting for a decode slot and decoding (issue 22), so an upload
    # admitted early may still expire there: a few 504s, never another 5xx
    for name, phase in phases(overload).items():
        errors = dict(phase["server_errors"])
        expired = errors.pop("504 deadline_exceeded", 0)
        assert errors == {}, (name, phase["server"])
        assert expired <= 0.1 * max(1, phase["ok"] + expired), (name, phase["server"])


def test_overload_keeps_serving_near_capacity(overload: dict[str, Any]) -> None:
    phase = phases(overload)["overload"]
    assert phase["accepted_rate"] >= 0.5 * overload["capacity_rps"], phase["server"]


def test_overload_recovers(overload: dict[str, Any]) -> None:
    recovery = phases(overload)["recovery"]
    assert recovery["success_ratio_settled"] >= 0.99
    assert recovery["settled_throughput"] >= 0.9 * recovery["settled_offered_rate"]
    assert not math.isnan(recovery["accepted_p99_s"])
    assert recovery["accepted_p99_s"] <= DEADLINE + MARGIN


def test_overload_passes(overload: dict[str, Any]) -> None:
    assert overload["passed"], overload["_stdout"]
    assert overload["_returncode"] == 0
    assert overload["exit_code"] in (0, -15)
