"""Tracking URIs: resolving relative SQLite paths, failing fast when unreachable (redacting: config.redact_uri).

No mlflow import here: the command line checks the URI before anything heavy is loaded.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

SQLITE = "sqlite:///"
# MLflow's own variables for a tracking server's credentials (basic auth), read by its HTTP client
USERNAME, PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


def resolve_uri(uri: str, base: Path | None = None) -> str:
    """Make a relative sqlite path absolute (against the launch folder), so every job uses one store."""
    if uri.startswith(SQLITE) and not uri.startswith(SQLITE + "/"):
        return SQLITE + str(((base or Path.cwd()) / uri[len(SQLITE):]).resolve())
    return uri


def store_folder(uri: str) -> Path | None:
    """The local folder a store writes to (a SQLite database's, made absolute), or None (a server's)."""
    path = sqlite_path(resolve_uri(uri))
    return path.parent if path is not None else None


def sqlite_path(uri: str) -> Path | None:
    if uri.startswith(SQLITE):
        return Path(uri[len(SQLITE):])
    return None


def move_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """An HTTP(S) tracking URI without its `user:password@`, and the MLflow environment variables that carry
    them instead: MLflow sends the same basic-auth header either way, and what is not in the URI cannot reach
    Hydra's files, log lines or MLflow's own printed links. Other URIs (a user without a password included:
    MLflow would send no header for it) come back as they are, and are only redacted wherever shown."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri, {}
    userinfo = parts.netloc.rsplit("@", 1)[0]
    user, _, password = userinfo.partition(":")
    if not user or not password:
        return uri, {}
    return uri.replace(userinfo + "@", "", 1), {USERNAME: unquote(user), PASSWORD: unquote(password)}


def _health_url(uri: str) -> str:
    """The server's /health address, without credentials (urllib would take user:password@ for the host)."""
    parts = urlsplit(uri)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/health", "", ""))


def unreachable_reason(uri: str, timeout_s: float = 3.0) -> str | None:
    """Why a tracking URI cannot be used, or None. HTTP servers are asked for /health."""
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(_health_url(uri), timeout=timeout_s) as response:
                if response.status >= 400:
                    return f"HTTP {response.status}"
        except urllib.error.HTTPError as err:
            if err.code >= 500:
                return f"HTTP {err.code}"
        except (urllib.error.URLError, OSError) as err:
            return str(getattr(err, "reason", err))
        return None
    if uri.startswith(SQLITE):
        folder = resolve_uri(uri)[len(SQLITE):]
        parent = Path(folder).parent
        if not parent.is_dir():
            return f"folder {parent} does not exist"
        return None
    if scheme in ("", "file"):
        return None
    if scheme in ("databricks", "postgresql", "mysql", "mssql"):
        return None  # checked by MLflow itself when the first job opens the store
    return f"unsupported scheme {scheme!r}"
