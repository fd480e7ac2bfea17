"""`python -m sweepbp --help`: the groups, their options and the composed config, in well under a second.

Hydra's own `--help` lists config groups by composing the whole search path once per group (about 80
deep copies of the config repository: 2-4 s on a 2-core machine), so sweepbp answers `--help` itself from
the option files and one composition. `--hydra-help` still goes to Hydra.
"""

from __future__ import annotations

import platform
from importlib import metadata

from sweepbp import __version__
from sweepbp.cli.launchers import launcher_options
from sweepbp.cli.precheck import available_options, check_job_config
from sweepbp.config import GROUPS, config_yaml

EXAMPLES = """\
  python -m sweepbp                                   one job with the defaults below
  python -m sweepbp memory=ckpt lora.r=16             one job, two choices changed
  python -m sweepbp -m lora.r=8,16 memory=none,ckpt   a sweep: the cartesian product, one job each
  python -m sweepbp -m ... hydra/launcher=joblib      the same sweep, jobs in parallel (see docs/scaling.md)
  python -m sweepbp --cfg job memory=ckpt             print the composed config and stop"""

FLAGS = """\
  -m, --multirun     run every combination of the comma-separated values (a sweep)
  -c, --cfg job      print the composed config instead of running
  --hydra-help       Hydra's own help (its flags and config groups)
  --version          sweepbp's version and its stack's"""
# The libraries a measurement depends on, by their distribution names (`--version`).
STACK = ("torch", "transformers", "peft", "lightning", "hydra-core", "mlflow", "bitsandbytes")


def help_text(overrides: list[str]) -> str:
    """The help page: usage, flags, every group's options, and the config the overrides compose to."""
    problems, run = check_job_config(overrides)  # also lets Hydra find its launcher plugins
    lines = [f"  {group}: {', '.join(available_options(group))}" for group in GROUPS]
    launchers = launcher_options(available_options("hydra/launcher"))
    lines.append(f"  hydra/launcher: {', '.join(launchers)}  (docs/scaling.md)")
    groups = "\n".join(lines)
    if run is not None:
        config = config_yaml(run.cfg).rstrip()
    else:
        config = "\n".join(f"  (cannot compose: {line})" for line in problems)
    return (f"sweepbp: sweep the compute-versus-memory trade-off of LoRA backpropagation.\n\n"
            f"Usage: python -m sweepbp [-m] [group=option ...] [key.path=value ...]\n\n{EXAMPLES}\n\n"
            f"Flags:\n{FLAGS}\n\n"
            f"== Config groups (group=option) ==\n{groups}\n\n"
            f"== Config{' with ' + ' '.join(overrides) if overrides else ''} (override any key: key.path=value) ==\n"
            f"{_indent(config)}\n")


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" if line else line for line in text.splitlines())



def version_text() -> str:
    """`--version`: sweepbp's version, then the stack's, read from the installed packages' metadata (nothing is
    imported: answering takes no longer than --help)."""
    return f"sweepbp {__version__}\n" + ", ".join(f"{name} {_installed(name)}" for name in STACK) + (
        f" (Python {platform.python_version()})")


def _installed(name: str) -> str:
    for distribution in (name, f"{name}-skinny"):  # mlflow may be installed as mlflow-skinny alone
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"
