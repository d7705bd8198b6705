"""Credentials never reach a message or a log line: URI passwords and secret query parameters become ``***``.

:func:`redact` is the one rule (MLflow params, tags and files go through it in :mod:`cass.tracking.redact`);
:func:`install_log_redaction` applies it to every log record of the process, so that a library that logs
a URI as it was given (a tracking URI ``http://user:password@host``) cannot print or upload the password,
whichever handler the record reaches: the console, a file, or Prefect's API log handler.
"""

from __future__ import annotations

import logging
import re
import traceback

_URI_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*):[^@/\s]*@")
_QUERY_SECRET = re.compile(
    r"(?i)(?P<head>[?&;](?:password|passwd|pwd|token|access_token|secret|api_key|apikey|sig|signature"
    r"|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&;\s]+"
)
REDACTED = "***"


def redact(text: str) -> str:
    """``text`` with URI passwords and secret query parameters replaced by ``***``."""
    text = _URI_PASSWORD.sub(lambda m: f"{m['head']}:{REDACTED}@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['head']}{REDACTED}", text)


def _redact_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a malformed call: the handler reports it as it would have
        return
    cleaned = redact(message)
    if cleaned != message:
        record.msg, record.args = cleaned, ()
    if record.exc_info and record.exc_info[1] is not None:
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        cleaned = redact(text)
        if cleaned != text:
            record.exc_text = cleaned  # what logging.Formatter prints instead of formatting exc_info again


def install_log_redaction() -> None:
    """Redact every log record made from now on in this process (once; later calls do nothing)."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "redacts", False):
        return

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _redact_record(record)
        return record

    factory.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
