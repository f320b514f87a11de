"""`python -m service` as a child process, for the benchmark, soak and overload scripts.

One place that picks a free port, starts the service with `STT_*` settings, waits for `/ready`,
reads the child's memory from /proc, and stops it.
"""

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[str, dict[str, str], float]  # metric name, labels, value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_status_kb(pid: int, field_name: str) -> int:
    """A `kB` figure from /proc/<pid>/status (`VmRSS`, `VmHWM`)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def scrape(url: str) -> list[Sample]:
    """Every sample of the server's `/metrics`."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


@dataclass
class Server:
    """`python -m service` as a child process on a free port."""

    proc: subprocess.Popen[bytes]
    url: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def rss_mb(self) -> float:
        """Resident memory now, in MiB."""
        return proc_status_kb(self.proc.pid, "VmRSS") / 1024

    @property
    def peak_rss_mb(self) -> float:
        """Peak resident memory (VmHWM), in MiB."""
        return proc_status_kb(self.proc.pid, "VmHWM") / 1024

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM, then the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)


@contextlib.contextmanager
def running_server(model_dir: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    """Start the service on `model_dir` with these `STT_*` settings (loopback, a free port,
    log level warning unless given) and wait until `/ready` says 200. Stopped on exit."""
    port = free_port()
    full_env = {
        **os.environ,
        "STT_MODEL_DIR": str(model_dir),
        "STT_HOST": "127.0.0.1",
        "STT_PORT": str(port),
        "STT_LOG_LEVEL": "warning",
        **(env or {}),
    }
    proc = subprocess.Popen([sys.executable, "-m", "service"], env=full_env)
    server = Server(proc, f"http://127.0.0.1:{port}")
    try:
        give_up = time.monotonic() + 300
        while True:  # a load generator may poll: nothing here is asserted on timing
            if proc.poll() is not None:
                raise SystemExit(f"the service exited with {proc.returncode} during start-up")
            if time.monotonic() > give_up:
                raise SystemExit("the service did not become ready in 300 s")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(server.url + "/ready", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
