"""Monitoring proven with the real thing: Debian's Prometheus scrapes a live server with the
repository's scrape config (only the target and the interval changed), known traffic is sent,
and every query of the provisioned Grafana dashboard is evaluated through Prometheus' HTTP API.
Each query has an expectation here (a new panel without one fails the test)."""

import asyncio
import json
import math
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from websockets.asyncio.client import connect

from service.api.app import create_app
from service.settings import DEFAULT_MODEL_DIR, Settings
from tests.conftest import LiveServer, encode, speak
from tests.test_dashboard import PROMETHEUS, query_panels

pytestmark = pytest.mark.slow

UPLOADS = 6
WINDOW = "5m"  # stands for Grafana's $__rate_interval: covers all the traffic of the test
Result = list[dict[str, Any]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prometheus:
    """`prometheus` on loopback with the repository's scrape config aimed at `target`."""

    def __init__(self, target: str, root: Path) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("Prometheus is required: apt-get install -y prometheus")
        config = yaml.safe_load(PROMETHEUS.read_text())
        config["global"]["scrape_interval"] = "1s"
        config["global"]["evaluation_interval"] = "1s"
        config["global"]["scrape_timeout"] = "1s"
        for job in config["scrape_configs"]:
            job["scrape_interval"] = "1s"
            job["scrape_timeout"] = "1s"
            job["static_configs"] = [{"targets": [target]}]
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("Prometheus did not become ready")
            time.sleep(0.2)

    def wait_for_first_scrape(self) -> None:
        deadline = time.monotonic() + 60
        while not self.query("up == 1"):
            assert time.monotonic() < deadline, "Prometheus never scraped the service"
            time.sleep(0.2)

    def query(self, expr: str) -> Result:
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", (expr, answer)
        return list(answer["data"]["result"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def values(result: Result) -> list[float]:
    return [float(series["value"][1]) for series in result]


def one(result: Result) -> float:
    assert len(result) == 1, result
    return values(result)[0]


def labels(result: Result, name: str) -> set[str]:
    return {series["metric"].get(name, "") for series in result}


def positive(result: Result) -> bool:
    return bool(result) and all(v > 0 and math.isfinite(v) for v in values(result))


def empty_or_zero(result: Result) -> bool:
    return all(v == 0 for v in values(result))


# What each dashboard query must return after the traffic below: 6 good uploads, two undecodable
# uploads (an empty WAV: 400 bad_audio), two stream sessions with a spoken phrase, one CPU worker.
EXPECTED: dict[str, Callable[[Result], bool]] = {
    "stt_model_info": lambda r: labels(r, "model") == {"w2v2-bert-commands-en"},
    'sum(rate(stt_requests_total{endpoint!~"/metrics|/health|/ready"}[W]))': positive,
    '(sum(rate(stt_requests_total{endpoint!~"/metrics|/health|/ready", status=~"5.."}[W])) '
    'or vector(0)) / sum(rate(stt_requests_total{endpoint!~"/metrics|/health|/ready"}[W]))': (
        lambda r: one(r) == 0
    ),
    'histogram_quantile(0.95, sum by (le) (rate(stt_request_duration_seconds_bucket{endpoint!~"'
    '/metrics|/health|/ready"}[W])))': positive,
    "sum(stt_worker_up)": lambda r: one(r) == 1,
    'sum by (status) (rate(stt_requests_total{endpoint!~"/metrics|/health|/ready"}[W]))': (
        lambda r: labels(r, "status") == {"200", "400"} and positive(r)
    ),
    "sum(rate(stt_audio_seconds_total[W]))": positive,
    "sum(rate(stt_generated_tokens_total[W]))": positive,
    "stt_worker_up": lambda r: len(r) == 1 and one(r) == 1,
    "sum(stt_queue_depth)": lambda r: one(r) == 0,
    "sum(stt_queued_audio_seconds)": lambda r: one(r) == 0,
    "sum(rate(stt_batch_size_sum[W])) / sum(rate(stt_batch_size_count[W]))": (
        lambda r: 1 <= one(r) <= 16
    ),
    "ceil(histogram_quantile(0.95, sum by (le) (rate(stt_batch_size_bucket[W]))))": (
        lambda r: 1 <= one(r) <= 16
    ),
    "sum(rate(stt_batch_padding_ratio_sum[W])) / sum(rate(stt_batch_padding_ratio_count[W]))": (
        lambda r: 0 <= one(r) < 1
    ),
    "histogram_quantile(0.95, sum by (le) (rate(stt_batch_padding_ratio_bucket[W])))": (
        lambda r: 0 <= one(r) <= 1
    ),
    "sum by (reason) (rate(stt_rejections_total[W]))": (
        lambda r: labels(r, "reason") == {"bad_audio"} and positive(r)
    ),
    # nothing was cancelled, no batch failed, no worker restarted, and there is no CUDA device
    "sum by (reason) (rate(stt_cancellations_total[W]))": empty_or_zero,
    "sum by (error) (rate(stt_batch_failures_total[W]))": empty_or_zero,
    "sum(rate(stt_worker_restarts_total[W]))": empty_or_zero,
    "stt_cuda_memory_allocated_bytes": lambda r: r == [],
    "stt_cuda_memory_reserved_bytes": lambda r: r == [],
    "sum by (stage) (rate(stt_stage_duration_seconds_sum[W]))": (
        lambda r: {"decode", "features", "encoder", "decoding", "detokenize"} <= labels(r, "stage")
    ),
    "sum by (stage) (rate(stt_stage_duration_seconds_sum[W])) / sum by (stage) "
    "(rate(stt_stage_duration_seconds_count[W]))": (
        lambda r: {"features", "encoder", "decoding"} <= labels(r, "stage") and positive(r)
    ),
    "histogram_quantile(0.95, sum by (stage, le) (rate(stt_stage_duration_seconds_bucket[W])))": (
        lambda r: {"features", "encoder", "decoding"} <= labels(r, "stage") and positive(r)
    ),
    "sum by (replica, worker, device) (rate(stt_worker_busy_seconds_total[W]))": (
        lambda r: labels(r, "device") == {"cpu"} and positive(r) and max(values(r)) <= 1.01
    ),
    "sum by (replica, worker, device) (rate(stt_worker_batches_total[W]))": (
        lambda r: labels(r, "device") == {"cpu"} and positive(r)
    ),
    "stt_event_loop_tasks": positive,
    "stt_threads": positive,
    "sum(stt_streams_active)": lambda r: one(r) == 0,
    "sum(rate(stt_streams_opened_total[W]))": positive,
    # the traffic has ended: no upload is decoding or holds audio any more
    "sum by (lane) (stt_decodes_pending)": empty_or_zero,
    "sum(stt_inflight_audio_seconds)": lambda r: one(r) == 0,
    "sum by (reason) (rate(stt_streams_closed_total[W]))": (
        lambda r: labels(r, "reason") == {"end"} and positive(r)
    ),
    # defaults: STT_COMPILE=off compiles nothing, STT_BATCHING=static takes no decoder step
    "rate(stt_compiles_total[W])": lambda r: len(r) == 1 and empty_or_zero(r),
    "rate(stt_compile_seconds_total[W])": lambda r: len(r) == 1 and empty_or_zero(r),
    "rate(stt_compile_eager_calls_total[W])": lambda r: len(r) == 1 and empty_or_zero(r),
    "sum by (cache, result) (rate(stt_compile_cache_lookups_total[W]))": empty_or_zero,
    "sum by (part) (rate(stt_decoder_step_duration_seconds_sum[W]))": empty_or_zero,
    "sum(rate(stt_decoder_step_rows_sum[W])) / sum(rate(stt_decoder_step_rows_count[W]))": (
        lambda r: all(math.isnan(v) for v in values(r))  # no step: no rows per step
    ),
    "sum(rate(stt_rows_joined_total[W]))": empty_or_zero,
    "sum by (reason) (rate(stt_rows_left_total[W]))": empty_or_zero,
}


def expected_for(expr: str) -> Callable[[Result], bool] | None:
    key = expr.replace("[$__rate_interval]", "[W]")
    if key in EXPECTED:
        return EXPECTED[key]
    if key.startswith("histogram_quantile("):  # latency quantiles: finite and positive
        return positive
    return None


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    settings = Settings(model_dir=DEFAULT_MODEL_DIR, cpu_workers=1)
    phrase = speak("turn on the lights")
    with LiveServer(create_app(settings)) as server:
        prometheus = Prometheus(server.url.removeprefix("http://"), tmp_path_factory.mktemp("p"))
        try:
            prometheus.wait_for_first_scrape()
            # Counters appear at their first increment, so a rate needs two scrapes that see an
            # event each: every kind of traffic is sent at least twice, over several scrapes.
            empty = encode(phrase[:0], 22_050)  # a well-formed WAV with no samples
            with httpx.Client(base_url=server.url, timeout=60) as client:
                for index in range(UPLOADS):
                    wav = encode(phrase, 22_050)
                    answer = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav)})
                    assert answer.json()["text"] == "turn on the lights"
                    if index in (1, 4):
                        bad = client.post(
                            "/v1/audio/transcriptions", files={"file": ("a.wav", empty)}
                        )
                        assert bad.status_code == 400
                        assert bad.json()["error"]["code"] == "bad_audio"
                    if index in (2, 5):
                        asyncio.run(_stream(server.url, phrase))
                    time.sleep(1.2)
            # wait until Prometheus has scraped the final state
            expected = UPLOADS + 2
            deadline = time.monotonic() + 60
            query = 'sum(stt_requests_total{endpoint="/v1/audio/transcriptions"})'
            while values(prometheus.query(query)) != [expected]:
                assert time.monotonic() < deadline, prometheus.query(query)
                time.sleep(0.5)
            time.sleep(2)  # two more scrapes: the stream's close and the gauges settle
            yield prometheus
        finally:
            prometheus.stop()


async def _stream(url: str, phrase: Any) -> None:
    pcm = (phrase * 32767).astype("<i2").tobytes() + bytes(22_050 * 2)
    async with connect(url.replace("http", "ws") + "/v1/audio/stream?sample_rate=22050") as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        step = 22_050 * 2 // 10
        for start in range(0, len(pcm), step):  # in real time, so that partials are made
            await ws.send(pcm[start : start + step])
            await asyncio.sleep(0.1)
        await ws.send(json.dumps({"type": "end"}))
        finals = [e for e in [json.loads(m) async for m in ws] if e["type"] == "transcript.final"]
    assert [f["text"] for f in finals] == ["turn on the lights"]


def test_prometheus_scrapes_the_service(scraped: Prometheus) -> None:
    (target,) = httpx.get(f"{scraped.url}/api/v1/targets").json()["data"]["activeTargets"]
    assert target["health"] == "up", target
    assert target["labels"]["job"] == "speech-serve"


@pytest.mark.parametrize(
    "panel_expr",
    [(p["title"], t["expr"]) for p in query_panels() for t in p["targets"]],
    ids=lambda pe: pe[0],
)
def test_every_dashboard_query_returns_what_the_traffic_implies(
    panel_expr: tuple[str, str], scraped: Prometheus
) -> None:
    title, expr = panel_expr
    check = expected_for(expr)
    assert check is not None, f"panel {title!r}: no expectation for {expr!r}: add one here"
    result = scraped.query(expr.replace("$__rate_interval", WINDOW))
    assert check(result), (title, expr, result)
