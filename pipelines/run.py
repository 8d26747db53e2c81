"""One run: seed, build the task with the chosen norm-act layer, fit, test, and write ``results.json``.

The record is written when the run starts (status ``running``), and again when it completes or fails, so a run
that is killed or crashes still leaves its configuration, its error and its checkpoints behind.
"""
from __future__ import annotations

import json
import logging
import signal
import subprocess
import time
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar

from evonorm import norm_act_factory
from pipelines.callbacks import BestMetrics, CheckpointOnException, FiniteLossCheck
from pipelines.loggers import build_loggers, finish_wandb
from tasks import build_task

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_FILE = "results.json"


def git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def write_record(output_dir: Path, record: dict) -> None:
    if rank_zero_only.rank != 0:  # DDP: one process writes the record
        return
    tmp = output_dir / (RESULTS_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(output_dir / RESULTS_FILE)  # atomic: a reader never sees half a file


def describe_error(error: BaseException, output_dir: Path) -> str:
    text = f"{type(error).__name__}: {error}".rstrip(": ")
    saved = output_dir / "checkpoints" / "on_exception.ckpt"
    if isinstance(error, (KeyboardInterrupt, SystemExit, SIGTERMException)):
        text = f"interrupted ({text})"
    if saved.is_file():
        text += f"; resume with ckpt_path={saved}"
    return text


def build_callbacks(cfg: DictConfig, output_dir: Path, monitor: str, mode: str, with_logger: bool):
    ckpt_dir = output_dir / "checkpoints"
    best = BestMetrics(monitor, mode)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best-{epoch}-{step}", monitor=monitor, mode=mode,
                                 save_last=True, save_top_k=1, auto_insert_metric_name=False)
    callbacks = [best, checkpoint, CheckpointOnException(ckpt_dir / "on_exception.ckpt"), FiniteLossCheck()]
    if with_logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(RichProgressBar())
    return best, checkpoint, callbacks


def run(cfg: DictConfig) -> dict:
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "status": "running", "task": cfg.task.name,
        "norm": {"name": cfg.norm.name, "kwargs": OmegaConf.to_container(cfg.norm.kwargs, resolve=True)},
        "model": None, "dataset": None, "seed": cfg.seed, "test": {}, "best_val": {}, "steps": 0, "epochs": 0,
        "wall_time_s": None, "params": None, "git_commit": git_commit(), "output_dir": str(output_dir),
        "resumed_from": cfg.ckpt_path, "error": None,
    }
    write_record(output_dir, record)
    start, trainer, exit_code = time.time(), None, 1
    try:
        if cfg.test_ckpt not in ("best", "last"):
            raise ValueError(f"test_ckpt must be 'best' or 'last', got {cfg.test_ckpt!r}")
        pl.seed_everything(cfg.seed, workers=True)
        norm_act = norm_act_factory(cfg.norm.name, **cfg.norm.kwargs)
        parts = build_task(cfg.task.name, cfg.task, norm_act)
        record.update(model=parts.model, dataset=parts.dataset, monitor=parts.monitor, mode=parts.mode,
                      params=sum(p.numel() for p in parts.module.parameters()))
        loggers = build_loggers(cfg, output_dir)
        best, checkpoint, callbacks = build_callbacks(cfg, output_dir, parts.monitor, parts.mode, bool(loggers))
        trainer = pl.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), callbacks=callbacks,
                             logger=loggers or False, default_root_dir=output_dir)
        trainer.fit(parts.module, datamodule=parts.datamodule, ckpt_path=cfg.ckpt_path)
        record["best_val"] = best.best
        test_ckpt = "best" if cfg.test_ckpt == "best" and checkpoint.best_model_path else None
        tested = trainer.test(parts.module, datamodule=parts.datamodule, ckpt_path=test_ckpt, verbose=False)
        record["test"] = {k: float(v) for k, v in tested[0].items()}
        record["tested_checkpoint"] = checkpoint.best_model_path if test_ckpt else "last weights"
        record.update(getattr(parts.module, "record_extras", dict)())  # task-specific entries of the record
        record["status"], exit_code = "completed", 0
    except BaseException as e:
        record.update(status="failed", error=describe_error(e, output_dir))
        if isinstance(e, SIGTERMException):  # a SystemExit with code 0: exit as killed by SIGTERM instead
            raise SystemExit(128 + signal.SIGTERM) from e
        raise
    finally:
        if trainer is not None:
            record.update(steps=trainer.global_step, epochs=trainer.current_epoch)
        record["wall_time_s"] = round(time.time() - start, 2)
        write_record(output_dir, record)
        finish_wandb(exit_code)
        log.info("%s: %s -> %s", record["status"], output_dir / RESULTS_FILE, record["test"] or record["error"])
    return record
