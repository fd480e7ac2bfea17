"""Hydra's basic sweeper, minus its second composition of every job.

Before launching a batch, Hydra's BasicSweeper composes every job of it once more to catch composition
errors early (`validate_batch_is_legal`); the launcher then composes each job again to run it. `python -m
sweepbp` has already composed and validated every job (cli.precheck, with one-line errors) before Hydra
starts, so this sweeper skips Hydra's check when the command line says so (SWEEPBP_PRECHECKED=1): one
composition less per job (0.2-0.4 s each on a 2-core machine). Selected in conf/config.yaml; everything else,
including `max_batch_size`, is the basic sweeper's. Hydra only instantiates plugins from the
`hydra_plugins` package, hence its place; importing it (Hydra's plugin discovery does) registers
`hydra/sweeper=sweepbp`.
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore

PRECHECKED = "SWEEPBP_PRECHECKED"


class PrecheckedSweeper(BasicSweeper):
    """BasicSweeper that trusts the command line's validation of every job."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        if os.environ.get(PRECHECKED) != "1":
            super().validate_batch_is_legal(batch)


@dataclass
class PrecheckedSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.sweepbp_sweeper.PrecheckedSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="sweepbp", node=PrecheckedSweeperConf, provider="sweepbp")
