"""Launcher presets under the plugins' own names: `hydra/launcher=joblib`, `submitit_local`, `submitit_slurm`.

The presets are the plugins' own structured configs (their schemas, so a misspelt field is an error) with
sweepbp's defaults, stored in Hydra's ConfigStore under the plugins' option names. A YAML file of the same
name in `conf/hydra/launcher/` could not do this: it would shadow the plugin's config without its schema
and could not extend it (its `defaults: [submitit_local]` would find itself). They are stored from
sweepbp's search-path plugin, which runs only when the application is sweepbp, so other Hydra
applications in the same environment keep the plugins' defaults. A launcher plugin that is not installed
is skipped (`pip install -e ".[launchers]"` installs both).

`submitit_local` runs one job at a time (jobs that share a GPU must not disturb each other's timings):
submitit's local executor has no limit, so `conf/config.yaml` sets the basic sweeper's
`hydra.sweeper.max_batch_size` from the launcher with the resolver `sweepbp_jobs_at_once`.
"""

from __future__ import annotations

from dataclasses import replace

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

LOCAL_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
TIME_LIMIT_MIN = 120  # a job still running after this is killed (sbatch --time on SLURM)

# Names sweepbp configures when their plugin is installed.
PRESETS = ("joblib", "submitit_local", "submitit_slurm")
# Launchers whose jobs run on other machines (pre-flight does not judge those machines' devices by this one's).
REMOTE_LAUNCHERS = ("submitit_slurm",)


def launcher_options(user_files: list[str]) -> list[str]:
    """Every `hydra/launcher` option Hydra can find now: Hydra's own and the installed plugins' (all in the
    ConfigStore once Hydra has scanned its plugins) and option files of the user's ./conf."""
    stored = [name.removesuffix(".yaml") for name in ConfigStore.instance().list("hydra/launcher")]
    return sorted({*stored, *user_files}, key=lambda name: (name != "basic", name))


def jobs_at_once(launcher_target: str) -> int | None:
    """The sweeper's `max_batch_size` for a launcher: one job at a time for submitit_local, else all."""
    return 1 if launcher_target == LOCAL_LAUNCHER else None


def register_resolver() -> None:
    if not OmegaConf.has_resolver("sweepbp_jobs_at_once"):
        OmegaConf.register_new_resolver("sweepbp_jobs_at_once", jobs_at_once)


def register_launcher_presets() -> None:
    """Store sweepbp's presets over the plugins' configs (idempotent; skips plugins not installed)."""
    store = ConfigStore.instance()
    try:  # an optional plugin: the preset exists only where it is installed
        from hydra_plugins.hydra_joblib_launcher.config import JobLibLauncherConf
    except ImportError:
        pass
    else:
        # Two jobs at once share the cores (and a GPU): their timings disturb each other, their exact memory
        # figures do not. For mapping memory quickly; time with the basic launcher or submitit_local.
        store.store(group="hydra/launcher", name="joblib", provider="sweepbp",
                    node=replace(JobLibLauncherConf(), n_jobs=2))
    try:  # an optional plugin too
        from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
    except ImportError:
        return
    store.store(group="hydra/launcher", name="submitit_local", provider="sweepbp",
                node=replace(LocalQueueConf(), timeout_min=TIME_LIMIT_MIN, gpus_per_node=1))
    store.store(group="hydra/launcher", name="submitit_slurm", provider="sweepbp",
                node=replace(SlurmQueueConf(),
                             timeout_min=TIME_LIMIT_MIN,
                             gpus_per_node=1,        # one GPU per job: measurements never share a device
                             tasks_per_node=1,       # multi-GPU jobs start their ranks themselves (strategy=ddp)
                             cpus_per_task=8,        # data generation and the host side of the step
                             mem_gb=64,              # host memory per job
                             array_parallelism=16))  # at most this many jobs of the sweep run at once
