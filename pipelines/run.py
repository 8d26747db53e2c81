"""One run: seed, build the task with the chosen norm-act layer, fit, test, and write ``results.json``.

The record is written when the run starts (status ``running``, with pid, host and a heartbeat), and again when it
completes or fails, so a run that is killed or crashes still leaves its configuration, its error and its
checkpoints behind. Started again in the same output dir (a re-run sweep, ``+resume=<dir>``), a completed run is
skipped and an unfinished one resumes from its newest checkpoint.
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
from pipelines.callbacks import BestMetrics, CheckpointOnException, FiniteLossCheck, Heartbeat
from pipelines.loggers import build_loggers, finish_wandb
from pipelines.records import RESULTS_FILE, effective_status, process_identity, read_record, write_record
from pipelines.sweep import ddp_launch_state, end_ddp_job, multirun_job_num, relaunch_ddp_as_this_job
from pipelines.sync_batchnorm import trainer_arguments
from tasks import build_task

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
# may vary between attempts of one run (compile: the same model and numerics up to float rounding)
CONFIG_KEYS_OF_AN_ATTEMPT = ("ckpt_path", "resume", "output_dir", "logger", "heartbeat_s", "report", "compile")


class RunDirConflict(RuntimeError):
    """The output dir holds another configuration's run or a live run: a usage error, it stops a sweep too."""


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


def describe_error(error: BaseException, saved_checkpoint: Path | None) -> str:
    text = f"{type(error).__name__}: {error}".rstrip(": ")
    if isinstance(error, (KeyboardInterrupt, SystemExit, SIGTERMException)):
        text = f"interrupted ({text})"
    if saved_checkpoint is not None:
        text += f"; resume with ckpt_path={saved_checkpoint} (or run the same command into the same dir)"
    return text


def build_callbacks(cfg: DictConfig, output_dir: Path, monitor: str, mode: str, with_logger: bool, beat):
    ckpt_dir = output_dir / "checkpoints"
    best = BestMetrics(monitor, mode)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best-{epoch}-{step}", monitor=monitor, mode=mode,
                                 save_last=True, save_top_k=1, auto_insert_metric_name=False)
    crash = CheckpointOnException(ckpt_dir / "on_exception.ckpt")
    callbacks = [best, checkpoint, crash, FiniteLossCheck(), Heartbeat(beat, cfg.heartbeat_s)]
    if with_logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(RichProgressBar())
    return best, checkpoint, crash, callbacks


def newest_checkpoint(output_dir: Path) -> Path | None:
    """Where an unfinished run goes on from: the newer of its crash checkpoint and its last epoch's checkpoint."""
    found = [p for p in (output_dir / "checkpoints" / "on_exception.ckpt", output_dir / "checkpoints" / "last.ckpt")
             if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def flat_items(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in flat_items(sub, f"{prefix}{key}.").items()} or {prefix: {}}


def previous_attempt(output_dir: Path, config: dict) -> dict | None:
    """The record an earlier attempt left in ``output_dir``, after checking that it is this run and not alive."""
    previous = read_record(output_dir)
    if previous is None:
        return None
    if previous.get("config") is not None and previous["config"] != config:
        old, new = flat_items(previous["config"]), flat_items(config)
        differing = sorted(k.rstrip(".") for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise RunDirConflict(f"{output_dir} holds a run of another configuration (differs in {', '.join(differing)}); "
                         "use a new output or sweep dir, or the command (grid) that made this one")
    if effective_status(previous) == "running":
        raise RunDirConflict(
            f"{output_dir} is being run right now by pid {previous.get('pid')} on {previous.get('host')} (its "
            "heartbeat is fresh); not starting a second copy. If that process is gone, re-run once its heartbeat "
            "is stale, or use a new output dir")
    return previous


def attempt_summary(record: dict) -> dict:
    keys = ("status", "error", "steps", "epochs", "wall_time_s", "started_at", "host", "pid", "compile")
    return {**{k: record.get(k) for k in keys}, "status": effective_status(record)}


def run(cfg: DictConfig) -> dict:
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
              if k not in CONFIG_KEYS_OF_AN_ATTEMPT}
    ckpt_path, previous = cfg.ckpt_path, None
    if rank_zero_only.rank == 0:
        previous = previous_attempt(output_dir, config)
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
        "sweep_job": multirun_job_num(),
        "previous_attempts": [*previous.get("previous_attempts", []), attempt_summary(previous)] if previous else [],
        "config": config,
    }

    def beat():
        record["heartbeat"] = time.time()
        write_record(output_dir, record)

    write_record(output_dir, record)
    trainer, crash, exit_code, launch_state = None, None, 1, ddp_launch_state()
    try:
        if cfg.test_ckpt not in ("best", "last"):
            raise ValueError(f"test_ckpt must be 'best' or 'last', got {cfg.test_ckpt!r}")
        pl.seed_everything(cfg.seed, workers=True)
        norm_act = norm_act_factory(cfg.norm.name, **cfg.norm.kwargs)
        parts = build_task(cfg.task.name, cfg.task, norm_act)
        record["compile"] = resolve_compile(cfg)
        if record["compile"]:
            record["compiled_modules"] = parts.compile()
        log.info("compile=%s: %s", cfg.get("compile"), ", ".join(record["compiled_modules"]) or "eager")
        record.update(model=parts.model, dataset=parts.dataset, monitor=parts.monitor, mode=parts.mode,
                      params=sum(p.numel() for p in parts.module.parameters()))
        loggers = build_loggers(cfg, output_dir, parts.model)
        best, checkpoint, crash, callbacks = build_callbacks(cfg, output_dir, parts.monitor, parts.mode,
                                                             bool(loggers), beat)
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
        record.update(status="failed", error=describe_error(e, crash.path if crash and crash.saved else None))
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
