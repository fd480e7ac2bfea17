"""Where the config groups are: the shipped conf/ and the user's ./conf. Nothing else is imported here: the
search-path plugin (src/hydra_plugins/sweepbp_searchpath) imports it in every Hydra application."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> Path:
    """The shipped conf/: inside the installed package, or at the root of a source checkout."""
    package = Path(__file__).resolve().parents[1]  # src/sweepbp
    packaged = package / "conf"
    if packaged.is_dir():
        return packaged
    return package.parents[1] / "conf"


def user_config_dir() -> Path | None:
    """./conf of the working folder: a user's own option files (e.g. conf/model/my_model.yaml)."""
    folder = Path.cwd() / "conf"
    return folder if folder.is_dir() and folder.resolve() != config_dir().resolve() else None
