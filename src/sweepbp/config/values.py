"""A validated config as plain values: JSON-ready dicts, dotted MLflow params, the YAML a rerun composes from,
and its tracking URI with credentials hidden.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from omegaconf import DictConfig, OmegaConf

from sweepbp.config.schema import SweepbpConfig


def config_as_dict(cfg: SweepbpConfig) -> dict[str, Any]:
    """The config as plain nested dicts and lists (JSON-ready), credentials in tracking.uri redacted."""
    container = OmegaConf.to_container(_redacted(cfg), resolve=True)
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]


def _redacted(cfg: SweepbpConfig) -> DictConfig:
    """The config as an OmegaConf node with tracking.uri redacted: what is written or logged, never used."""
    node = OmegaConf.structured(cfg)
    if node.tracking.uri:
        node.tracking.uri = redact_uri(node.tracking.uri)
    return node


def leaf_params(cfg: SweepbpConfig) -> dict[str, str]:
    """Every leaf of the config under its dotted path, as strings (MLflow params)."""
    return dotted_leaves(config_as_dict(cfg))


def dotted_leaves(container: dict[str, Any]) -> dict[str, str]:
    """Every leaf of a nested dict under its dotted path, as strings (a results.json config, too)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = str(node)

    walk("", container)
    return flat


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `dotted_leaves`: {"lora.r": "8"} -> {"lora": {"r": "8"}}."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def config_yaml(cfg: SweepbpConfig) -> str:
    """The resolved config as YAML, the artifact a rerun composes from (credentials redacted)."""
    return OmegaConf.to_yaml(_redacted(cfg))


def redact_uri(uri: str) -> str:
    """Hide user:password@ and token-like query values wherever a URI is printed or logged.

    Edits the text in place rather than re-assembling the URI: urlunsplit would turn
    sqlite:////abs/path into sqlite://abs/path.
    """
    parts = urlsplit(uri)
    shown = uri
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        shown = shown.replace(userinfo + "@", "***@", 1)
    if parts.query:
        query = re.sub(r"(?i)((?:token|password|secret|key)[^=&]*=)[^&]*", r"\1***", parts.query)
        shown = shown.replace("?" + parts.query, "?" + query, 1)
    return shown
