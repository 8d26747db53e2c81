"""One run: seed, build the task with the chosen norm-act layer, fit, test, and write ``results.json``.

The record is written when the run starts (status ``running``, with pid, host and a heartbeat), and again when it
completes or fails, so a run that is killed or crashes still leaves its configuration, its error and its
checkpoints behind. Started again in the same output dir (a re-run sweep, ``+resume=<dir>``), a completed run is
skipped and an unfinished one resumes from its newest checkpoint. Config mistakes (an unknown top-level key, nothing
to train, another run's checkpoint) are refused before anything starts.
"""
from __future__ import annotations

import difflib
import inspect
import logging
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from evonorm import norm_act_factory
from evonorm.factory import NORM_ACT_LAYERS
from pipelines.callbacks import BestMetrics, CheckpointOnException, FiniteLossCheck, Heartbeat
from pipelines.loggers import build_loggers, finish_wandb
from pipelines.records import (RESULTS_FILE, config_changes, describe_changes, effective_status, flat_items,
                               process_identity, read_record, write_record)
from pipelines.sweep import (ddp_launch_state, end_ddp_job, multirun_job_num, multirun_job_overrides,
                             multirun_sweep_dir, relaunch_ddp_as_this_job)
from pipelines.sync_batchnorm import trainer_arguments
from tasks import TASKS, build_task, extra_config_keys

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"
# may vary between attempts of one run (compile: the same model and numerics up to float rounding)
CONFIG_KEYS_OF_AN_ATTEMPT = ("ckpt_path", "resume", "output_dir", "logger", "heartbeat_s", "report", "compile")
# the top-level keys of conf/config.yaml (its own and its groups' packages) and +resume; experiments and budgets
# are packaged _global_ and add none
TOP_LEVEL_KEYS = ("seed", "ckpt_path", "test_ckpt", "compile", "output_dir", "heartbeat_s", "report", "task", "norm",
                  "trainer", "logger", "resume")
# Trainer arguments that run() passes itself
PIPELINE_TRAINER_ARGUMENTS = ("trainer.callbacks", "trainer.logger", "trainer.default_root_dir")
# what sets a run's length (trainer.max_epochs is ${task.epochs} unless set itself); each must be >= 1
TRAINING_LENGTH_KEYS = ("task.epochs", "task.steps", "task.data.steps_per_epoch", "trainer.max_epochs")


class RunDirConflict(RuntimeError):
    """The output dir holds another configuration's run, a live run, or checkpoints without a readable record: a
    usage error. A sweep checks every grid point before its first job and refuses to start (see
    ``pipelines.sweep.TransferReportCallback``); a job that meets one later (a run started meanwhile) is logged as
    refused and the sweep goes on."""


def git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def resolve_compile(cfg: DictConfig) -> bool:
    """``compile``: true / false, or null (auto): on where the trainer runs on GPUs, off on CPU, where compiling
    (minutes for a ResNet) would dominate a short run."""
    choice = cfg.get("compile")
    if choice is None or choice == "auto":
        accelerator = cfg.trainer.get("accelerator", "auto")
        return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if isinstance(choice, bool):
        return choice
    raise ValueError(f"compile must be true, false or null (auto: on for GPU trainers), got {choice!r}")


def likely_keys(unknown: str, known: Iterable[str]) -> list[str]:
    """Known keys that end like the unknown one (data.root -> task.data.root), else the closest spellings."""
    ends_alike = [k for k in known if k.endswith("." + unknown)]
    return ends_alike or difflib.get_close_matches(unknown, known, n=2)


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
    if cfg.norm.name in NORM_ACT_LAYERS:
        layer = inspect.signature(NORM_ACT_LAYERS[cfg.norm.name]).parameters
        known["norm"] = {"norm.name"} | {f"norm.kwargs.{k}" for k in layer if k not in ("num_features", "apply_act")}
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
        raise ValueError(f"unknown config key(s), which the run would ignore or fail on: {' '.join(hints)} (task "
                         "keys: conf/task/<task>.yaml; norm.kwargs: the layer's arguments; trainer: Lightning's "
                         "Trainer arguments)")


def check_config(cfg: DictConfig) -> None:
    """Refuse, before anything starts, a config the run cannot do what was asked with: a top-level key the project
    does not know (``+data.root=...`` for ``task.data.root=...``: it would be ignored), a key under task, norm or
    trainer that nothing takes (``check_group_keys``), nothing to train, or an
    unknown ``test_ckpt``."""
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
        raise ValueError(f"unknown top-level config key(s) {', '.join(unknown)} (the run would ignore them). "
                         f"{' '.join(hints)} Top-level keys: {', '.join(TOP_LEVEL_KEYS)}")
    check_group_keys(cfg)
    for key in TRAINING_LENGTH_KEYS:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent)
        if node is None or leaf not in node or node[leaf] is None or OmegaConf.is_interpolation(node, leaf):
            continue
        value = node[leaf]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value} leaves nothing to train; set {key}=<n>, a whole number >= 1")
    if cfg.test_ckpt not in ("best", "last"):
        raise ValueError(f"test_ckpt must be 'best' or 'last', got {cfg.test_ckpt!r}")


def run_config(cfg: DictConfig) -> dict:
    """The config that makes a run this run (its record's ``config``): all but what may vary between attempts."""
    return OmegaConf.to_container(
        OmegaConf.masked_copy(cfg, [k for k in cfg if k not in CONFIG_KEYS_OF_AN_ATTEMPT]), resolve=True)


def nan_loss_remedies(cfg: DictConfig, automatic_optimization: bool) -> str:
    """What to try after a NaN loss, in keys this task's config has: its learning rates and warmup, gradient
    clipping (the task's own, else Lightning's, which manual optimization such as BigGAN's does not support), fp32."""
    optim = cfg.task.get("optim") or {}
    remedies = []
    rates = [f"task.optim.{k}" for k in optim if k == "lr" or k.endswith("_lr")]
    if rates:
        remedies.append(f"a lower learning rate ({', '.join(rates)})")
    warmups = [f"task.optim.{k}" for k in optim if k.startswith("warmup_") and k.endswith(("_epochs", "_steps"))]
    if warmups:
        remedies.append(f"a longer warmup ({', '.join(warmups)})")
    clip_key = "task.optim.clip_grad_norm" if "clip_grad_norm" in optim else \
        "trainer.gradient_clip_val" if automatic_optimization else None
    if clip_key:
        clip = OmegaConf.select(cfg, clip_key)
        remedies.append(f"gradient clipping ({clip_key}=1.0{f', now {clip}' if clip else ''})")
    if not str(cfg.trainer.get("precision", "32")).startswith(("32", "64")):
        remedies.append("fp32 precision (trainer.precision=32-true)")
    return "Try " + ", ".join(remedies) if remedies else "Check the task's loss and learning rates"


def describe_error(error: BaseException, saved_checkpoint: Path | None, sweep_dir: Path | None = None) -> str:
    text = f"{type(error).__name__}: {error}".rstrip(": ")
    if isinstance(error, (KeyboardInterrupt, SystemExit, SIGTERMException)):
        text = f"interrupted ({text})"
    if saved_checkpoint is not None:
        text += (f"; resume by re-running the sweep with +resume={sweep_dir}" if sweep_dir is not None else
                 f"; resume with the same overrides and +resume={saved_checkpoint.parent.parent} (or "
                 f"ckpt_path={saved_checkpoint})")
    return text


def build_callbacks(cfg: DictConfig, output_dir: Path, parts, with_logger: bool, beat):
    ckpt_dir = output_dir / "checkpoints"
    best = BestMetrics(parts.monitor, parts.mode)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best-{epoch}-{step}", monitor=parts.monitor,
                                 mode=parts.mode, save_last=True, save_top_k=1, auto_insert_metric_name=False)
    crash = CheckpointOnException(ckpt_dir / "on_exception.ckpt")
    finite = FiniteLossCheck(nan_loss_remedies(cfg, parts.module.automatic_optimization))
    callbacks = [best, checkpoint, crash, finite, Heartbeat(beat, cfg.heartbeat_s)]
    if with_logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(RichProgressBar())
    return best, checkpoint, crash, callbacks


def newest_checkpoint(output_dir: Path) -> Path | None:
    """Where an unfinished run goes on from: the newest of its crash checkpoint, its last epoch's and its best
    epoch's (a full training state too: the way on when a damaged newer one was deleted)."""
    ckpt_dir = output_dir / "checkpoints"
    found = [p for p in (ckpt_dir / "on_exception.ckpt", ckpt_dir / "last.ckpt", *sorted(ckpt_dir.glob("best-*.ckpt")))
             if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def check_checkpoint(ckpt_path: Path, cfg: DictConfig) -> dict:
    """Refuse a checkpoint that another task or layer wrote (says the record of its run) or that cannot be read
    (truncated by a run killed while saving it), saying what to pass instead, before Lightning loads it: its own
    errors list hundreds of state_dict keys, or give an OSError without the file's name."""
    owner_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else None
    owner = read_record(owner_dir) if owner_dir is not None else None
    if owner is not None and "task" in owner and "norm" in owner:
        theirs, ours = (owner["task"], owner["norm"]["name"]), (cfg.task.name, cfg.norm.name)
        if theirs != ours:
            raise ValueError(
                f"ckpt_path={ckpt_path} belongs to a run of task={theirs[0]} norm={theirs[1]} ({owner_dir}), not "
                f"task={ours[0]} norm={ours[1]}: pass a checkpoint of a task={ours[0]} norm={ours[1]} run, or run "
                f"task={theirs[0]} norm={theirs[1]} to go on with that one")
    if ckpt_path.is_dir():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} is a dir; give a checkpoint file (e.g. "
                                f"{ckpt_path}/checkpoints/last.ckpt), or +resume=<run dir> to go on with a run")
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such file")
    try:
        return torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False)  # mapped, not read: cheap
    except Exception as e:
        others = sorted((p for p in ckpt_path.parent.glob("*.ckpt") if p != ckpt_path), key=lambda p: p.stat().st_mtime)
        instead = f"ckpt_path={others[-1]}" if others else "ckpt_path=<another checkpoint>, or use a new output dir"
        raise ValueError(
            f"checkpoint {ckpt_path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            f"): probably truncated, by a run killed while saving it. Delete it (a re-run into this dir then resumes "
            f"from the newest checkpoint left) or pass {instead}") from e


def check_checkpoint_fits(checkpoint: dict, ckpt_path: Path, module: pl.LightningModule) -> None:
    """Refuse to resume training from a checkpoint of a model that had a parameter this one lacks: the ``v`` of an
    EvoNorm without activation, which the layers held until commit 31f16b9 (it never entered the output). The
    weights load without it, but the optimizer state holds one entry more per such layer, which Lightning rejects
    with a bare parameter-group error."""
    own = module.state_dict()
    stale = [k for k in checkpoint.get("state_dict", {}) if k.endswith(".v") and k not in own]
    if stale and checkpoint.get("optimizer_states"):
        owner = read_record(ckpt_path.parent.parent) or {}
        raise ValueError(
            f"checkpoint {ckpt_path} holds the unused v of {len(stale)} EvoNorm layer(s) without activation (e.g. "
            f"{stale[0]}), which this code no longer has: its optimizer state does not fit. Finish that run with the "
            f"code it began with (commit {owner.get('git_commit') or 'in its results.json'}), or train it again; its "
            "weights alone still load (test_ckpt, task.model.backbone_ckpt)")


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
        raise ValueError(f"+resume={resume} is a sweep dir: re-run the sweep with -m and its grid")
    if not found_run:
        raise ValueError(f"+resume={resume}: no run recorded there to go on with; to start a run in that dir, give "
                         f"hydra.run.dir={resume} instead")


def attempt_summary(record: dict) -> dict:
    keys = ("status", "error", "steps", "epochs", "wall_time_s", "started_at", "host", "pid", "compile")
    return {**{k: record.get(k) for k in keys}, "status": effective_status(record)}


def run(cfg: DictConfig) -> dict:
    check_config(cfg)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = run_config(cfg)
    ckpt_path, previous = cfg.ckpt_path, None
    if rank_zero_only.rank == 0:
        previous, added = previous_attempt(output_dir, config, ckpt_path)
        if cfg.get("resume") and multirun_sweep_dir() is None:  # no record and no ckpt_path: nothing to go on with
            check_resume_dir(cfg.resume, found_run=previous is not None or bool(ckpt_path))
        if added:
            log.info("%s: its record predates these config keys, taken at their current values: %s", output_dir,
                     ", ".join(f"{k}={v}" for k, v in added.items()))
        if previous is not None and previous.get("status") == "completed":
            log.info("skipped: %s completed already (%s)", output_dir / RESULTS_FILE, previous["test"])
            return previous
        ckpt_path = ckpt_path or (newest_checkpoint(output_dir) if previous else None)
    else:  # a DDP rank Lightning started: rank 0 has recorded where this attempt resumes from
        ckpt_path = (read_record(output_dir) or {}).get("resumed_from") or ckpt_path
    started = time.time()
    record = {
        "status": "running", "task": cfg.task.name,
        "norm": {"name": cfg.norm.name, "kwargs": OmegaConf.to_container(cfg.norm.kwargs, resolve=True)},
        "model": None, "dataset": None, "seed": cfg.seed, "test": {}, "best_val": {}, "steps": 0, "epochs": 0,
        "wall_time_s": None, "params": None, "compile": None, "compiled_modules": [], "git_commit": git_commit(),
        "output_dir": str(output_dir), "resumed_from": str(ckpt_path) if ckpt_path else None, "error": None,
        **process_identity(), "started_at": started, "heartbeat": started, "heartbeat_interval_s": cfg.heartbeat_s,
        "sweep_job": multirun_job_num(), "overrides": multirun_job_overrides(),
        "previous_attempts": [*previous.get("previous_attempts", []), attempt_summary(previous)] if previous else [],
        "config": config,
    }

    def beat(trainer):  # what a SIGKILL leaves: how far the run got too
        record.update(heartbeat=time.time(), steps=trainer.global_step, epochs=trainer.current_epoch)
        write_record(output_dir, record)

    write_record(output_dir, record)
    trainer, crash, exit_code, launch_state = None, None, 1, ddp_launch_state()
    try:
        checkpoint = check_checkpoint(Path(ckpt_path), cfg) if ckpt_path else None
        pl.seed_everything(cfg.seed, workers=True)
        norm_act = norm_act_factory(cfg.norm.name, **cfg.norm.kwargs)
        parts = build_task(cfg.task.name, cfg.task, norm_act)
        record["compile"] = resolve_compile(cfg)
        if record["compile"]:
            record["compiled_modules"] = parts.compile()
        log.info("compile=%s: %s", cfg.get("compile"), ", ".join(record["compiled_modules"]) or "eager")
        record.update(model=parts.model, dataset=parts.dataset, monitor=parts.monitor, mode=parts.mode,
                      params=sum(p.numel() for p in parts.module.parameters()))
        write_record(output_dir, record)  # the task's headline metric, for the report of a run killed from here on
        if checkpoint is not None:
            check_checkpoint_fits(checkpoint, Path(ckpt_path), parts.module)
            del checkpoint  # Lightning loads it again, as it restores the training state
        loggers = build_loggers(cfg, output_dir, parts.model)
        best, checkpoint, crash, callbacks = build_callbacks(cfg, output_dir, parts, bool(loggers), beat)
        relaunch_ddp_as_this_job(output_dir)
        trainer = pl.Trainer(**trainer_arguments(cfg.trainer, parts.module), callbacks=callbacks,
                             logger=loggers or False, default_root_dir=output_dir)
        trainer.fit(parts.module, datamodule=parts.datamodule, ckpt_path=ckpt_path)
        record["best_val"] = best.best
        test_ckpt = "best" if cfg.test_ckpt == "best" and checkpoint.best_model_path else None
        tested = trainer.test(parts.module, datamodule=parts.datamodule, ckpt_path=test_ckpt, verbose=False)
        record["test"] = {k: float(v) for k, v in tested[0].items()}
        record["tested_checkpoint"] = checkpoint.best_model_path if test_ckpt else "last weights"
        record.update(getattr(parts.module, "record_extras", dict)())  # task-specific entries of the record
        record["status"], exit_code = "completed", 0
    except BaseException as e:
        record.update(status="failed", error=describe_error(e, crash.path if crash and crash.saved else None,
                                                            multirun_sweep_dir()))
        if isinstance(e, SIGTERMException):  # a SystemExit with code 0: exit as killed by SIGTERM instead
            raise SystemExit(128 + signal.SIGTERM) from e
        raise
    finally:
        if trainer is not None:
            record.update(steps=trainer.global_step, epochs=trainer.current_epoch)
        record["wall_time_s"] = round(time.time() - started, 2)
        record["heartbeat"] = time.time()
        write_record(output_dir, record)
        finish_wandb(exit_code)
        end_ddp_job(trainer, launch_state)  # the next DDP job of a sweep in this process launches its ranks afresh
        log.info("%s: %s -> %s", record["status"], output_dir / RESULTS_FILE, record["test"] or record["error"])
    return record
