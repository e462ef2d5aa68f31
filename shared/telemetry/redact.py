"""Identifiers out of logs and dead-letter reasons.

A SOP Instance, Series or Study UID identifies a patient's examination, and object keys,
storage paths and the texts of storage errors carry them. Every log line and every
dead-letter reason passes through ``redact``, which writes each UID as a short
reference: ``uid#`` and the first 10 hex digits of its SHA-256. The same UID always
gives the same reference, so an operator can follow one instance through the logs, and
one who knows a UID can find its lines (``printf %s UID | sha256sum | cut -c1-10``),
while the log itself names nothing.

UIDs of the DICOM standard itself (root ``1.2.840.10008.``: SOP classes, transfer
syntaxes) identify no one and are kept. A UID here is five or more numeric components
(an IPv4 address has four, and is kept).
"""

from __future__ import annotations

import hashlib
import logging
import re

_UID = re.compile(r"(?<![\d.])[0-9]+(?:\.[0-9]+){4,}(?![\d])")
_STANDARD = "1.2.840.10008."


def uid_ref(uid: str) -> str:
    """The non-identifying reference that stands for ``uid`` in logs."""
    return "uid#" + hashlib.sha256(uid.encode()).hexdigest()[:10]


def redact(text: str) -> str:
    """``text`` with every non-standard DICOM UID replaced by its reference."""
    if not any(c.isdigit() for c in text):
        return text
    return _UID.sub(_replace, text)


def _replace(match: re.Match[str]) -> str:
    uid = match.group(0)
    return uid if uid.startswith(_STANDARD) else uid_ref(uid)


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (arguments applied) and exception text with
    ``redact``, so no handler downstream sees a UID, whoever logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True
