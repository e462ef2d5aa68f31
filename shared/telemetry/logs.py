"""Structured JSON logs on stderr. Callers log identities by kind, never patient data;
what slips through anyway (a UID in a library's error text) is redacted on the way out."""

from __future__ import annotations

import json
import logging
import sys
import time

from dicomflow.shared.telemetry.redact import RedactingFilter
from pynetdicom import _config as pynetdicom_config


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:  # set by RedactingFilter, already redacted
            entry["exc"] = record.exc_text
        return json.dumps(entry)


def setup(service: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    handler.addFilter(RedactingFilter())  # no UID reaches the log, whoever logs it
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO, including dataset summaries: keep it quiet.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # Its "standard" event handlers exist only to write those INFO and DEBUG lines, and
    # format them whether or not they are logged (some 0.4 ms a C-STORE response, UID
    # names looked up, on the DUL thread between a response and the next request): bind
    # none. Its warnings and errors are logged where they happen, as before.
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
