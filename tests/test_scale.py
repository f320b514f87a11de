"""The service on Ray Serve (`python -m service.scale`), on a local Ray cluster this module starts.

One cluster for the whole module, bound to loopback and stopped at the end (only the cluster
this process started: `ray.shutdown()`, never a machine-wide `ray stop`). One deployment,
scaled between 1 and 2 replicas, serves every test: a load step scales it up and spreads the
traffic over both replicas, idleness scales it back down, a replica is killed under load,
a websocket session and the error shapes go through Ray's proxy, and the proxy's queue refuses
with 429 and Retry-After when every replica is full; Debian's Prometheus scrapes every replica
through the targets file the service writes (service/deploy/ray/prometheus.yml).
"""

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

# Ray reads this when imported: with it, Ray uses loopback for this node instead of the
# machine's outside address (nothing here is reachable from another host).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
import ray
from ray import serve

from tests.api.test_stream import RATE, pcm16, spoken, stream_audio

APP = "speech-serve"
REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "model_store/w2v2-bert-commands-en/samples/06-turn-on-the.wav"
SAMPLE_TEXT = "turn on the lights"
BATCH = 4  # STT_MAX_BATCH_SIZE of each replica
STREAMS = 2  # STT_MAX_STREAMS of each replica
SLOTS = 2 * BATCH + STREAMS  # max_ongoing_requests by the default rule
QUEUED = 2 * BATCH * 2  # max_queued_requests by the default rule (two batches per replica)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    url: str
    targets_file: Path

    def running_count(self) -> int:
        """Replicas Serve itself reports RUNNING."""
        status = serve.status().applications[APP].deployments["speech"]
        states = {getattr(k, "value", str(k)): v for k, v in status.replica_states.items()}
        return int(states.get("RUNNING", 0))

    def targets(self) -> dict[str, str]:
        """replica id -> metrics address, as the service wrote them for Prometheus."""
        groups = json.loads(self.targets_file.read_text())
        return {g["labels"]["replica"]: g["targets"][0] for g in groups}


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from ray._private import ray_constants

    assert not ray_constants.ENABLE_RAY_CLUSTER, "ray was imported before this module"
    work = tmp_path_factory.mktemp("ray")
    env = {
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "service.scale.proxy:middlewares",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    with pytest.MonkeyPatch.context() as patch:
        # the cluster's processes (proxy, replicas) inherit this process's environment
        for name, value in env.items():
            patch.setenv(name, value)
        ray.init(
            address="local",  # a new cluster, whatever else runs on this machine
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            num_cpus=4,
            _temp_dir=str(work),
            log_to_driver=False,
        )
    port = free_port()
    targets_file = work / "targets.json"
    log = (work / "scale.log").open("w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.scale",
            "--address",
            ray.get_runtime_context().gcs_address,
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--targets-file",
            str(targets_file),
            "--min-replicas",
            "1",
            "--max-replicas",
            "2",
            "--target-ongoing-requests",
            "2",
            "--upscale-delay-s",
            "1",
            "--downscale-delay-s",
            "3",
        ],
        env={
            **os.environ,
            **env,
            "STT_MAX_BATCH_SIZE": str(BATCH),
            "STT_MAX_STREAMS": str(STREAMS),
            "STT_DRAIN_TIMEOUT_S": "2",
        },
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    try:
        wait_for(
            "python -m service.scale to say ready",
            lambda: proc.poll() is not None or "ready: http://" in Path(log.name).read_text(),
            timeout=180,
        )
        assert proc.poll() is None, Path(log.name).read_text()[-3000:]
        yield Cluster(url=f"http://127.0.0.1:{port}", targets_file=targets_file)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        ray.shutdown()  # stops the local cluster this module started, and only it


@pytest.fixture(scope="module")
def prometheus(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's `prometheus` with the repository's Ray scrape config (service/deploy/ray/),
    reading the targets file the service writes; yields its URL."""
    binary = shutil.which("prometheus")
    assert binary, "Prometheus is required: apt-get install -y prometheus"
    root = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((REPO / "service/deploy/ray/prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    (job,) = config["scrape_configs"]
    job["file_sd_configs"][0].update(files=[str(cluster.targets_file)], refresh_interval="1s")
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address={address}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://{address}"
    finally:
        proc.terminate()
        proc.wait(30)


def promql(url: str, expr: str) -> dict[str, float]:
    """`expr`'s value per `replica` label, from Prometheus (empty while it is not up)."""
    try:
        answer = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5).json()
    except httpx.TransportError:
        return {}
    return {r["metric"].get("replica", ""): float(r["value"][1]) for r in answer["data"]["result"]}


@dataclass
class Load:
    """Closed-loop upload clients; every request sent is accounted for in `answers`."""

    url: str
    clients: int
    answers: list[tuple[int, dict | str, str | None]] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    sent: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        audio = SAMPLE.read_bytes()
        async with httpx.AsyncClient(timeout=60) as client:

            async def one_client() -> None:
                while not stop.is_set():
                    self.sent += 1
                    try:
                        r = await client.post(
                            self.url + "/v1/audio/transcriptions",
                            files={"file": ("a.wav", audio, "audio/wav")},
                        )
                    except httpx.HTTPError as exc:
                        self.lost.append(repr(exc))
                        continue
                    body = (
                        r.json() if r.headers.get("content-type") == "application/json" else r.text
                    )
                    self.answers.append((r.status_code, body, r.headers.get("retry-after")))

            await asyncio.gather(*(one_client() for _ in range(self.clients)))

    def statuses(self) -> Counter[int]:
        return Counter(status for status, _, _ in self.answers)


async def load_until(
    cluster: Cluster, clients: int, done: Callable[[], bool], timeout: float, then: float = 0.0
) -> Load:
    """Run `clients` closed-loop clients until `done()` holds (checked off the loop), then
    `then` seconds more."""
    load = Load(cluster.url, clients)
    stop = asyncio.Event()
    task = asyncio.create_task(load.run(stop))
    try:
        await asyncio.to_thread(wait_for, "the load's effect", done, timeout)
        await asyncio.sleep(then)
    finally:
        stop.set()
        await task
    return load


def stt_requests(address: str, status: str = "200") -> float:
    """Uploads a replica answered with `status`, from its own metrics endpoint."""
    text = httpx.get(f"http://{address}/metrics", timeout=10).text
    pattern = (
        r'^stt_requests_total\{endpoint="/v1/audio/transcriptions",response_format="json",'
        rf'status="{status}"\}} ([0-9.e+]+)$'
    )
    return sum(float(m) for m in re.findall(pattern, text, flags=re.M))


@pytest.mark.slow
def test_load_step_scales_out_spreads_traffic_and_scales_back(
    cluster: Cluster, prometheus: str
) -> None:
    wait_for("one replica at rest", lambda: cluster.running_count() == 1, 60)
    wait_for("Prometheus to scrape the replica", lambda: bool(promql(prometheus, "up == 1")), 60)
    (only,) = cluster.targets()
    before = {only: stt_requests(cluster.targets()[only])}
    started = time.monotonic()
    load = asyncio.run(
        load_until(
            cluster, clients=8, done=lambda: len(cluster.targets()) == 2, timeout=90, then=3.0
        )
    )
    scaled_out_s = time.monotonic() - started - 3.0
    assert cluster.running_count() == 2
    assert not load.lost
    assert load.statuses()[200] == len(load.answers), load.statuses()
    assert all(body["text"] == SAMPLE_TEXT for _, body, _ in load.answers)  # type: ignore[index]
    served = {
        replica: stt_requests(address) - before.get(replica, 0.0)
        for replica, address in cluster.targets().items()
    }
    # the replicas' own counters account for every answer, and both took a share
    assert sum(served.values()) == len(load.answers)
    assert all(count > 0 for count in served.values()), served
    # Prometheus has each replica's own counters, labelled by replica
    ok = 'sum by (replica) (stt_requests_total{endpoint="/v1/audio/transcriptions",status="200"})'
    totals = {replica: stt_requests(address) for replica, address in cluster.targets().items()}
    wait_for(
        "Prometheus to see both replicas' counts", lambda: promql(prometheus, ok) == totals, 30
    )
    print(f"scaled 1 -> 2 in {scaled_out_s:.1f} s under 8 clients; answers by replica {served}")


@pytest.mark.slow
def test_replica_killed_under_load_answers_or_503_and_is_replaced(cluster: Cluster) -> None:
    async def scenario() -> tuple[Load, str]:
        load = Load(cluster.url, clients=8)
        stop = asyncio.Event()
        task = asyncio.create_task(load.run(stop))
        try:
            await asyncio.to_thread(
                wait_for, "two replicas", lambda: len(cluster.targets()) == 2, 90
            )
            victim = sorted(cluster.targets())[0]
            served_before = len(load.answers)
            await asyncio.to_thread(
                wait_for,
                "answers after the scale-out",
                lambda: len(load.answers) > served_before + 8,
                30,
            )
            (name,) = [
                a["name"]
                for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::") and a["name"].endswith(victim)
            ]
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            # keep the load on while Serve replaces it
            await asyncio.to_thread(
                wait_for,
                "a replacement replica",
                lambda: victim not in cluster.targets() and len(cluster.targets()) == 2,
                90,
            )
        finally:
            stop.set()
            await task
        return load, victim

    load, victim = asyncio.run(scenario())
    assert not load.lost, load.lost[:3]
    assert len(load.answers) == load.sent
    statuses = load.statuses()
    assert set(statuses) <= {200, 503}, statuses
    for status, body, retry_after in load.answers:
        if status == 200:
            assert body["text"] == SAMPLE_TEXT  # type: ignore[index]
        else:
            assert body["error"]["code"] == "unavailable"  # type: ignore[index]
            assert retry_after is not None
    assert victim not in cluster.targets()
    print(f"replica killed under 8 clients: {dict(statuses)}")
    started = time.monotonic()
    wait_for("scale back to one replica", lambda: len(cluster.targets()) == 1, 60)
    wait_for("Serve to report one replica", lambda: cluster.running_count() == 1, 30)
    print(f"scaled 2 -> 1 in {time.monotonic() - started:.1f} s after the load stopped")


@pytest.mark.slow
def test_websocket_session_through_the_proxy(cluster: Cluster) -> None:
    speech = spoken(("turn on the lights", "three four five"))
    url = cluster.url.replace("http://", "ws://") + f"/v1/audio/stream?sample_rate={RATE}"
    events, _ = asyncio.run(stream_audio(url, pcm16(speech.audio), frame_bytes=2 * RATE // 50))
    finals = [e["text"] for _, e in events if e["type"] == "transcript.final"]
    assert finals == ["turn on the lights", "three four five"]


@pytest.mark.slow
def test_realtime_session_through_the_proxy_with_the_official_client(cluster: Cluster) -> None:
    """OpenAI Realtime transcription (the `openai` SDK's `realtime.connect`) via Ray's proxy."""
    from tests.api.test_realtime import (
        COMPLETED,
        client_for,
        count,
        events_until,
        pcm24,
        send_audio,
    )
    from tests.conftest import speak

    quiet = np.zeros(int(0.4 * 22_050), np.float32)  # the bundled model wants quiet around speech
    phrases = ("turn on the lights", "three four five")

    async def scenario() -> list[dict[str, Any]]:
        async with client_for(cluster).realtime.connect(  # type: ignore[arg-type]
            model="", extra_query={"intent": "transcription"}
        ) as conn:
            await conn.session.update(
                session={"type": "transcription", "audio": {"input": {"turn_detection": None}}}
            )
            for text in phrases:
                await send_audio(conn, pcm24(np.concatenate([quiet, speak(text), quiet])), False)
                await conn.input_audio_buffer.commit()
            return await events_until(conn, lambda ev: count(COMPLETED)(ev) == 2)

    events = asyncio.run(scenario())
    assert [e["type"] for e in events][:2] == ["session.created", "session.updated"]
    assert [e["transcript"] for e in events if e["type"] == COMPLETED] == list(phrases)


@pytest.mark.slow
def test_uploads_sse_and_errors_keep_their_shape_through_the_proxy(cluster: Cluster) -> None:
    audio = SAMPLE.read_bytes()
    with httpx.Client(base_url=cluster.url, timeout=60) as client:
        r = client.post(
            "/v1/audio/transcriptions",
            files={"file": ("a.wav", audio)},
            data={"model": "nope"},
        )
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"
        assert r.json()["error"]["param"] == "model"
        r = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"not audio")})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "unsupported_media_type"
        with client.stream(
            "POST",
            "/v1/audio/transcriptions",
            files={"file": ("a.wav", audio)},
            data={"stream": "true"},
        ) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1]["type"] == "transcript.text.done"
        assert events[-1]["text"] == SAMPLE_TEXT
        assert "".join(e["delta"] for e in events[:-1]) == SAMPLE_TEXT


@pytest.mark.slow
def test_full_proxy_queue_refuses_with_429_and_retry_after(cluster: Cluster) -> None:
    """More uploads at once than every replica's slots plus the proxy's queue: the rest are
    refused at once in the error shape, never queued without bound."""
    audio = SAMPLE.read_bytes()
    burst = 2 * (SLOTS + QUEUED) + 8

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=burst)) as c:
            return await asyncio.gather(
                *(
                    c.post(
                        cluster.url + "/v1/audio/transcriptions", files={"file": ("a.wav", audio)}
                    )
                    for _ in range(burst)
                )
            )

    responses = asyncio.run(fire())
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[429] >= 1, statuses
    for r in responses:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "queue_full"
            assert int(r.headers["retry-after"]) >= 1
        else:
            assert r.json()["text"] == SAMPLE_TEXT
    print(f"burst of {burst}: {dict(statuses)}")


# Without a cluster: the config file and the proxy middleware.


def test_the_serve_config_is_valid_and_builds_the_app() -> None:
    from ray.serve.schema import ServeDeploySchema

    from service.scale.deployment import ScaleOptions, build_app

    config = yaml.safe_load((REPO / "service/deploy/ray/serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["import_path"] == "service.scale.deployment:build_app"
    options = ScaleOptions(**application["args"])
    chosen = options.deployment_options()
    settings = options.settings()
    assert settings.cpu_workers == 1
    assert settings.cpu_threads == 2
    assert chosen["max_ongoing_requests"] == 2 * 16 + 32  # two batches + the streams
    assert chosen["autoscaling_config"].target_ongoing_requests == 16
    assert chosen["max_queued_requests"] == 2 * 16 * 4
    assert chosen["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0}
    build_app(application["args"])  # the builder Serve calls takes these args


async def _through_proxy_errors(inner: Callable[..., Any]) -> tuple[int, dict[str, str], Any]:
    from service.scale.proxy import ProxyErrors

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
    await ProxyErrors(inner)(scope, receive, send)
    start, *bodies = sent
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in bodies)
    parsed = json.loads(body) if headers.get("content-type") == "application/json" else body
    return start["status"], headers, parsed


def test_proxy_errors_rewrite_only_what_ray_answers_itself() -> None:
    async def replica_died(scope: Any, receive: Any, send: Any) -> None:
        return None  # what Ray's proxy does when the replica dies: sends nothing

    async def back_pressure(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"2")]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": b"Request dropped due to backpressure"})

    async def app_error(scope: Any, receive: Any, send: Any) -> None:
        body = json.dumps({"error": {"code": "queue_full"}}).encode()
        headers = [(b"content-type", b"application/json"), (b"retry-after", b"7")]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    status, headers, body = asyncio.run(_through_proxy_errors(replica_died))
    assert status == 503
    assert body["error"]["code"] == "unavailable"
    assert int(headers["retry-after"]) >= 1
    status, headers, body = asyncio.run(_through_proxy_errors(back_pressure))
    assert status == 429
    assert body["error"]["code"] == "queue_full"
    assert body["error"]["type"] == "rate_limit_error"
    assert headers["retry-after"] == "2"  # Ray's own value is kept
    status, headers, body = asyncio.run(_through_proxy_errors(app_error))
    assert (status, headers["retry-after"], body) == (429, "7", {"error": {"code": "queue_full"}})
