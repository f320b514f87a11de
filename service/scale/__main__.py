"""`python -m service.scale`: the service on Ray Serve, on a new local cluster or an existing one.

Without `--address` it starts a one-node Ray cluster bound to loopback (no dashboard) and stops
it on exit; with `--address HOST:PORT` (or `auto`) it deploys onto a running cluster
(`ray start --head` / `ray start --address`, see docker-compose.yml's `ray` profile) and leaves
the cluster up on exit. The model's settings are the `STT_*` variables, as for
`python -m service`; they are passed to every replica (API keys excepted: give each node
`STT_API_KEYS_FILE` or `STT_API_KEYS` itself, so no key travels in Ray's job config). While it
runs it rewrites the Prometheus targets file (`--targets-file`) with the live replicas.
"""

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

PROXY_CALLBACK = "service.scale.proxy:middlewares"
# Ray's processes inherit these from whoever starts the cluster (here, for a local one; on a
# cluster, the environment of `ray start` on each node).
os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)
if not any(arg.startswith("--address") for arg in sys.argv):
    # a local cluster: Ray then uses loopback, not the machine's outside address (read when
    # `ray` is imported); joining a cluster keeps Ray's own choice of address
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "32")

import ray  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from ray import serve  # noqa: E402

from service import logs  # noqa: E402
from service.scale import targets  # noqa: E402
from service.scale.deployment import ScaleOptions, build_app  # noqa: E402

PROG = "python -m service.scale"
SECRET_VARIABLES = {"STT_API_KEYS"}

log = logging.getLogger("service.scale")


def parse(argv: list[str]) -> tuple[argparse.Namespace, ScaleOptions]:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve the speech service on Ray Serve: replicas across nodes, autoscaled.",
        epilog="Model settings are the STT_* variables (python -m service --help lists them).",
    )
    parser.add_argument(
        "--address",
        help="Ray cluster to join (HOST:PORT or auto); default: start a local one on loopback",
    )
    parser.add_argument(
        "--node-ip-address",
        default=None,
        help="this machine's address in the cluster (127.0.0.1 on one host)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address Ray's HTTP proxy binds")
    parser.add_argument("--port", type=int, default=8000, help="port of Ray's HTTP proxy")
    parser.add_argument("--app-name", default="speech-serve")
    parser.add_argument(
        "--targets-file",
        type=Path,
        default=Path("runs/ray/targets.json"),
        help="Prometheus file_sd file listing each replica's metrics address",
    )
    parser.add_argument(
        "--targets-only",
        action="store_true",
        help="deploy nothing, only keep --targets-file up to date (for an application "
        "deployed with `serve deploy`)",
    )
    parser.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs of a local cluster (default: all)"
    )
    for name, field in ScaleOptions.model_fields.items():
        if name == "stt":
            continue
        kind = float if field.annotation in (float, float | None) else int
        parser.add_argument(
            "--" + name.replace("_", "-"), type=kind, default=None, help=field.description
        )
    args = parser.parse_args(argv)
    if args.targets_only and not args.address:
        parser.error("--targets-only needs --address (the cluster the application runs on)")
    chosen = {
        name: getattr(args, name)
        for name in ScaleOptions.model_fields
        if name != "stt" and getattr(args, name) is not None
    }
    try:
        options = ScaleOptions(**chosen)
        options.settings()  # a bad STT_* value or model folder fails here, in one line
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"])
            print(f"{PROG}: invalid setting {where}: {error['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as exc:  # settings valid alone that a cluster cannot serve (STT_MODELS)
        print(f"{PROG}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return args, options


def forwarded_environment() -> dict[str, str]:
    """The `STT_*` variables every replica gets (keys excepted), and oneDNN's cache cap."""
    env = {k: v for k, v in os.environ.items() if k.startswith("STT_")}
    for name in SECRET_VARIABLES:
        env.pop(name, None)
    env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]
    return env


def main(argv: list[str] | None = None) -> None:
    args, options = parse(sys.argv[1:] if argv is None else argv)
    logs.configure(options.settings())
    runtime_env = {"env_vars": forwarded_environment()}
    if args.address:
        ray.init(
            address=args.address,
            _node_ip_address=args.node_ip_address,
            runtime_env=runtime_env,
            log_to_driver=False,
        )
    else:
        ray.init(
            _node_ip_address=args.node_ip_address or "127.0.0.1",
            include_dashboard=False,
            num_cpus=args.num_cpus,
            runtime_env=runtime_env,
            log_to_driver=False,
        )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.targets_only:
        try:
            while not stop.wait(2.0):
                targets.write_sd_file(args.targets_file)
        finally:
            ray.shutdown()
        return
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(options), name=args.app_name, route_prefix="/", blocking=False)
        groups = targets.write_sd_file(args.targets_file)
        log.info(
            "ready: http://%s:%d with %d replica(s); metrics targets in %s; Ray at %s",
            args.host,
            args.port,
            len(groups),
            args.targets_file,
            ray.get_runtime_context().gcs_address,
        )
        while not stop.wait(2.0):
            targets.write_sd_file(args.targets_file)
    finally:
        serve.delete(args.app_name)  # replicas drain (graceful_shutdown_timeout_s)
        ray.shutdown()  # a local cluster stops with its driver; a joined one stays up


if __name__ == "__main__":
    main()
