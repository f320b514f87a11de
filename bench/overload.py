"""Overload: offered far more than it can serve, the service sheds fast and recovers at once.

    python -m bench.overload                       # 20 s at 4x capacity, then 20 s at 0.5x
    python -m bench.overload --seconds 4 --json overload.json

Starts `python -m service` on a free port (the bundled model unless `--model`, default settings
but a request deadline of `--deadline` seconds, `STT_REQUEST_TIMEOUT_S`), then:

1. capacity: a closed loop of `--capacity-concurrency` clients sending the model's sample clips
   (1-3 s of speech) for `--capacity-seconds`: the requests per second it completes;
2. overload: an open loop of Poisson arrivals at `--factor` x capacity for `--seconds`, each
   request its own task with a client timeout above the server's deadline (arrivals do not
   wait for answers, as with real clients);
3. recovery: the same at 0.5 x capacity for `--seconds`, straight after.

What a well-behaved service does, and what is checked (one line each; any failure makes the
run FAIL, exit status 1): every request gets an answer (no transport errors, no client
timeouts); what it cannot serve in time it sheds with 429/503 and `Retry-After`, quickly
(p99 time-to-reject under `--max-reject-ms`) instead of queueing it past its deadline; what it
accepts it answers within the deadline (p99 latency of 200s at most `--deadline` +
`--margin`); no 5xx but 503, except 504 `deadline_exceeded` for at most `EXPIRED_SHARE` of
the accepted requests (the deadline covers waiting for a decode slot and decoding, so an upload
accepted early can still expire there; more than a few would mean admission let in what it
cannot serve); goodput
under overload stays near capacity; and in the recovery phase it serves what is offered
(once the backlog left by the overload has expired, a success ratio of at least
`--min-recovery` and throughput at the offered rate). The client shares
the machine with the server, so capacity is measured with the same client in the same run.
"""

import argparse
import asyncio
import itertools
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench import common
from bench.common import percentile
from bench.serverproc import Sample, running_server
from bench.soak import (
    CLEAN_EXIT,
    TRANSCRIBE,
    Check,
    load_clips,
)

SHED = (429, 503)
EXPIRED = "504 deadline_exceeded"
EXPIRED_SHARE = 0.1  # of accepted requests (200s and 504s) that may expire in the queue
THROUGHPUT_TOLERANCE = 0.9  # completions trail arrivals by a latency: allow for the window edges


@dataclass
class Result:
    """One request: when it was due and sent (seconds from the phase start), what it got."""

    due: float
    sent: float = 0.0
    status: int | None = None
    code: str | None = None
    retry_after: bool = False
    latency: float = 0.0
    transport_error: str | None = None


@dataclass
class Phase:
    """One phase's figures."""

    name: str
    seconds: float
    target_rate: float
    sent: int = 0
    offered_rate: float = 0.0
    ok: int = 0
    accepted_rate: float = 0.0
    shed_429: int = 0
    shed_503: int = 0
    shed_codes: dict[str, int] = field(default_factory=dict)
    shed_with_retry_after: int = 0
    server_errors: dict[str, int] = field(default_factory=dict)  # 5xx other than 503
    other_statuses: dict[str, int] = field(default_factory=dict)
    transport_errors: int = 0
    accepted_p50_s: float = float("nan")
    accepted_p99_s: float = float("nan")
    accepted_max_s: float = float("nan")
    reject_p50_ms: float = float("nan")
    reject_p99_ms: float = float("nan")
    reject_max_ms: float = float("nan")
    success_ratio: float = 0.0
    success_ratio_settled: float = 0.0  # arrivals once the old backlog's deadline passed
    settled_offered_rate: float = 0.0  # arrivals per second in that window
    settled_throughput: float = 0.0  # 200s completed per second in that window
    max_send_lag_ms: float = 0.0  # how far the client fell behind its arrival schedule
    server: dict[str, object] = field(default_factory=dict)  # from /metrics (server_figures)

    @property
    def shed(self) -> int:
        return self.shed_429 + self.shed_503


def summarize(
    name: str, seconds: float, target_rate: float, results: list[Result], settle: float = 0.0
) -> Phase:
    """A phase's figures; `settle`: seconds after which work queued before it has expired."""
    phase = Phase(name, seconds, target_rate)
    phase.sent = len(results)
    phase.offered_rate = len(results) / seconds
    ok = [r for r in results if r.status == 200]
    shed = [r for r in results if r.status in SHED]
    phase.ok = len(ok)
    phase.accepted_rate = len(ok) / seconds
    phase.shed_429 = sum(r.status == 429 for r in results)
    phase.shed_503 = sum(r.status == 503 for r in results)
    phase.shed_codes = dict(Counter(str(r.code) for r in shed))
    phase.shed_with_retry_after = sum(r.retry_after for r in shed)
    phase.server_errors = dict(
        Counter(
            f"{r.status} {r.code}"
            for r in results
            if r.status is not None and r.status >= 500 and r.status != 503
        )
    )
    phase.other_statuses = dict(  # 4xx: none expected, every clip is good
        Counter(
            f"{r.status} {r.code}"
            for r in results
            if r.status is not None and r.status not in (200, *SHED) and r.status < 500
        )
    )
    phase.transport_errors = sum(r.transport_error is not None for r in results)
    accepted = [r.latency for r in ok]
    phase.accepted_p50_s = percentile(accepted, 50)
    phase.accepted_p99_s = percentile(accepted, 99)
    phase.accepted_max_s = max(accepted, default=float("nan"))
    rejects = [1000 * r.latency for r in shed]
    phase.reject_p50_ms = percentile(rejects, 50)
    phase.reject_p99_ms = percentile(rejects, 99)
    phase.reject_max_ms = max(rejects, default=float("nan"))
    phase.success_ratio = len(ok) / max(1, len(results))
    settled = [r for r in results if r.due >= settle]
    phase.success_ratio_settled = sum(r.status == 200 for r in settled) / max(1, len(settled))
    window = max(1e-9, seconds - settle)
    phase.settled_offered_rate = len(settled) / window
    phase.settled_throughput = (
        sum(r.status == 200 and settle <= r.sent + r.latency < seconds for r in results) / window
    )
    phase.max_send_lag_ms = 1000 * max((r.sent - r.due for r in results), default=0.0)
    return phase


class LeanClient:
    """A minimal HTTP/1.1 client over keep-alive connections, sending prepared requests.

    The load generator shares the machine with the server: at several hundred requests a
    second httpx's own cost (a millisecond or more each) would make the client, not the
    server, the bottleneck, and the arrivals would fall behind their schedule. Requests are
    serialised once (`prepare`, by httpx) and sent as bytes; a response is read by its
    `Content-Length` (every answer of the audio endpoints has one, unless streamed).
    """

    IDLE_SECONDS = 2.0  # reuse a connection only well inside uvicorn's 5 s keep-alive

    def __init__(self, url: str) -> None:
        parsed = httpx.URL(url)
        self.url = url
        self.host = parsed.host
        self.port = parsed.port or 80
        self.idle: list[tuple[float, asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.connections = 0

    def prepare(self, path: str, files: dict[str, tuple[str, bytes]]) -> bytes:
        request = httpx.Request("POST", self.url + path, files=files)
        body = request.read()
        head = f"POST {path} HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in request.headers.items()
        )
        return head.encode() + b"\r\n" + body

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        now = time.monotonic()
        while self.idle:
            since, reader, writer = self.idle.pop()
            if now - since < self.IDLE_SECONDS:
                return reader, writer
            writer.close()
        self.connections += 1
        return await asyncio.open_connection(self.host, self.port)

    async def send(self, payload: bytes) -> tuple[int, dict[str, str], bytes]:
        """Status, headers (lower-case names) and body of one request."""
        reader, writer = await self._connection()
        try:
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((time.monotonic(), reader, writer))
        return status, headers, body

    def close(self) -> None:
        for _, _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def post(client: LeanClient, payload: bytes, result: Result, timeout: float) -> None:
    started = time.perf_counter()
    try:
        status, headers, body = await asyncio.wait_for(client.send(payload), timeout)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        result.transport_error = type(exc).__name__
        return
    except TimeoutError:
        result.transport_error = "client timeout"
        return
    finally:
        result.latency = time.perf_counter() - started
    result.status = status
    result.retry_after = "retry-after" in headers
    if status != 200:
        try:
            result.code = json.loads(body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            result.code = "not-the-error-shape"


async def closed_loop(
    client: LeanClient,
    payloads: list[bytes],
    concurrency: int,
    seconds: float,
    seed: int,
    timeout: float,
) -> list[Result]:
    """`concurrency` clients, each sending as soon as its last answer came, for `seconds`."""
    rng = random.Random(seed)
    results: list[Result] = []
    start = time.perf_counter()

    async def one_client() -> None:
        while (now := time.perf_counter() - start) < seconds:
            result = Result(due=now, sent=now)
            results.append(result)
            await post(client, rng.choice(payloads), result, timeout)

    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return results


async def open_loop(
    client: LeanClient,
    payloads: list[bytes],
    phases: list[tuple[float, float]],
    seed: int,
    timeout: float,
    boundaries: list[asyncio.Task[list[Sample]]],
) -> list[list[Result]]:
    """Poisson arrivals at each (rate, seconds) in turn, back to back; each request its own
    task, sent when due whatever the answers so far. Returns each phase's results; at each
    phase's end a scrape of `/metrics` starts and is added to `boundaries`."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    out: list[list[Result]] = []
    begin = loop.time()
    for index, (rate, seconds) in enumerate(phases):
        if index:
            boundaries.append(asyncio.create_task(scrape_async(client.url)))
        results: list[Result] = []
        due = rng.expovariate(rate)
        while due < seconds:
            await asyncio.sleep(max(0.0, begin + due - loop.time()))
            result = Result(due=due, sent=loop.time() - begin)
            results.append(result)
            task = asyncio.create_task(post(client, rng.choice(payloads), result, timeout))
            tasks.append(task)
            due += rng.expovariate(rate)
        out.append(results)
        begin += seconds
    await asyncio.gather(*tasks)
    boundaries.append(asyncio.create_task(scrape_async(client.url)))
    await asyncio.gather(*boundaries)
    return out


async def scrape_async(url: str) -> list[Sample]:
    async with httpx.AsyncClient(timeout=60) as client:
        text = (await client.get(url + "/metrics")).text
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def server_figures(before: list[Sample], after: list[Sample]) -> dict[str, object]:
    """What the server did between two scrapes: worker time, batches, refusals."""

    def total(samples: list[Sample], name: str, **match: str) -> float:
        return sum(
            v
            for n, labels, v in samples
            if n == name and all(labels.get(k) == want for k, want in match.items())
        )

    def delta(name: str, **match: str) -> float:
        return total(after, name, **match) - total(before, name, **match)

    def by(name: str, label: str) -> dict[str, int]:
        keys = {labels[label] for n, labels, _ in after if n == name and label in labels}
        counts = {k: int(delta(name, **{label: k})) for k in sorted(keys)}
        return {k: v for k, v in counts.items() if v}

    batches = delta("stt_batch_size_count")
    return {
        "worker_busy_s": round(delta("stt_worker_busy_seconds_total"), 2),
        "batches": int(batches),
        "mean_batch": round(delta("stt_batch_size_sum") / batches, 2) if batches else 0.0,
        "decode_s": round(delta("stt_stage_duration_seconds_sum", stage="decode"), 2),
        "rejections": by("stt_rejections_total", "reason"),
        "cancellations": by("stt_cancellations_total", "reason"),
    }


@dataclass
class Report:
    """Every figure of one run (what `--json` writes)."""

    model: str
    deadline_s: float
    factor: float
    seconds: float
    capacity_rps: float = 0.0
    phases: list[Phase] = field(default_factory=list)
    exit_code: int | None = None
    wall_seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)
    passed: bool = False


def expired_ok(phase: "Phase") -> bool:
    """No 5xx but 503, except a bounded share of 504 `deadline_exceeded`."""
    other = {k: v for k, v in phase.server_errors.items() if k != EXPIRED}
    expired = phase.server_errors.get(EXPIRED, 0)
    return not other and expired <= EXPIRED_SHARE * max(1, phase.ok + expired)


def run(args: argparse.Namespace) -> Report:
    started = time.perf_counter()
    model_dir: Path = args.model
    report = Report(model_dir.name, args.deadline, args.factor, args.seconds)
    clips = load_clips(model_dir)
    env = {"STT_REQUEST_TIMEOUT_S": str(args.deadline)}
    with running_server(model_dir, env) as server:

        async def scenario() -> list[Phase]:
            client = LeanClient(server.url)
            payloads = [client.prepare(TRANSCRIBE, {"file": (c.name, c.wav)}) for c in clips]
            timeout = args.deadline + 10
            concurrency = args.capacity_concurrency
            try:
                warm = await closed_loop(client, payloads, concurrency, 1.0, args.seed, timeout)
                if not any(r.status == 200 for r in warm):
                    raise SystemExit("the warm-up got no 200")
                seconds = args.capacity_seconds
                scrapes = [await scrape_async(server.url)]
                measured = await closed_loop(
                    client, payloads, concurrency, seconds, args.seed + 1, timeout
                )
                scrapes.append(await scrape_async(server.url))
                capacity = summarize("capacity (closed loop)", seconds, 0.0, measured)
                rate = capacity.accepted_rate
                capacity.target_rate = rate
                boundaries: list[asyncio.Task[list[Sample]]] = []
                overload, recovery = await open_loop(
                    client,
                    payloads,
                    [(args.factor * rate, args.seconds), (0.5 * rate, args.seconds)],
                    args.seed + 2,
                    timeout,
                    boundaries,
                )
                scrapes += [b.result() for b in boundaries]
            finally:
                client.close()
            phases = [
                capacity,
                summarize(
                    f"overload ({args.factor:g}x)", args.seconds, args.factor * rate, overload
                ),
                summarize("recovery (0.5x)", args.seconds, 0.5 * rate, recovery, args.deadline),
            ]
            for phase, (before, after) in zip(phases, itertools.pairwise(scrapes), strict=True):
                phase.server = server_figures(before, after)
            return phases

        report.phases = asyncio.run(scenario())
        report.capacity_rps = report.phases[0].accepted_rate
        report.exit_code = server.stop()
    report.wall_seconds = time.perf_counter() - started
    report.checks = checks(report, args)
    report.passed = all(c.ok for c in report.checks)
    return report


def checks(r: Report, args: argparse.Namespace) -> list[Check]:
    capacity, overload, recovery = r.phases
    phases = r.phases
    sent = sum(p.sent for p in phases)
    answered = sum(
        p.ok + p.shed + sum(p.server_errors.values()) + sum(p.other_statuses.values())
        for p in phases
    )
    limit = args.deadline + args.margin
    shed = sum(p.shed for p in phases)
    shed_ra = sum(p.shed_with_retry_after for p in phases)
    worst_latency = max(p.accepted_p99_s for p in phases)
    return [
        Check(
            "every request answered",
            answered == sent and not any(p.transport_errors for p in phases),
            f"{sent} sent, {answered} answered, "
            f"{sum(p.transport_errors for p in phases)} transport errors or client timeouts",
        ),
        Check(
            "the overload phase was overloaded",
            overload.shed > 0 and capacity.ok > 0,
            f"capacity {r.capacity_rps:.1f} req/s; offered {overload.offered_rate:.1f} req/s, "
            f"{overload.shed} shed",
        ),
        Check("every shed request has Retry-After", shed_ra == shed, f"{shed_ra} of {shed}"),
        Check(
            f"accepted p99 latency <= deadline + margin ({limit:g} s)",
            worst_latency <= limit,
            ", ".join(f"{p.name}: {p.accepted_p99_s:.2f} s" for p in phases),
        ),
        Check(
            f"shed fast: p99 time-to-reject < {args.max_reject_ms:g} ms",
            all(not p.shed or p.reject_p99_ms < args.max_reject_ms for p in phases),
            ", ".join(f"{p.name}: {p.reject_p99_ms:.0f} ms" for p in phases if p.shed),
        ),
        Check(
            f"no 5xx but 503, and 504 for at most {EXPIRED_SHARE:.0%} of accepted requests",
            all(expired_ok(p) for p in phases),
            ", ".join(f"{p.name}: {p.server_errors or 'none'}" for p in phases),
        ),
        Check(
            "no 4xx but 429 (every clip is good)",
            not any(p.other_statuses for p in phases),
            ", ".join(f"{p.name}: {p.other_statuses or 'none'}" for p in phases),
        ),
        Check(
            f"goodput under overload >= {args.min_goodput:.0%} of capacity",
            overload.accepted_rate >= args.min_goodput * r.capacity_rps,
            f"{overload.accepted_rate:.1f} of {r.capacity_rps:.1f} req/s",
        ),
        Check(
            f"recovery: success ratio >= {args.min_recovery:.0%} once the overload's backlog "
            f"has expired (after {args.deadline:g} s)",
            recovery.success_ratio_settled >= args.min_recovery,
            f"{recovery.success_ratio_settled:.1%} ({recovery.success_ratio:.1%} over the whole "
            "phase)",
        ),
        Check(
            f"recovery: throughput reached the offered rate (>= {THROUGHPUT_TOLERANCE:.0%})",
            recovery.settled_throughput >= THROUGHPUT_TOLERANCE * recovery.settled_offered_rate,
            f"{recovery.settled_throughput:.1f} req/s served of {recovery.settled_offered_rate:.1f}"
            " offered after the backlog expired",
        ),
        Check("clean exit on SIGTERM", r.exit_code in CLEAN_EXIT, f"exit status {r.exit_code}"),
    ]


def print_report(r: Report) -> None:
    print(
        f"\noverload: {r.model}, deadline {r.deadline_s:g} s; capacity {r.capacity_rps:.1f} req/s "
        f"(closed loop); then {r.factor:g}x and 0.5x for {r.seconds:g} s each, Poisson arrivals; "
        f"whole run {r.wall_seconds:.1f} s\n"
    )
    print(
        "| phase | offered req/s | 200/s | 200 | 429 | 503 | shed with Retry-After | 5xx not 503 "
        "| 200 p50 s | 200 p99 s | 200 max s | reject p50 ms | reject p99 ms | reject max ms "
        "| success | client lag ms |"
    )
    print("|---" * 16 + "|")
    for p in r.phases:
        errors = sum(p.server_errors.values())
        print(
            f"| {p.name} | {p.offered_rate:.1f} | {p.accepted_rate:.1f} | {p.ok} | {p.shed_429} "
            f"| {p.shed_503} | {p.shed_with_retry_after}/{p.shed} | {errors} "
            f"| {p.accepted_p50_s:.3f} | {p.accepted_p99_s:.3f} | {p.accepted_max_s:.3f} "
            f"| {p.reject_p50_ms:.0f} | {p.reject_p99_ms:.0f} | {p.reject_max_ms:.0f} "
            f"| {p.success_ratio:.1%} | {p.max_send_lag_ms:.0f} |"
        )
    print("\nServer side, from /metrics (recovery includes the overload's backlog):")
    for p in r.phases:
        print(f"{p.name}: {p.server}")
    print()
    common.print_verdict(r.checks, r.passed)


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("bench.overload", __doc__)
    parser.add_argument("--seconds", type=float, default=20.0, help="each open-loop phase")
    parser.add_argument("--factor", type=float, default=4.0, help="overload: x capacity")
    parser.add_argument("--deadline", type=float, default=3.0, help="STT_REQUEST_TIMEOUT_S")
    parser.add_argument("--margin", type=float, default=0.5, help="latency allowed past it (s)")
    parser.add_argument("--max-reject-ms", type=float, default=1000.0)
    parser.add_argument("--min-goodput", type=float, default=0.5, help="x capacity, overloaded")
    parser.add_argument("--min-recovery", type=float, default=0.99, help="success ratio")
    parser.add_argument("--capacity-seconds", type=float, default=5.0)
    parser.add_argument("--capacity-concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    report = run(args)
    print_report(report)
    common.write_json(args.json, asdict(report))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
