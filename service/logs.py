"""Logging set-up: plain text or one JSON object per line (`STT_LOG_FORMAT`).

Structured fields travel in `extra={"fields": {...}}`; the JSON formatter puts them at the top
level, the text formatter appends them as `key=value`.

Two guarantees hold for every line, whoever logs it (our code, uvicorn, transformers):
- **No secret**: configured API keys, `api_key=`-style query parameters, bearer tokens and the
  browser's `openai-insecure-api-key.<key>` subprotocol are replaced by `[REDACTED]` (uvicorn's
  websocket line logs the whole URL, query string included).
- **No forged line**: in the text format every control character a client can put in a field (a
  path with `%0a`, a header) is escaped, so one record is one line. JSON escapes them itself.
"""

import json
import logging
import re
import time
from collections.abc import Iterable
from typing import Any

from service.settings import Settings

REDACTED = "[REDACTED]"
# `?api_key=...`, `&token=...`: the value up to the next separator
_SECRET_PARAMS = re.compile(
    r"(?i)(\b(?:api[_-]?key|access[_-]?token|token|key|password|secret)=)[^&\s\"'#]+"
)
_BEARER = re.compile(r"(?i)(\bbearer\s+)[^\s\"',]+")
_SUBPROTOCOL_KEY = re.compile(r"(openai-insecure-api-key\.)[^\s\"',]+")
# C0 controls, DEL, C1 controls and the Unicode line/paragraph separators
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}
_CONTROL.update({0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def escape_controls(text: str) -> str:
    """`text` with every control character written as an escape: one line, whatever it holds."""
    return text.translate(_CONTROL)


class Redactor:
    """Replaces secrets in a formatted log line: the configured keys wherever they appear, and
    anything shaped like a credential (query parameters, bearer tokens, key subprotocols)."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        # longest first, so that a key containing another is replaced whole
        self.keys = sorted({k for k in keys if k}, key=len, reverse=True)

    def __call__(self, line: str) -> str:
        for key in self.keys:
            if key in line:
                line = line.replace(key, REDACTED)
            escaped = json.dumps(key)[1:-1]  # as it appears inside a JSON string
            if escaped != key and escaped in line:
                line = line.replace(escaped, REDACTED)
        line = _SECRET_PARAMS.sub(rf"\1{REDACTED}", line)
        line = _BEARER.sub(rf"\1{REDACTED}", line)
        return _SUBPROTOCOL_KEY.sub(rf"\1{REDACTED}", line)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and the record's fields."""

    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__()
        self.redact = redact or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return self.redact(json.dumps(entry, default=str))


class TextFormatter(logging.Formatter):
    """The usual one-line text, with the record's fields appended as key=value; control
    characters escaped so that nothing a client sends can start a line of its own."""

    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.redact = redact or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(
                f"{escape_controls(str(key))}={escape_controls(str(value))}"
                for key, value in fields.items()
            )
        if record.exc_info:  # a traceback is many lines by nature; it is our text, not a client's
            line += "\n" + self.formatException(record.exc_info)
        return self.redact(line)


class _StartupTraceback(logging.Filter):
    """Drops uvicorn's copy of a failed start-up's traceback: the app has already logged the
    cause in one line (`service.api.app`), and the traceback itself at debug level."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(
            ("Traceback (most recent call last)", "Application startup failed")
        )


def _quiet_libraries() -> None:
    """Send transformers' and Python's warnings through our handler; no progress bars (they are
    not log lines, so they would break the one-JSON-object-per-line promise)."""
    logging.captureWarnings(True)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def configure(settings: Settings) -> None:
    """Route every logger (uvicorn's, transformers' too) through one handler in the chosen
    format, with secrets redacted."""
    redact = Redactor(settings.keys())
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter(redact) if settings.log_format == "json" else TextFormatter(redact)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    if settings.log_level != "debug":
        logging.getLogger("uvicorn.error").addFilter(_StartupTraceback())
    _quiet_libraries()
