"""Where a sweep writes, checked before the first job: its job folders (`hydra.run.dir`, or `hydra.sweep.dir`
with -m; under the launch folder unless moved) and the folder of a local store (SQLite: the database and its
lock file). A folder that cannot be written is bad input: one line naming its absolute path and the keys
that move what would go there, exit 2. The check tries what the sweep will do there, creating a file
(`os.access` would not do: root passes it on a read-only mount). Nothing heavy is imported here.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sweepbp.cli.paths import config_dir
from sweepbp.config import RunConfig
from sweepbp.tracking import NONE, backend

RUN_DIR, SWEEP_DIR = "hydra.run.dir", "hydra.sweep.dir"
# What each key could be set to instead, in the one line
EXAMPLES = {RUN_DIR: f"{RUN_DIR}=/writable/outputs", SWEEP_DIR: f"{SWEEP_DIR}=/writable/multirun",
            "tracking.uri": "tracking.uri=sqlite:////writable/mlflow.db"}


def folder_problems(overrides: list[str], multirun: bool, runs: list[RunConfig]) -> list[str]:
    """One line per folder that the sweep would write to and cannot (the job folders' and the stores')."""
    key = SWEEP_DIR if multirun else RUN_DIR
    places = [(key, job_folder(overrides, key))]
    for run in runs:
        tracking = run.cfg.tracking
        folder = backend(tracking.name).folder(tracking.uri) if tracking.name != NONE else None
        if folder is not None and folder.is_dir():  # a missing one is the store check's ("does not exist")
            places.append(("tracking.uri", folder))
    failing: dict[Path, tuple[str, list[str]]] = {}
    for name, target in places:
        folder = existing_ancestor(target)
        reason = unwritable(folder)
        if reason is not None and name not in failing.setdefault(folder, (reason, []))[1]:
            failing[folder][1].append(name)
    return [_line(folder, reason, keys) for folder, (reason, keys) in failing.items()]


def job_folder(overrides: list[str], key: str) -> Path:
    """The absolute job (or sweep) folder Hydra will create for these overrides: `key` composed and resolved
    (`${now:...}` included); where it cannot be resolved here, the part before the first interpolation."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="sweepbp"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    text = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
    if text is None:  # an interpolation only Hydra's launch resolves
        parent, leaf = key.rsplit(".", 1)
        text = OmegaConf.to_container(OmegaConf.select(cfg, parent), resolve=False)[leaf].split("${", 1)[0]
    return Path(os.path.abspath(text))


def existing_ancestor(path: Path) -> Path:
    """`path` if it exists, else its nearest existing parent: where the first folder or file gets created."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def unwritable(folder: Path) -> str | None:
    """Why no file can be created in `folder` (by trying, then removing it), or None."""
    try:
        handle, name = tempfile.mkstemp(prefix=".sweepbp-write-check-", dir=folder)
    except OSError as err:
        return f"[Errno {err.errno}] {err.strerror}" if err.strerror else str(err)
    os.close(handle)
    os.unlink(name)
    return None


def _line(folder: Path, reason: str, keys: list[str]) -> str:
    where = f"{folder}, the launch folder" if folder == Path.cwd() else str(folder)
    them = "them" if len(keys) > 1 else "it"
    return (f"{' and '.join(keys)} must be in a folder sweepbp can write, got {where} ({reason}); move {them} "
            f"elsewhere, e.g. {' '.join(EXAMPLES[key] for key in keys)}")
