"""Log plumbing: the current request id, a filter that stamps it on records, the filter that keeps Django's
request logger to tracebacks, and a one-line JSON formatter."""
from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime

# Set by config.middleware.RequestContextMiddleware for the duration of one request; "-" outside requests.
NO_REQUEST_ID = "-"
request_id_var: ContextVar[str] = ContextVar("preflab_request_id", default=NO_REQUEST_ID)

# Attributes every LogRecord has; anything else on a record came in through `extra=` and goes into the JSON.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def current_request_id() -> str:
    return request_id_var.get()


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to each record, so a handler's format (plain or JSON) can show it. A record that already
    carries one (logged with `extra={"request_id": ...}`) keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class UnhandledExceptionsOnly(logging.Filter):
    """For django.request: keep the traceback of an exception no view handled (a 500), drop Django's line for every
    other 4xx or 5xx response. config.middleware's access line already gives each response's method, path, status
    and request id once; a 403 or 404 is a client's mistake and its traceback is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR and record.exc_info is not None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, the record's `extra` fields and the
    traceback when there is one; log shippers parse it without a grok pattern."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", request_id_var.get()),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)
