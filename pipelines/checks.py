"""Checks shared by the run, sweep and search pipelines, made before anything starts: config keys that nothing takes,
nothing to train, and an output dir that holds another configuration's run, a live run or unexplained checkpoints.
Imports none of the pipelines."""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable
from pathlib import Path

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from evonorm.factory import NORM_ACT_LAYERS
from pipelines.records import (RESULTS_FILE, config_changes, describe_changes, effective_status, flat_items,
                               read_record)
from tasks import TASKS, extra_config_keys
from tasks.common.datasets import DatasetError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# may vary between attempts of one run (compile, channels_last: the same model and numerics up to float rounding)
CONFIG_KEYS_OF_AN_ATTEMPT = ("ckpt_path", "resume", "output_dir", "logger", "heartbeat_s", "report", "compile",
                             "channels_last", "divergence")
# the top-level keys of conf/config.yaml (its own and its groups' packages) and +resume; experiments and budgets
# are packaged _global_ and add none
TOP_LEVEL_KEYS = ("seed", "ckpt_path", "test_ckpt", "compile", "channels_last", "output_dir", "heartbeat_s",
                  "divergence", "report", "task", "norm", "trainer", "logger", "resume")
# Trainer arguments that run() passes itself
PIPELINE_TRAINER_ARGUMENTS = ("trainer.callbacks", "trainer.logger", "trainer.default_root_dir")
# what sets a run's length (trainer.max_epochs is ${task.epochs} unless set itself); each must be >= 1
TRAINING_LENGTH_KEYS = ("task.epochs", "task.steps", "task.data.steps_per_epoch", "trainer.max_epochs")


class ConfigError(ValueError):
    """A config the run cannot do what was asked with (an unknown key, a value out of range, a checkpoint of another
    run): refused before training starts, with a message that names the key and what to give instead."""


class RunDirConflict(RuntimeError):
    """The output dir holds another configuration's run, a live run, or checkpoints without a readable record: a
    usage error. A sweep checks every grid point before its first job and refuses to start (see
    ``pipelines.sweep.TransferReportCallback``); a job that meets one later (a run started meanwhile) is logged as
    refused and the sweep goes on."""


def likely_keys(unknown: str, known: Iterable[str]) -> list[str]:
    """Known keys that end like the unknown one (data.root -> task.data.root), else the closest spellings."""
    ends_alike = [k for k in known if k.endswith("." + unknown)]
    return ends_alike or difflib.get_close_matches(unknown, known, n=2)


def norm_layer(norm: DictConfig) -> str:
    """The factory layer a norm config builds: its ``layer`` where it names one (an evolved layer of the search is
    ``layer: graph`` under a name of its own, the name the report shows), else its ``name``."""
    return norm.get("layer") or norm.name


def norm_config_files(name: str) -> list[Path]:
    """The files of the norm config ``name`` in every config dir Hydra searches (conf/ and hydra.searchpath's)."""
    if not HydraConfig.initialized():
        return []
    sources = HydraConfig.get().runtime.config_sources
    return [Path(s.path) / "norm" / f"{name}.yaml" for s in sources
            if s.schema == "file" and (Path(s.path) / "norm" / f"{name}.yaml").is_file()]


def group_keys(cfg: DictConfig) -> dict[str, set[str]]:
    """What each config group's node may hold, by flat key: the task's config file (and what the task passes
    through), the layer's constructor arguments, Lightning's Trainer arguments. A group file from another config
    dir (a task or layer the project does not know) is not checked."""
    known = {"trainer": {f"trainer.{k}" for k in inspect.signature(pl.Trainer).parameters} | {"trainer.sync_batchnorm"}}
    task_file = CONF_DIR / "task" / f"{cfg.task.name}.yaml"
    if cfg.task.name in TASKS and task_file.is_file():
        listed = flat_items(OmegaConf.to_container(OmegaConf.load(task_file)))
        known["task"] = {f"task.{k.rstrip('.')}" for k in listed} | {f"task.{k}" for k in extra_config_keys(
            cfg.task.name)}
    if norm_layer(cfg.norm) in NORM_ACT_LAYERS:
        layer = inspect.signature(NORM_ACT_LAYERS[norm_layer(cfg.norm)]).parameters
        known["norm"] = {"norm.name", "norm.layer"} | {f"norm.kwargs.{k}" for k in layer
                                                       if k not in ("num_features", "apply_act")}
    return known


def is_known(key: str, known: set[str]) -> bool:
    """A known leaf, a node above known leaves (``{}`` or null, e.g. task.data.generate=null), or inside a known leaf
    that holds a dict."""
    return key in known or any(k.startswith(key + ".") or key.startswith(k + ".") for k in known)


def check_group_keys(cfg: DictConfig) -> None:
    """Refuse a key under task, norm or trainer that nothing takes (a `+key=` typo, which some builders ignored and
    others met with a bare TypeError), naming the likely one."""
    hints = []
    for group, known in group_keys(cfg).items():
        given = {f"{group}.{k.rstrip('.')}": v for k, v in
                 flat_items(OmegaConf.to_container(cfg[group])).items()}
        for key, value in given.items():
            if key in PIPELINE_TRAINER_ARGUMENTS:
                hints.append(f"{key}: the pipeline sets it (logger=..., output_dir=...).")
            elif not is_known(key, known):
                matches = likely_keys(key, sorted(known))[:1]
                hints.append(f"{key}: did you mean {matches[0]}={value}?" if matches else f"{key}: no such setting.")
    if hints:
        raise ConfigError(f"unknown config key(s), which the run would ignore or fail on: {' '.join(hints)} (task "
                         "keys: conf/task/<task>.yaml; norm.kwargs: the layer's arguments; trainer: Lightning's "
                         "Trainer arguments)")


def check_config(cfg: DictConfig) -> None:
    """Refuse, before anything starts, a config the run cannot do what was asked with: a top-level key the project
    does not know (``+data.root=...`` for ``task.data.root=...``: it would be ignored), a key under task, norm or
    trainer that nothing takes (``check_group_keys``), a norm config name found in two config dirs (conf/ and a
    ``hydra.searchpath`` dir), nothing to train, or an unknown ``test_ckpt``."""
    unknown = [k for k in cfg if k not in TOP_LEVEL_KEYS]
    if unknown:
        def flat(keys):
            return {k.rstrip("."): v for k, v in
                    flat_items(OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys))).items()}
        known = flat([k for k in cfg if k in TOP_LEVEL_KEYS])
        hints = []
        for key, value in flat(unknown).items():
            matches = likely_keys(key, known)
            hints.append(f"{key}: did you mean {' or '.join(f'{m}={value}' for m in matches)} (without '+')?"
                         if matches else f"{key}: no such setting.")
        raise ConfigError(f"unknown top-level config key(s) {', '.join(unknown)} (the run would ignore them). "
                         f"{' '.join(hints)} Top-level keys: {', '.join(TOP_LEVEL_KEYS)}")
    check_group_keys(cfg)
    twice = norm_config_files(cfg.norm.name)
    if len(twice) > 1:
        raise ConfigError(f"norm={cfg.norm.name}: a layer of that name exists twice ({', '.join(map(str, twice))}); "
                         "Hydra would take the first silently. Rename one, or drop its dir from hydra.searchpath")
    for key in TRAINING_LENGTH_KEYS:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent)
        if node is None or leaf not in node or node[leaf] is None or OmegaConf.is_interpolation(node, leaf):
            continue
        value = node[leaf]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}={value} leaves nothing to train; set {key}=<n>, a whole number >= 1")
    if cfg.test_ckpt not in ("best", "last"):
        raise ConfigError(f"test_ckpt must be 'best' or 'last', got {cfg.test_ckpt!r}")


def run_config(cfg: DictConfig) -> dict:
    """The config that makes a run this run (its record's ``config``): all but what may vary between attempts."""
    return OmegaConf.to_container(
        OmegaConf.masked_copy(cfg, [k for k in cfg if k not in CONFIG_KEYS_OF_AN_ATTEMPT]), resolve=True)


def newest_checkpoint(output_dir: Path) -> Path | None:
    """Where an unfinished run goes on from: the newest of its crash checkpoint, its last epoch's and its best
    epoch's (a full training state too: the way on when a damaged newer one was deleted)."""
    ckpt_dir = output_dir / "checkpoints"
    found = [p for p in (ckpt_dir / "on_exception.ckpt", ckpt_dir / "last.ckpt", *sorted(ckpt_dir.glob("best-*.ckpt")))
             if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def previous_attempt(output_dir: Path, config: dict, ckpt_path=None) -> tuple[dict | None, dict]:
    """The record an earlier attempt left in ``output_dir`` (None: none) and the config keys new since it, after
    checking that it is this run and not alive. Checkpoints without a readable record are refused unless
    ``ckpt_path`` says where to go on from: a fresh start beside them would mix two trainings' checkpoints, and
    resuming them unchecked could go on with another configuration's."""
    previous = read_record(output_dir)
    if previous is None:
        leftover = newest_checkpoint(output_dir)
        if leftover is not None and not ckpt_path:
            raise RunDirConflict(
                f"{output_dir} holds checkpoints but no readable {RESULTS_FILE} saying whose they are. If they are "
                f"this run's, resume with ckpt_path={leftover} (a grid point of a sweep: run it alone with the same "
                f"overrides and hydra.run.dir={output_dir}); else use a new output dir")
        return None, {}
    changed, added = config_changes(previous["config"], config) if previous.get("config") is not None else ({}, {})
    if changed:
        raise RunDirConflict(f"{output_dir} holds a run of another configuration (differs in "
                             f"{describe_changes(changed)}); use a new output or sweep dir, or the command (grid) "
                             "that made this one")
    if effective_status(previous) == "running":
        raise RunDirConflict(
            f"{output_dir} is being run right now by pid {previous.get('pid')} on {previous.get('host')} (its "
            "heartbeat is fresh); not starting a second copy. If that process is gone, re-run once its heartbeat "
            "is stale, or use a new output dir")
    return previous, added


def check_resume_dir(resume: str, found_run: bool) -> None:
    """A single run's ``+resume=<dir>`` must name a run: not a sweep dir (that needs -m and its grid), nor a dir
    with no run recorded in it (Hydra has made it by now), where a fresh run would start silently."""
    if (Path(resume) / "multirun.yaml").is_file():
        raise ConfigError(f"+resume={resume} is a sweep dir: re-run the sweep with -m and its grid")
    if not found_run:
        raise ConfigError(f"+resume={resume}: no run recorded there to go on with; to start a run in that dir, give "
                         f"hydra.run.dir={resume} instead")


# expected refusals: a single run shows their message alone (the traceback is for crashes, and HYDRA_FULL_ERROR=1)
REFUSALS = (ConfigError, RunDirConflict, DatasetError)
