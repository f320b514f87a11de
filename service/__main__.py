"""`python -m service` (or `speech-serve`): run the API with uvicorn on the settings."""

import uvicorn

from service import logs
from service.api.app import create_app
from service.settings import Settings


def main() -> None:
    settings = Settings()
    logs.configure(settings)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # keep `logs.configure`'s handler (text or JSON)
        access_log=False,  # the service logs each request itself, with its id and timings
        ws_max_size=settings.max_frame_bytes + 64 * 1024,  # the route answers oversize frames
        timeout_graceful_shutdown=int(settings.drain_timeout_s) + 5,
    )


if __name__ == "__main__":
    main()
