"""What a sweep and its jobs are called in the tracking store, so that a list of runs can be read.

A sweep's parent run is named after what the command line swept and how many jobs that made
(`lora.r=8,16 x memory=ckpt,none (4 jobs)`, then the fixed overrides) and carries those overrides as
params; a job's run is named after its values of the swept keys (Hydra's `override_dirname` idea, keys
shortened: `memory=ckpt r=8`), unique within its sweep. The command line knows the sweep's overrides; the
parent run is opened by whichever job comes first, possibly in another process (joblib, SLURM), so the
command line hands them over in the environment (`PLAN_ENV`), as it does the sweep's size.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from sweepbp.report.summary import short_keys
from sweepbp.tracking import SweepAbout
from sweepbp.tracking.redaction import redact_text

PLAN_ENV = "SWEEPBP_SWEEP_PLAN"
LONGEST = 240  # characters of a run name (MLflow's table shows about 40; the run page the whole name)
UNNAMED = ("hydra", "tracking")  # where jobs run and are recorded: not what they measure, so not in names


@dataclass(frozen=True)
class Override:
    """One `key=value` of a command line, as typed (`lora.r=8,16`: a swept key with its values)."""

    key: str  # without Hydra's `+`, `++` or `~`
    text: str  # the value as typed, credentials hidden
    values: tuple[str, ...] = ()  # the values of a swept key; empty for a fixed one

    @property
    def named(self) -> bool:
        """Whether it says something about the measurement (not Hydra's settings or the tracking store)."""
        return self.key.split(".", 1)[0].split("/", 1)[0] not in UNNAMED


@dataclass(frozen=True)
class SweepPlan:
    """A sweep as its command line asked for it: its overrides and how many jobs they make."""

    overrides: tuple[Override, ...]
    jobs: int  # 0 when only Hydra can count them (glob())

    @classmethod
    def of(cls, lines: list[str], jobs: int) -> SweepPlan:
        """The plan of a command line's overrides (Hydra's own parser: `8,16`, `range(0,3)`, `choice(...)`)."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
        parsed = []
        for line in lines:
            override = parser.parse_override(line)
            # credentials hidden wherever a URI is, quoted or swept (the parent run shows the command line)
            key, text = override.key_or_group, redact_text(line.split("=", 1)[1] if "=" in line else "")
            values: tuple[str, ...] = ()
            if override.is_sweep_override():
                try:
                    values = tuple(redact_text(v) for v in override.sweep_string_iterator())
                except Exception:  # noqa: BLE001 (glob() and sweeps only Hydra expands: shown as typed)
                    values = (text,)
                if len(values) == 1 and values[0] != text:  # choice(2) varies nothing: fixed at 2 (cli/main.py)
                    text, values = values[0], ()
            parsed.append(Override(key, text, values))
        return cls(tuple(parsed), jobs)

    @property
    def swept(self) -> list[Override]:
        return [o for o in self.overrides if o.values and o.named]

    @property
    def fixed(self) -> list[Override]:
        return [o for o in self.overrides if not o.values and o.named]

    @property
    def name(self) -> str:
        """`lora.r=8,16 x memory=ckpt,none (4 jobs)`, then the fixed overrides: `...; model=llama3_8b`."""
        swept = " x ".join(f"{o.key}={o.text}" for o in self.swept)
        fixed = " ".join(f"{o.key}={o.text}" for o in self.fixed)
        count = f"({self.jobs} job{'' if self.jobs == 1 else 's'})" if self.jobs else "(jobs: Hydra's count)"
        head = f"{swept} {count}" if swept else f"{fixed or 'defaults'} {count}"
        return _shortened(f"{head}; {fixed}" if swept and fixed else head)

    @property
    def command(self) -> str:
        """The command line that made the sweep (credentials hidden)."""
        return " ".join(["python -m sweepbp -m", *(f"{o.key}={o.text}" for o in self.overrides)])

    def about(self) -> SweepAbout:
        """What the sweep's parent run says of it: its name, command line and params."""
        return SweepAbout(self.name, self.command, self.params())

    def params(self) -> dict[str, str]:
        """The sweep's overrides as the parent run's params, under the jobs' param names (`lora.r` = `8,16`)."""
        return {o.key: o.text[:6000] for o in self.overrides if o.named}

    def job_name(self, job_overrides: list[str], number: int) -> str:
        """A job's run name: its values of the swept keys, shortened (`memory=ckpt r=8`); the job's number is
        added where values repeat (`trainer.seed=0,0`) or only Hydra knew the values."""
        swept = [o.key for o in self.swept]
        values = dict(_key_value(line) for line in job_overrides)
        name = _joined({k: values[k] for k in swept if k in values}) or _joined(
            {o.key: values.get(o.key, o.text) for o in self.fixed})
        return f"{name or 'defaults'} #{number}" if not self._names_unique() else name or "defaults"

    def _names_unique(self) -> bool:
        axes = [o.values for o in self.swept]
        distinct = all(len(set(v)) == len(v) for v in axes)
        return distinct and self.jobs == math.prod(len(v) for v in axes)

    def to_env(self) -> str:
        return json.dumps({"jobs": self.jobs, "overrides": [[o.key, o.text, list(o.values)] for o in self.overrides]})

    @classmethod
    def from_env(cls) -> SweepPlan | None:
        """The plan the command line handed over, or None (a sweep not started by `python -m sweepbp`)."""
        text = os.environ.get(PLAN_ENV)
        if not text:
            return None
        data = json.loads(text)
        return cls(tuple(Override(k, t, tuple(v)) for k, t, v in data["overrides"]), int(data["jobs"]))


def run_name(plan: SweepPlan | None, job_overrides: list[str], number: int, fallback: str) -> str:
    """A job's run name: its values of the swept keys in a sweep, its overrides in a single run, else `fallback`
    (a description of its config: a rerun, a single run of the defaults)."""
    if plan is not None:
        return plan.job_name(job_overrides, number)
    return single_run_name(job_overrides) or fallback


def plan_of_folder(sweep_dir: Path) -> SweepPlan | None:
    """The plan of a sweep that ran, from its folder: Hydra's multirun.yaml keeps the command line's overrides
    (credentials scrubbed), the job folders count the jobs (`python -m sweepbp.report --sync`)."""
    saved = sweep_dir / "multirun.yaml"
    if not saved.is_file():
        return None
    from omegaconf import OmegaConf  # only for a sweep folder being synced

    overrides = list(OmegaConf.load(saved).hydra.overrides.task)
    jobs = sum(1 for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    return SweepPlan.of(overrides, jobs)


def job_overrides(job_dir: Path) -> list[str]:
    """A job's own overrides, as Hydra saved them in its folder (.hydra/overrides.yaml)."""
    saved = job_dir / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(line) for line in OmegaConf.load(saved)]


def single_run_name(overrides: list[str]) -> str | None:
    """A single run's name: its command line's overrides, shortened (`lora=attn r=16`); None for none."""
    values = dict(_key_value(line) for line in overrides)
    return _joined({k: v for k, v in values.items() if Override(k, v).named}) or None


def _key_value(line: str) -> tuple[str, str]:
    key, _, value = line.partition("=")
    return key.lstrip("+~"), value


def _joined(values: dict[str, str]) -> str:
    """`memory=ckpt r=8`: group options under the group's name, dotted keys by their last part when that is
    unambiguous."""
    keys = list(values)
    return _shortened(" ".join(f"{short}={values[key]}" for key, short in zip(keys, short_keys(keys))))


def _shortened(text: str) -> str:
    return text if len(text) <= LONGEST else text[:LONGEST - 1] + "…"
