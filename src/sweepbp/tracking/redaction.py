"""Keeping credentials out of what sweepbp prints, logs and writes.

A tracking URI may carry credentials (`http://user:password@host`, `...?token=...`). sweepbp logs the
URI only in redacted form (`uris.redact`): in MLflow params, in config.yaml and results.json, in error
lines. What other code prints is caught here: every log record (Hydra prints each job's overrides)
passes through `redact_text`, and Hydra's own snapshots of the command line (`.hydra/*.yaml`,
`multirun.yaml`) are rewritten without the credentials before the job runs. Environment variables are
never logged: results record only a fixed list of named settings (see `result.host_environment`).
No heavy import here.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from sweepbp.config import redact_uri
from sweepbp.result import JobResult

# scheme://... up to whitespace, a quote or a closing bracket: wide enough for URIs inside log lines,
# override lists (`['tracking.uri=http://u:p@h']`) and YAML values. Also Hydra's escaped form of a swept
# value (`http\://alice\:pw@host\:5000`, in .hydra/*.yaml, override_dirname and the `#0 : ...` log line),
# never ending on a backslash (it escapes the separator after the URI).
URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*\\?://[^\s'\"\]\),]*[^\s'\"\]\),\\]")
HYDRA_ESCAPED = re.compile(r"\\(.)")  # Hydra escapes \()[]{}:=, and blanks in sweep values with a backslash
HYDRA_SPECIAL = re.compile(r"([\\()\[\]{}:=, \t])")


def redact_text(text: str) -> str:
    """`text` with every URI in it redacted (credentials and token-like query values replaced by ***)."""
    return URI_IN_TEXT.sub(lambda m: _redact_one(m.group(0)), text)


def _redact_one(uri: str) -> str:
    escaped = "\\" in uri
    plain = HYDRA_ESCAPED.sub(r"\1", uri) if escaped else uri
    try:
        shown = redact_uri(plain)
    except ValueError:  # not parseable as a URI (e.g. a broken IPv6 host): hide it whole
        shown = plain.split("://", 1)[0] + "://***"
    return HYDRA_SPECIAL.sub(r"\\\1", shown) if escaped else shown


def install_log_redaction() -> None:
    """Redact URIs in every log record created from now on in this process (idempotent)."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "sweepbp_redacts", False):
        return

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: logging reports it itself when it is emitted
            return record
        if "://" in message:
            cleaned = redact_text(message)
            if cleaned != message:
                record.msg, record.args = cleaned, ()
        return record

    factory.sweepbp_redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def redact_result(result: JobResult) -> None:
    """Redact URIs in a result's free text (error, environment values) before it is written anywhere."""
    if result.error:
        result.error = redact_text(result.error)
    result.environment = {key: redact_text(str(value)) for key, value in result.environment.items()}


def scrub_files(paths: list[Path]) -> None:
    """Rewrite files (Hydra's command-line snapshots) with the URIs in them redacted, atomically."""
    for path in paths:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        cleaned = redact_text(text)
        if cleaned != text:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(cleaned)
            os.replace(tmp, path)
