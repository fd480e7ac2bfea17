"""Hydra's basic sweeper, composing each job once, before the batch is launched.

Before launching a batch, Hydra's BasicSweeper composes every job of it to catch composition errors early
(`validate_batch_is_legal`) and throws the configs away; its basic launcher then composes each job again to
run it (0.15-0.4 s a composition on a 2-core machine). With the basic launcher, which runs the jobs in this
process, this sweeper keeps the check's compositions and hands them to the launcher (`ComposedAhead`): one
composition per job, all of a batch's made before its first job starts, while the jobs' fork server is still
importing their libraries (sweepbp/sweep/worker.py), instead of one between every two jobs. A composition is
the same call with the same arguments either way (Hydra's `load_sweep_config`), only earlier.

Launchers whose jobs run in other processes (joblib, submitit) compose there; for them this sweeper skips
Hydra's check when `python -m sweepbp` has already composed and validated every job (cli.precheck,
SWEEPBP_PRECHECKED=1). Selected in conf/config.yaml; everything else, including `max_batch_size`, is the basic
sweeper's. Hydra only instantiates plugins from the `hydra_plugins` package, hence its place; importing it
(Hydra's plugin discovery does) registers `hydra/sweeper=sweepbp`.
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_loader import ConfigLoader
from hydra.core.config_store import ConfigStore
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

PRECHECKED = "SWEEPBP_PRECHECKED"
AHEAD = 64  # jobs of a batch composed before it starts, at most (the launcher composes the rest as they run)


class ComposedAhead(ConfigLoader):
    """Hydra's config loader, handing the launcher the job configs composed for it ahead of the launch (each
    once); everything else, and a job not composed ahead, is the wrapped loader's."""

    def __init__(self, loader: ConfigLoader) -> None:
        self.loader = loader
        self.ready: dict[tuple[str, ...], list[DictConfig]] = {}

    def compose_ahead(self, master_config: DictConfig, overrides: Sequence[str]) -> None:
        composed = self.loader.load_sweep_config(master_config, list(overrides))
        self.ready.setdefault(tuple(overrides), []).append(composed)

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        ready = self.ready.get(tuple(sweep_overrides))
        if ready:
            return ready.pop(0)
        return self.loader.load_sweep_config(master_config, sweep_overrides)

    def load_configuration(self, *args: Any, **kwargs: Any) -> DictConfig:
        return self.loader.load_configuration(*args, **kwargs)

    def get_search_path(self) -> Any:
        return self.loader.get_search_path()

    def get_sources(self) -> Any:
        return self.loader.get_sources()

    def list_groups(self, parent_name: str) -> Any:
        return self.loader.list_groups(parent_name)

    def get_group_options(self, *args: Any, **kwargs: Any) -> Any:
        return self.loader.get_group_options(*args, **kwargs)

    def compute_defaults_list(self, *args: Any, **kwargs: Any) -> Any:
        return self.loader.compute_defaults_list(*args, **kwargs)


class PrecheckedSweeper(BasicSweeper):
    """BasicSweeper whose check of a batch is also the basic launcher's composition of its jobs, and which
    trusts the command line's validation of every job for launchers that compose elsewhere."""

    ahead: ComposedAhead | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        if isinstance(self.launcher, BasicLauncher):  # its jobs run in this process: compositions can be handed over
            self.ahead = ComposedAhead(hydra_context.config_loader)
            self.launcher.hydra_context = replace(hydra_context, config_loader=self.ahead)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        rest = batch
        if self.ahead is not None:
            for overrides in batch[:AHEAD]:
                self.ahead.compose_ahead(self.config, overrides)
            rest = batch[AHEAD:]
        if rest and os.environ.get(PRECHECKED) != "1":
            super().validate_batch_is_legal(rest)


@dataclass
class PrecheckedSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.sweepbp_sweeper.PrecheckedSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="sweepbp", node=PrecheckedSweeperConf, provider="sweepbp")
