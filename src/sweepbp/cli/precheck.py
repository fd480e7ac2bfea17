"""Pre-flight: every job of a sweep composed like Hydra will and validated, one line per problem.

Nothing heavy is imported here (no torch, transformers, Lightning or mlflow), so a typo costs well under two
seconds: `sweepbp: error: lora.r must be a positive integer, got 0`.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import functools
import importlib.util
import itertools
import os
import re
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

from sweepbp.cli.folders import folder_problems
from sweepbp.cli.launchers import PRESETS, REMOTE_LAUNCHERS, launcher_options
from sweepbp.cli.paths import config_dir, user_config_dir
from sweepbp.cli.suggest import did_you_mean, option_with_field, similar_key
from sweepbp.config import (
    GB,
    GROUPS,
    ConfigError,
    RunConfig,
    SweepbpConfig,
    needs_bitsandbytes,
    redact_uri,
    to_run_config,
)
from sweepbp.tracking import NONE, backend

# OmegaConf's type errors: "Value 'abc' of type 'str' could not be converted to Integer", "... is not a valid bool"
CONVERSION = re.compile(r"Value '(.*)' (?:of type '.*' could not be converted to (\w+)|is not a valid (bool))")
KINDS = {"Integer": "an integer", "Float": "a number", "bool": "true or false", "String": "a string"}
INFO_FLAGS = ("help", "hydra_help", "cfg", "info", "shell_completion", "resolve")
MAX_PRECHECKED_JOBS = 512


def precheck(args: list[str], on_first_valid: Callable[[RunConfig, list[str]], None] | None = None,
             notes: list[str] | None = None, runs: list[RunConfig] | None = None) -> tuple[list[str], int]:
    """Problems of every job of the sweep (empty if none) and the number of jobs; what the jobs ask that
    deserves a word but no refusal goes into `notes` (once each), and every job's validated config into `runs`.

    `on_first_valid` is called once, with the first job that validates: the command line starts the
    pre-importing worker there, so the heavy imports overlap with checking the remaining jobs.
    """
    parsed = get_args_parser().parse_args(args)
    if any(getattr(parsed, flag, None) for flag in INFO_FLAGS):  # --cfg job shows a config: composing is checked
        return _first_job_composition_problems(parsed.overrides), 1
    try:
        # With -cd/-cp/-cn Hydra reads configs this check does not see: leave Hydra's own settings to Hydra.
        own_config = any(getattr(parsed, flag, None) for flag in ("config_dir", "config_path", "config_name"))
        combos = expand(parsed.overrides, multirun=parsed.multirun, with_hydra=not own_config)
    except ConfigError as err:
        return err.problems, 0
    if combos is None:  # Hydra's sweeper validates every job itself; check what can be checked here
        problems, _ = precheck([a for a in args if "glob(" not in a], on_first_valid)
        return problems, 0
    problems: list[str] = []
    runs = [] if runs is None else runs
    here = runs_here(parsed.overrides)
    compositions = Compositions()
    for combo in combos[:MAX_PRECHECKED_JOBS]:
        lines, run = check_job(combo, here, compositions)
        for line in lines:
            if line not in problems:
                problems.append(line)
        if run is not None:
            runs.append(run)
        if run is not None and notes is not None:
            notes.extend(n for n in [*attention_notes(run), *budget_notes(run, here), *dtype_notes(run)]
                         if n not in notes)
        if run is not None and not problems and on_first_valid is not None:
            on_first_valid(run, parsed.overrides)
            on_first_valid = None
    if combos and not problems and not own_config:
        problems = folder_problems(combos[0], parsed.multirun, runs)
    return problems, len(combos)


def expand(overrides: list[str], multirun: bool, with_hydra: bool = True) -> list[list[str]] | None:
    """The override list of every job (the cartesian product, as Hydra's basic sweeper makes it);
    None for sweeps only Hydra can expand (glob()). Overrides of Hydra's own settings (hydra.*,
    hydra/launcher=...) go with every job unless `with_hydra` is false; sweeps of them are Hydra's."""
    parser = OverridesParser.create()
    parsed = []
    for line in overrides:  # one at a time, so the message can name the override that is wrong
        try:
            parsed.append(parser.parse_override(line))
        except HydraException as err:
            raise ConfigError([_parse_message(line, err)]) from None
    axes: list[list[str]] = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_hydra_override() and (override.is_sweep_override() or not with_hydra):
            continue  # Hydra checks these itself
        if override.is_sweep_override():
            if not multirun:
                raise ConfigError([f"{override.input_line} is a sweep: add -m (--multirun) to run each value"])
            try:
                values = list(override.sweep_string_iterator())
            except Exception:  # glob() and other sweeps Hydra expands itself: checked per job instead
                return None
            axes.append([f"{key}={v}" for v in values])
        else:
            axes.append([override.input_line])
    return [list(combo) for combo in itertools.product(*axes)]


def check_job(overrides: list[str], runs_here: bool = True,
              compositions: Compositions | None = None) -> tuple[list[str], RunConfig | None]:
    """Compose one job like Hydra will and validate it, its tracking store and (for jobs that run on this
    machine) what it asks of the devices; problems as one-liners, and the job when there are none."""
    problems, run = check_job_config(overrides, compositions)
    if run is not None and not problems:
        problems = tracking_problems(run) + ((package_problems(run) or device_problems(run)) if runs_here else [])
    return problems, run


def check_job_config(overrides: list[str],
                     compositions: Compositions | None = None) -> tuple[list[str], RunConfig | None]:
    """Compose one job like Hydra will and validate its config (not its tracking store)."""
    try:
        cfg = compositions.composed(overrides) if compositions is not None else _composed(overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        return [_hydra_message(err, overrides)], None
    choices = dict(cfg.hydra.runtime.choices)
    try:
        return [], to_run_config(_without_hydra(cfg), choices)
    except ConfigError as err:
        return err.problems, None


def _composed(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="sweepbp"):
        return compose("config", overrides=overrides, return_hydra_config=True)


# Top-level fields of the config that are not groups (mode=predict, budget_gb=24): plain field overrides too.
TOP_FIELDS = frozenset(f.name for f in dataclasses.fields(SweepbpConfig)) - set(GROUPS)


class Compositions:
    """Pre-flight's compositions of one sweep's jobs: Hydra composes each distinct choice of groups (with the
    overrides of Hydra's own settings) once, and a job's plain field overrides (`batch.size=2`) are applied to a
    copy of it as Hydra applies a job's field overrides once its groups are composed, in their order, through
    Hydra's own `_apply_overrides_to_config` (one composition is 0.1-0.3 s, a copy and its overrides 5 ms). A job
    with any other override (`+key=...`, `~key`, a dict for a group, a group of the user's ./conf), or whose
    overrides do not apply, is composed by Hydra whole, so that an error is Hydra's own."""

    def __init__(self) -> None:
        self.parser = OverridesParser.create()
        self.bases: dict[tuple[str, ...], DictConfig] = {}
        self.failed: set[tuple[str, ...]] = set()  # choices of groups that do not compose (their jobs: whole)
        user = user_config_dir()  # groups of its own there (its options of sweepbp's groups compose as any)
        self.user_groups = {p.name for p in user.iterdir() if p.is_dir()} - set(GROUPS) if user is not None else set()

    def composed(self, overrides: list[str]) -> DictConfig:
        split = self._split(overrides)
        if split is None or split[0] in self.failed:
            return _composed(overrides)
        structural, fields = split
        try:
            if structural not in self.bases:
                self.bases[structural] = _composed(list(structural))
        except (HydraException, OmegaConfBaseException, ValueError):
            self.failed.add(structural)
            return _composed(overrides)  # Hydra's own error, for the job as given
        cfg = copy.deepcopy(self.bases[structural])
        try:
            ConfigLoaderImpl._apply_overrides_to_config(fields, cfg)
        except (HydraException, OmegaConfBaseException, ValueError):
            return _composed(overrides)
        return cfg

    def _split(self, overrides: list[str]) -> tuple[tuple[str, ...], list[Override]] | None:
        """(the overrides Hydra composes: groups and Hydra's own settings, the plain field overrides applied
        after), or None when the job is Hydra's whole."""
        structural: list[str] = []
        fields: list[Override] = []
        for line in overrides:
            try:
                override = self.parser.parse_override(line)
            except HydraException:
                return None
            key = override.key_or_group
            if override.package is not None or override.is_sweep_override() or key in self.user_groups:
                return None
            if key in GROUPS and isinstance(override.value(), dict):  # `lora={r: 8}`: a field override to Hydra,
                return None                                           # applied in its place among the others
            if override.is_hydra_override() or key in GROUPS:
                structural.append(line)
            elif override.type == OverrideType.CHANGE and (key in TOP_FIELDS or key.split(".")[0] in GROUPS):
                fields.append(override)
            else:
                return None
        return tuple(structural), fields


def _first_job_composition_problems(overrides: list[str]) -> list[str]:
    """What Hydra would print as a multi-line error for `--cfg job`, `--info` and the like, as one line: a key or
    option that does not compose (a config that composes is shown even when it would not validate)."""
    try:
        combos = expand(overrides, multirun=True)
    except ConfigError as err:
        return err.problems
    if not combos:
        return []
    try:
        _composed(combos[0])
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        return [_hydra_message(err, combos[0])]
    return []


def tracking_problems(run: RunConfig) -> list[str]:
    """Whether the job's tracking store can be reached (HTTP servers are asked for /health)."""
    tracking = run.cfg.tracking
    if tracking.name == NONE:
        return []
    try:
        kind = backend(tracking.name)
    except ConfigError as err:
        return err.problems
    reason = kind.unreachable(tracking.uri)
    if reason:
        return [f"tracking.uri must be a reachable {kind.title} store, got {redact_uri(tracking.uri)!r} ({reason})"]
    return []


EAGER_LONG = 2048  # batch.seq_len from which eager attention's score matrices get a note


def attention_notes(run: RunConfig) -> list[str]:
    """Eager attention at a long sequence keeps (batch, heads, seq, seq) scores per layer: say how large."""
    cfg = run.cfg
    model = cfg.model
    if model.attn_implementation != "eager" or cfg.batch.seq_len < EAGER_LONG:
        return []
    heads = model.config.get("num_attention_heads")  # a file's own, for a model read from one (with_file_shape)
    if not isinstance(heads, int):
        return []
    size = 1 if cfg.batch.size == "auto" else int(cfg.batch.size)
    element = 2 if model.dtype in ("bfloat16", "float16") else 4
    scores = size * heads * cfg.batch.seq_len ** 2 * (4 + element)  # fp32 softmax and its cast, per layer
    return [f"model.attn_implementation=eager at batch.seq_len={cfg.batch.seq_len} keeps (batch, heads, seq, seq) "
            f"attention scores: about {scores / 1e9:.1f} GB per layer at batch.size={size} (mode=predict gives "
            "the whole step)"]


WEIGHT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # the model.dtype options (config/schema.py DTYPES)


def dtype_notes(run: RunConfig) -> list[str]:
    """A local checkpoint or config file whose config.json names a dtype other than `model.dtype`: the job
    builds the weights in model.dtype (float32 by default), which changes their memory and speed. The file's
    fields are the run's model.config (with_file_shape)."""
    model = run.cfg.model
    key = "model.pretrained_path" if model.pretrained_path is not None else "model.config_path"
    if model.pretrained_path is None and model.config_path is None:
        return []
    stored = model.config.get("dtype") or model.config.get("torch_dtype")  # transformers 5: dtype, 4.x: torch_dtype
    if stored not in WEIGHT_BYTES or stored == model.dtype:
        return []
    return [f"{key}'s config.json says dtype {stored} but model.dtype={model.dtype}: the weights are built in "
            f"{model.dtype} ({WEIGHT_BYTES[model.dtype]} bytes a weight instead of {WEIGHT_BYTES[stored]}); add "
            f"model.dtype={stored} to train them as stored"]


def budget_notes(run: RunConfig, here: bool) -> list[str]:
    """batch.size=auto sized to a budget above this machine's memory, measured here without a GPU: the job
    would swap or be killed before it reports."""
    cfg = run.cfg
    if not here or cfg.mode != "measure" or cfg.batch.size != "auto" or cfg.budget_gb is None:
        return []
    if cfg.trainer.accelerator not in ("auto", "cpu") or local_cuda_gpus() != 0:
        return []
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if cfg.budget_gb * GB <= host:
        return []
    return [f"budget_gb={cfg.budget_gb:g} is more than this machine's memory ({host / GB:.1f} GB) and the jobs run "
            "on its CPU: batch.size=auto will choose a batch that can swap or be killed; lower budget_gb, or use "
            "mode=predict to size a GPU's batch"]


def notes(overrides: list[str]) -> list[str]:
    """What a command line asks that has no effect (said, not refused): `lora.*` with method=full, `data.pad_to`
    with data.packing=true, the shape of a model read from a file (`model.config.*`, `model.arch` with
    model.config_path or model.pretrained_path)."""
    said = []
    if chosen_option(overrides, "method") == "full":
        ignored = [o for o in overrides if o.lstrip("+~").startswith("lora.") or o.lstrip("+").startswith("lora=")]
        said += [f"{o} has no effect with method=full (every weight trains; there is no adapter)" for o in ignored]
    if any(o.lstrip("+") in ("data.packing=true", "data.packing=True") for o in overrides):
        said += [f"{o} has no effect with data.packing=true (packed rows are full: nothing is padded)"
                 for o in overrides if o.lstrip("+~").startswith("data.pad_to=")]
    source = next((key for key in ("model.pretrained_path", "model.config_path")
                   if any(o.lstrip("+").split("=", 1)[0] == key for o in overrides)), None)
    if source is not None:
        shape = [o for o in overrides if o.lstrip("+~").startswith(("model.config.", "model.arch="))]
        said += [f"{o} has no effect with {source} (its config.json is the shape; the job records that file's "
                 "fields as model.arch and model.config.*)" for o in shape]
    return said


def chosen_option(overrides: list[str], group: str) -> str | None:
    """The option of `group` an override list chose (`memory=ckpt` -> ckpt; the last one, as Hydra), or None."""
    chosen = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == group]
    return chosen[-1] if chosen else None


def launcher_of(overrides: list[str]) -> str:
    """The `hydra/launcher` option a command line chose (`basic`, Hydra's default, when it chose none)."""
    return chosen_option(overrides, "hydra/launcher") or "basic"


def runs_here(overrides: list[str]) -> bool:
    """Whether the jobs run on this machine (not on a cluster's nodes, whose devices this one cannot see)."""
    return launcher_of(overrides) not in REMOTE_LAUNCHERS


def package_problems(run: RunConfig) -> list[str]:
    """Optional extras the job's options need that this machine has not installed (jobs run here)."""
    cfg = run.cfg
    if needs_bitsandbytes("quant", cfg.quant.name) and importlib.util.find_spec("bitsandbytes") is None:
        return [f"quant must be none without bitsandbytes installed, got {cfg.quant.name!r} "
                "(install the extra: pip install -e \".[quant]\")"]
    if needs_bitsandbytes("optim", cfg.optim.name) and importlib.util.find_spec("bitsandbytes") is None:
        return [f"optim must be adamw, adafactor or sgd without bitsandbytes installed, got {cfg.optim.name!r} "
                "(install the extra: pip install -e \".[quant]\")"]
    if cfg.mode == "measure" and cfg.loss.name == "liger" and importlib.util.find_spec("liger_kernel") is None:
        return ["loss must be standard, chunked or fused without liger-kernel installed, got 'liger' "
                "(install it on a CUDA machine: pip install -e \".[liger]\")"]
    return []


def device_problems(run: RunConfig) -> list[str]:
    """What the job asks of this machine's devices that it does not have (mode=measure, jobs run here)."""
    cfg = run.cfg
    if cfg.mode != "measure" or local_cuda_gpus() != 0:
        return []
    if cfg.optim.name == "paged_adamw8bit":
        return ["optim must be adamw, adamw8bit, adafactor or sgd on a machine without a CUDA GPU, got "
                "'paged_adamw8bit' (paged state lives in CUDA unified memory)"]
    if cfg.loss.name == "liger":
        return ["loss must be standard, chunked or fused on a machine without a CUDA GPU, got 'liger' "
                "(liger-kernel's Triton kernels run on CUDA GPUs only)"]
    if cfg.strategy.name == "fsdp":
        return ["strategy must be single or ddp on a machine without a CUDA GPU, got 'fsdp' (FSDP shards over GPUs)"]
    if cfg.trainer.accelerator in ("gpu", "cuda"):
        return [f"trainer.accelerator must be auto or cpu on a machine without a CUDA GPU, got "
                f"{cfg.trainer.accelerator!r} (mode=predict predicts for a GPU without one)"]
    return []


@functools.cache
def local_cuda_gpus() -> int | None:
    """NVIDIA GPUs this process may use, asked of the driver's NVML library (no torch: pre-flight stays fast);
    None when that cannot be known here: device files without NVML (some containers, Jetson), or an AMD GPU
    (ROCm builds of torch answer to "cuda" too). Pre-flight refuses a job only on a definite 0."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        devices = [*Path("/dev").glob("nvidia[0-9]*"), Path("/dev/kfd")]
        return None if any(d.exists() for d in devices) else 0
    count = ctypes.c_uint(0)
    if nvml.nvmlInit_v2() != 0:
        return 0
    try:
        found = nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0
    finally:
        nvml.nvmlShutdown()
    return count.value if found else 0


def _without_hydra(cfg: DictConfig) -> DictConfig:
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _parse_message(line: str, err: Exception) -> str:
    details = [ln for ln in str(err).strip().splitlines()
               if ln and not ln.startswith("Error parsing override") and not ln.startswith("See https")]
    detail = f" ({details[0]})" if details else ""
    return f"malformed override {line!r}{detail}: expected key=value, e.g. lora.r=16, lora.r=8,16 with -m"


def _hydra_message(err: Exception, overrides: list[str]) -> str:
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    if "Could not find" in first or "Could not load" in first:
        for group in (*GROUPS, "hydra/launcher"):
            chosen = chosen_option(overrides, group)
            if chosen is not None and f"'{group}/{chosen}'" in first:
                options = _options(group)
                return (f"{group} must be one of {', '.join(options)}, got {chosen!r}{_install_hint(chosen)}"
                        f"{did_you_mean(chosen, options)}")
    cause = err.__cause__
    key = getattr(cause, "full_key", None)
    if cause is not None and key:  # OmegaConf's reason, which names the key
        reason = str(cause).strip().splitlines()[0]
        converted = CONVERSION.match(reason)
        if converted:
            kind = converted.group(2) or converted.group(3)
            kind = KINDS.get(kind, kind)
            return f"{key} must be {kind}, got {converted.group(1)!r}"
        if reason.startswith("Key "):
            line = next((o for o in overrides if o.split("=", 1)[0].lstrip("+~") == key), key)
            listing = "hydra" if key.startswith("hydra.") else "job"
            parent = getattr(cause, "parent_node", None)
            hint = option_with_field(key, parent) or similar_key(key, parent)
            return (f"{key} must be a key of the config (list them: python -m sweepbp --cfg {listing}), "
                    f"got {line!r}{hint}")
        return f"{key}: {reason}"
    if "full_key" in text:
        key = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if "full_key" in ln), "")
        return f"{key}: {first}" if key else first
    return first


def _options(group: str) -> list[str]:
    if group == "hydra/launcher":
        return launcher_options(available_options(group))
    return available_options(group)


def _install_hint(option: str) -> str:
    return " (install the launcher plugins: pip install -e \".[launchers]\")" if option in PRESETS else ""


def available_options(group: str) -> list[str]:
    """Option names of a config group: shipped YAML files plus the user's ./conf/<group>/."""
    folders = [config_dir() / group]
    user = user_config_dir()
    if user is not None:
        folders.append(user / group)
    return sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.yaml")})
