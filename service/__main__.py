"""`python -m service` (or `speech-serve`): run the API with uvicorn on the settings.

Every setting is a flag (`--port 9000`) and an environment variable (`STT_PORT=9000`); the flags
are generated from `Settings`, so the two never drift. A flag wins over the environment, which
wins over the default. Start-up problems (an impossible setting, a busy port, a checkpoint that
cannot be served) end the process with one line that says what, why and the fix, and a non-zero
status; the traceback is logged only with `--log-level debug`.
"""

import os

# oneDNN (torch's CPU kernels) caches a primitive per input shape, 1024 by default: with audio
# of every length that is hundreds of MB that only grows with traffic. 32 keeps the memory flat
# and measured no slower (120 clips of random length: 2.04 s against 2.26 s uncapped). Must be
# set before torch first runs a kernel.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "32")

import argparse
import asyncio
import errno
import logging
import socket
import sys
from collections.abc import Sequence

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError
from pydantic_settings import CliSettingsSource

from service import logs
from service.api.app import create_app
from service.api.transport import uvicorn_options
from service.settings import Settings

PROG = "python -m service"
EXIT_BAD_SETTING = 2  # as argparse uses for a bad flag
EXIT_CANNOT_START = 1

log = logging.getLogger("service")


def parser_and_source() -> tuple[argparse.ArgumentParser, CliSettingsSource[Settings]]:
    """The argument parser generated from `Settings`, each option's help naming its variable."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Serve a speech encoder-decoder checkpoint over an OpenAI-compatible API.\n"
            "Every option is also an environment variable, named in its help."
        ),
        epilog=(
            "Precedence: a flag wins over its environment variable, which wins over the default.\n"
            "Lists (--api-keys, --cors-origins, --model-aliases) are comma-separated;\n"
            "--models takes name=folder-or-id items, comma-separated (or a JSON list).\n"
            "Example: python -m service --port 9000 --model-dir path/to/checkpoint"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source: CliSettingsSource[Settings] = CliSettingsSource(
        Settings,
        root_parser=parser,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_enforce_required=False,
    )
    for action in parser._actions:  # argparse has no public way to list them
        for flag in action.option_strings:
            if flag.startswith("--") and not flag.startswith("--no-") and flag != "--help":
                env = "STT_" + flag[2:].replace("-", "_").upper()
                action.help = f"{action.help} [env: {env}]"
                break
    return parser, source


def settings_from(argv: Sequence[str]) -> Settings:
    """Settings from flags over `STT_*` variables over defaults; exits 2 with one line per bad
    setting (argparse already does so for unknown flags)."""
    _, source = parser_and_source()
    try:
        return Settings(_cli_settings_source=source(args=list(argv)))
    except ValidationError as exc:
        for error in exc.errors():
            if not error["loc"]:  # a rule over several settings (e.g. STT_MODELS with STT_MODEL)
                print(f"{PROG}: invalid settings: {error['msg']}", file=sys.stderr)
                continue
            name = ".".join(str(part) for part in error["loc"])
            flag = "--" + name.replace("_", "-")
            env = "STT_" + name.upper()
            print(
                f"{PROG}: invalid setting {flag} ({env}): {error['msg']}",
                file=sys.stderr,
            )
        raise SystemExit(EXIT_BAD_SETTING) from None


def bind(settings: Settings) -> socket.socket:
    """The listening socket, bound before the model loads, so that a busy port fails at once."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        sock.close()
        where = f"{settings.host}:{settings.port}"
        if exc.errno == errno.EADDRINUSE:
            why = "the address is already in use (another server is running there)"
            fix = "stop it, or choose another port with --port N (STT_PORT)"
        elif exc.errno == errno.EACCES:
            why = "permission denied (ports below 1024 need privileges)"
            fix = "choose a port of 1024 or more with --port N (STT_PORT)"
        else:
            why = exc.strerror or str(exc)
            fix = "check --host (STT_HOST) and --port (STT_PORT)"
        log.critical("cannot start: cannot listen on %s: %s; %s", where, why, fix)
        log.debug("bind failed", exc_info=True)
        raise SystemExit(EXIT_CANNOT_START) from None
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn on a socket we bound: it logs no address then, so say where we listen (in
    uvicorn's own words, which scripts and tests read for the port when it was 0), and drain the
    engine from the shutdown signal on."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and sockets:
            host, port = sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            logging.getLogger("uvicorn.error").info(
                "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", shown, port
            )

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Drain the engine from the signal on, while uvicorn waits for the open requests.

        Queued work may finish within `drain_timeout_s`; what is still queued then is answered
        503 `unavailable` with Retry-After (`WorkerPool.stop`), so the requests end before
        uvicorn's own graceful timeout, which would cancel them with a bare 500.
        """
        engines = getattr(self.app.state, "engines", None)  # every model drains at once
        draining = asyncio.create_task(asyncio.to_thread(engines.stop)) if engines else None
        await super().shutdown(sockets)
        if draining is not None:
            await draining


def main(argv: Sequence[str] | None = None) -> None:
    settings = settings_from(sys.argv[1:] if argv is None else argv)
    logs.configure(settings)
    sock = bind(settings)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        log_config=None,  # keep `logs.configure`'s handler (text or JSON)
        access_log=False,  # the service logs each request itself, with its id and timings
        **uvicorn_options(settings, app.state.metrics),  # head limits, read timeouts
        timeout_graceful_shutdown=int(settings.drain_timeout_s) + 5,
    )
    server = _Server(config, app)
    server.run(sockets=[sock])
    if not server.started:  # start-up failed: the app has logged why (`service.api.app`)
        raise SystemExit(EXIT_CANNOT_START)


if __name__ == "__main__":
    main()
