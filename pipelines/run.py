"""One run: seed, build the task with the chosen norm-act layer, fit, test, and write ``results.json``.

The record is written when the run starts (status ``running``, with pid, host and a heartbeat), and again when it
completes or fails, so a run that is killed or crashes still leaves its configuration, its error and its
checkpoints behind. Started again in the same output dir (a re-run sweep, ``+resume=<dir>``), a completed run is
skipped and an unfinished one resumes from its newest checkpoint. Config mistakes (an unknown top-level key, nothing
to train, another run's checkpoint) are refused before anything starts.
"""
from __future__ import annotations

import logging
import signal
import subprocess
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from evonorm import norm_act_factory
from pipelines.callbacks import BestMetrics, CheckpointOnException, FiniteLossCheck, Heartbeat, LossSpikeMonitor
from pipelines.checks import (ConfigError, check_config, check_resume_dir, newest_checkpoint, norm_layer,
                              previous_attempt, run_config)
from pipelines.jobs import (ddp_launch_state, end_ddp_job, multirun_job_num, multirun_job_overrides,
                            multirun_sweep_dir, relaunch_ddp_as_this_job)
from pipelines.loggers import build_loggers, finish_wandb
from pipelines.records import RESULTS_FILE, effective_status, process_identity, read_record, write_record
from pipelines.sync_batchnorm import trainer_arguments
from tasks import build_task

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def trainer_on_gpu(cfg: DictConfig) -> bool:
    accelerator = cfg.trainer.get("accelerator", "auto")
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_switch(cfg: DictConfig, key: str, auto: bool, auto_means: str) -> bool:
    """A top-level true / false / null (auto) option: the config's choice, or ``auto`` where it is null."""
    choice = cfg.get(key)
    if choice is None or choice == "auto":
        return auto
    if isinstance(choice, bool):
        return choice
    raise ConfigError(f"{key} must be true, false or null (auto: {auto_means}), got {choice!r}")


def resolve_compile(cfg: DictConfig) -> bool:
    """``compile``: true / false, or null (auto): on where the trainer runs on GPUs, off on CPU, where compiling
    (minutes for a ResNet) would dominate a short run."""
    return resolve_switch(cfg, "compile", trainer_on_gpu(cfg), "on for GPU trainers")


def has_depthwise_conv(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
               for m in module.modules())


def apply_channels_last(cfg: DictConfig, module: torch.nn.Module) -> bool:
    """``channels_last``: true / false, or null (auto): on for a CPU trainer and a model with depthwise convolutions
    (oneDNN's channels-last kernels make such a training step 1.5-3x faster on CPU: README, Performance), off
    otherwise (measured on CPU only). Where on, the module's 4-d weights go channels-last (a convolution's output
    then follows its weight's layout). Returns whether it is on."""
    on = resolve_switch(cfg, "channels_last", not trainer_on_gpu(cfg) and has_depthwise_conv(module),
                        "on for a CPU trainer and a model with depthwise convolutions")
    if on:
        module.to(memory_format=torch.channels_last)
    return on


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
        remedies.append(f"gradient clipping ({clip_key}={clip / 2 if clip else 1.0}{f', now {clip}' if clip else ''})")
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
    spikes = LossSpikeMonitor(parts.watched_losses, **cfg.divergence)
    callbacks = [best, checkpoint, crash, finite, spikes, Heartbeat(beat, cfg.heartbeat_s)]
    if with_logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(RichProgressBar())
    return best, checkpoint, crash, callbacks


def divergence_summary(trainer) -> dict | None:
    """The loss-spike record of this run so far (``LossSpikeMonitor.summary``), for ``results.json``."""
    monitor = next((c for c in trainer.callbacks if isinstance(c, LossSpikeMonitor)), None)
    return None if monitor is None else monitor.summary()


def check_checkpoint(ckpt_path: Path, cfg: DictConfig) -> dict:
    """Refuse a checkpoint that another task or layer wrote (says the record of its run) or that cannot be read
    (truncated by a run killed while saving it), saying what to pass instead, before Lightning loads it: its own
    errors list hundreds of state_dict keys, or give an OSError without the file's name."""
    owner_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else None
    owner = read_record(owner_dir) if owner_dir is not None else None
    if owner is not None and "task" in owner and "norm" in owner:
        theirs, ours = (owner["task"], owner["norm"]["name"]), (cfg.task.name, cfg.norm.name)
        if theirs != ours:
            raise ConfigError(
                f"ckpt_path={ckpt_path} belongs to a run of task={theirs[0]} norm={theirs[1]} ({owner_dir}), not "
                f"task={ours[0]} norm={ours[1]}: pass a checkpoint of a task={ours[0]} norm={ours[1]} run, or run "
                f"task={theirs[0]} norm={theirs[1]} to go on with that one")
    if ckpt_path.is_dir():
        raise ConfigError(f"ckpt_path={ckpt_path} is a dir; give a checkpoint file (e.g. "
                                f"{ckpt_path}/checkpoints/last.ckpt), or +resume=<run dir> to go on with a run")
    if not ckpt_path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such file")
    try:
        return torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False)  # mapped, not read: cheap
    except Exception as e:
        others = sorted((p for p in ckpt_path.parent.glob("*.ckpt") if p != ckpt_path), key=lambda p: p.stat().st_mtime)
        instead = f"ckpt_path={others[-1]}" if others else "ckpt_path=<another checkpoint>, or use a new output dir"
        raise ConfigError(
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
        raise ConfigError(
            f"checkpoint {ckpt_path} holds the unused v of {len(stale)} EvoNorm layer(s) without activation (e.g. "
            f"{stale[0]}), which this code no longer has: its optimizer state does not fit. Finish that run with the "
            f"code it began with (commit {owner.get('git_commit') or 'in its results.json'}), or train it again; its "
            "weights alone still load (test_ckpt, task.model.backbone_ckpt)")


def attempt_summary(record: dict) -> dict:
    keys = ("status", "error", "steps", "epochs", "wall_time_s", "started_at", "host", "pid", "compile",
            "channels_last")
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
        "wall_time_s": None, "params": None, "divergence": None, "compile": None, "compiled_modules": [],
        "channels_last": None,
        "git_commit": git_commit(),
        "output_dir": str(output_dir), "resumed_from": str(ckpt_path) if ckpt_path else None, "error": None,
        **process_identity(), "started_at": started, "heartbeat": started, "heartbeat_interval_s": cfg.heartbeat_s,
        "sweep_job": multirun_job_num(), "overrides": multirun_job_overrides(),
        "previous_attempts": [*previous.get("previous_attempts", []), attempt_summary(previous)] if previous else [],
        "config": config,
    }

    def beat(trainer):  # what a SIGKILL leaves: how far the run got too, and how smoothly
        record.update(heartbeat=time.time(), steps=trainer.global_step, epochs=trainer.current_epoch,
                      divergence=divergence_summary(trainer))
        write_record(output_dir, record)

    write_record(output_dir, record)
    trainer, crash, exit_code, launch_state = None, None, 1, ddp_launch_state()
    try:
        checkpoint = check_checkpoint(Path(ckpt_path), cfg) if ckpt_path else None
        pl.seed_everything(cfg.seed, workers=True)
        try:
            norm_act = norm_act_factory(norm_layer(cfg.norm), **cfg.norm.kwargs)
            parts = build_task(cfg.task.name, cfg.task, norm_act)
        except ValueError as e:  # a value the layer or the task refuses (their checks say which and why)
            raise ConfigError(f"task={cfg.task.name} norm={cfg.norm.name} cannot be built from this config: {e}") from e
        record["channels_last"] = apply_channels_last(cfg, parts.module)
        record["compile"] = resolve_compile(cfg)
        if record["compile"]:
            record["compiled_modules"] = parts.compile()
        log.info("compile=%s: %s; channels_last=%s: %s", cfg.get("compile"),
                 ", ".join(record["compiled_modules"]) or "eager", cfg.get("channels_last"), record["channels_last"])
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
            record.update(steps=trainer.global_step, epochs=trainer.current_epoch,
                          divergence=divergence_summary(trainer))
        record["wall_time_s"] = round(time.time() - started, 2)
        record["heartbeat"] = time.time()
        write_record(output_dir, record)
        spikes = (record.get("divergence") or {}).get("spikes")
        if spikes:
            log.warning("%d loss spike(s) in this run (divergence; see 'divergence' in %s): its result is not one "
                        "of a smooth run", spikes, output_dir / RESULTS_FILE)
        finish_wandb(exit_code, record.get("divergence"))
        end_ddp_job(trainer, launch_state)  # the next DDP job of a sweep in this process launches its ranks afresh
        log.info("%s: %s -> %s", record["status"], output_dir / RESULTS_FILE, record["test"] or record["error"])
    return record
