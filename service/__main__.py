"""`python -m service` (or `speech-serve`): run the API with uvicorn on the settings."""

import os

# oneDNN (torch's CPU kernels) caches a primitive per input shape, 1024 by default: with audio
# of every length that is hundreds of MB that only grows with traffic. 32 keeps the memory flat
# and measured no slower (120 clips of random length: 2.04 s against 2.26 s uncapped). Must be
# set before torch first runs a kernel.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "32")

import uvicorn

from service import logs
from service.api.app import create_app
from service.api.transport import uvicorn_options
from service.settings import Settings


def main() -> None:
    settings = Settings()
    logs.configure(settings)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # keep `logs.configure`'s handler (text or JSON)
        access_log=False,  # the service logs each request itself, with its id and timings
        **uvicorn_options(settings, app.state.metrics),  # head limits, read timeouts
        timeout_graceful_shutdown=int(settings.drain_timeout_s) + 5,
    )


if __name__ == "__main__":
    main()
