"""The daemon's logging: readable text or one JSON object per line, with request ids.

`configure(level, fmt)` sets up the root logger once. `enter_request(rpc, request_id)`
(in the call's own task) or `request_scope(...)` (around a block) marks the records a call
logs (on the event loop, and on worker threads started with `asyncio.to_thread`, which
copies the context) with that call's RPC name and request id, so a log collector can
gather every line of one request. A client picks the id by sending `x-request-id`
metadata; otherwise the server makes one up.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import secrets
import sys
import time
from collections.abc import Iterator
from typing import Any

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID = 128  # a longer client-chosen id is cut, never trusted to be small

_request: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "kvstore_request", default=None
)


def new_request_id() -> str:
    return secrets.token_hex(8)


def enter_request(rpc: str, request_id: str) -> None:
    """Mark what the current task logs from now on as the call's. For a task that lives
    as long as one call (gRPC runs each call in a task of its own, which copies the
    context), so nothing needs undoing: a streaming call's generator may be closed from
    another task, where resetting a context variable would fail."""
    _request.set((rpc, request_id))


@contextlib.contextmanager
def request_scope(rpc: str, request_id: str) -> Iterator[None]:
    token = _request.set((rpc, request_id))
    try:
        yield
    finally:
        _request.reset(token)


def current_request() -> tuple[str, str] | None:
    """(rpc, request id) of the call running in this context, or None."""
    return _request.get()


class _RequestFilter(logging.Filter):
    """Copies the current call's rpc and request id onto each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _request.get()
        if current is not None and not hasattr(record, "request_id"):
            record.rpc, record.request_id = current
        return True


# Attributes every LogRecord has; anything else was passed with `extra=` and is logged.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request fields, extras."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, with ` [rpc id]` when a call logged it."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        if request_id is None:
            return line
        head, sep, rest = line.partition(": ")
        return f"{head} [{getattr(record, 'rpc', '?')} {request_id}]{sep}{rest}"


def _iso_time(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


def configure(level: str, fmt: str) -> None:
    """Send the daemon's records to stderr as `fmt` ("text" or "json") from `level` up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RequestFilter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
