"""The Ray Serve path against the plain server, measured side by side on one machine.

`python -m bench.ray_overhead` starts (a) `python -m service` and (b) `python -m service.scale`
on a new local Ray cluster with one replica, both with the same settings, then sends the same
upload one at a time (concurrency 1, so the difference is the per-request path, not batching),
alternating between the two in rounds, and prints per-request latency for each and the ratio
(b)/(a) with its difference in milliseconds. It also prints how long the Ray path took from
launch to ready (cluster start + replica start) and the replica's start alone (Serve's deploy
to ready), and the memory of the replica process and of the whole Ray side (every process of
the cluster it started). Needs the `ray` extra.
"""

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from bench.common import parser, percentile, write_json
from bench.serverproc import proc_status_kb, running_server, scrape

SAMPLE = "samples/06-turn-on-the.wav"


def tree_rss_mb(root: int) -> float:
    """Resident memory of `root` and every descendant, in MiB (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        with contextlib.suppress(OSError, KeyError):
            total += proc_status_kb(pid, "VmRSS")
        stack.extend(children.get(pid, []))
    return total / 1024


def free_port() -> int:
    """A port free now, for Ray's proxy (Ray binds it itself, so it must be named)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def ray_server(model_dir: Path, log: Path) -> Iterator[tuple[str, int, float, float]]:
    """`python -m service.scale` with one replica: (url, pid, launch-to-ready s, deploy s)."""
    port = free_port()
    env = {**os.environ, "STT_MODEL_DIR": str(model_dir)}  # info: its ready line is read
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.scale",
                "--port",
                str(port),
                "--min-replicas",
                "1",
                "--max-replicas",
                "1",
                "--targets-file",
                str(log.with_suffix(".targets.json")),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deploying = None
        while "ready: http://" not in (text := log.read_text()):
            if proc.poll() is not None:
                raise SystemExit(f"service.scale exited during start-up:\n{text[-2000:]}")
            if deploying is None and "Started Serve" in text:
                deploying = time.monotonic()
            time.sleep(0.1)
        ready = time.monotonic()
        yield (
            f"http://127.0.0.1:{port}",
            proc.pid,
            ready - started,
            ready - (deploying or started),
        )
    finally:
        proc.terminate()
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


def timed(client: httpx.Client, url: str, audio: bytes) -> float:
    began = time.perf_counter()
    r = client.post(url + "/v1/audio/transcriptions", files={"file": ("a.wav", audio)})
    elapsed = time.perf_counter() - began
    r.raise_for_status()
    return elapsed


def main() -> None:
    args = parser("bench.ray_overhead", __doc__)
    args.add_argument("--requests", type=int, default=100, help="per path")
    opts = args.parse_args()
    audio = (opts.model / SAMPLE).read_bytes()
    env = {"STT_CPU_WORKERS": "1", "STT_CPU_THREADS": "1"}  # what a 1-CPU replica gets
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "bench-ray-overhead.log"
    with (
        running_server(opts.model, env) as plain,
        ray_server(opts.model, log) as (ray_url, ray_pid, launch_s, deploy_s),
        httpx.Client(timeout=60) as client,
    ):
        for url in (plain.url, ray_url):  # warm both paths
            for _ in range(5):
                timed(client, url, audio)
        times: dict[str, list[float]] = {"plain": [], "ray": []}
        for _ in range(opts.requests):  # alternate, so load on the machine hits both alike
            times["plain"].append(timed(client, plain.url, audio))
            times["ray"].append(timed(client, ray_url, audio))
        (target,) = re.findall(
            r'"(127\.0\.0\.1:\d+)"', log.with_suffix(".targets.json").read_text()
        )
        replica_mb = next(
            v / 2**20
            for name, _, v in scrape(f"http://{target}")
            if name == "process_resident_memory_bytes"
        )
        ray_side_mb = tree_rss_mb(ray_pid)
        plain_mb = plain.rss_mb
    print(f"{opts.requests} sequential uploads per path ({SAMPLE}), bundled model, 1 CPU worker")
    print("| path | p50 ms | p90 ms | mean ms |")
    print("|---|---|---|---|")
    for name, values in times.items():
        ms = [v * 1000 for v in values]
        print(
            f"| {name} | {percentile(ms, 50):.1f} | {percentile(ms, 90):.1f} | "
            f"{sum(ms) / len(ms):.1f} |"
        )
    p50 = {k: percentile(v, 50) * 1000 for k, v in times.items()}
    print(f"ray/plain p50 = {p50['ray'] / p50['plain']:.2f}x (+{p50['ray'] - p50['plain']:.1f} ms)")
    print(f"ray: launch to ready {launch_s:.1f} s (replica deploy to ready {deploy_s:.1f} s)")
    print(
        f"memory: plain server {plain_mb:.0f} MiB; ray replica {replica_mb:.0f} MiB; "
        f"whole ray side (cluster + driver + proxy + replica) {ray_side_mb:.0f} MiB"
    )
    write_json(
        opts.json,
        {
            "times": times,
            "launch_s": launch_s,
            "deploy_s": deploy_s,
            "replica_mb": replica_mb,
            "ray_side_mb": ray_side_mb,
            "plain_mb": plain_mb,
        },
    )


if __name__ == "__main__":
    main()
