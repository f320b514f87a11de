"""`python -m service` as a child process, for the benchmark, soak and overload scripts.

One place that starts the service with `STT_*` settings on a port it binds itself (port 0; the
port is read from the child's socket in /proc, so no other process can take it in between),
waits for `/ready`, reads the child's memory from /proc, and stops it.
"""

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[str, dict[str, str], float]  # metric name, labels, value


def bound_port(pid: int) -> int | None:
    """The local port of the TCP socket process `pid` has bound (None until it has one).

    The service binds its socket first thing, before loading the model; its inode is found
    among the process's file descriptors and its port in /proc/net/tcp (the same network
    namespace as ours)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    return int(fields[1].rsplit(":", 1)[1], 16)
    return None


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
    """`python -m service` as a child process on a port it bound itself."""

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
    """Start the service on `model_dir` with these `STT_*` settings (loopback, a port it binds
    itself, log level warning unless given) and wait until `/ready` says 200. Stopped on exit."""
    full_env = {
        **os.environ,
        "STT_MODEL_DIR": str(model_dir),
        "STT_HOST": "127.0.0.1",
        "STT_PORT": "0",  # the server binds a free port itself
        "STT_LOG_LEVEL": "warning",
        **(env or {}),
    }
    proc = subprocess.Popen([sys.executable, "-m", "service"], env=full_env)
    try:
        give_up = time.monotonic() + 300
        port = None
        while True:  # a load generator may poll: nothing here is asserted on timing
            if proc.poll() is not None:
                raise SystemExit(f"the service exited with {proc.returncode} during start-up")
            if time.monotonic() > give_up:
                raise SystemExit("the service did not become ready in 300 s")
            port = port or bound_port(proc.pid)
            if port:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                        break
            time.sleep(0.2)
        server = Server(proc, f"http://127.0.0.1:{port}")
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
