"""Experiment loggers. wandb never blocks: offline unless the user set WANDB_MODE or has credentials."""
from __future__ import annotations

import netrc
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger

from pipelines.sweep import multirun_sweep_dir


def wandb_mode(configured: str | None) -> str:
    if configured:
        return configured
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        has_login = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        has_login = False
    return "online" if has_login else "offline"


def run_name(cfg: DictConfig) -> str:
    return f"{cfg.task.name}-{cfg.norm.name}-s{cfg.seed}"


def run_group(cfg: DictConfig) -> str | None:
    """The configured group, else the sweep's dir name for a job of a multirun (one group per sweep)."""
    sweep_dir = multirun_sweep_dir()
    return cfg.logger.group or (sweep_dir.name if sweep_dir else None)


def build_loggers(cfg: DictConfig, output_dir: Path, model: str) -> list[Logger]:
    kind = cfg.logger.name
    if kind == "none":
        return []
    if kind == "csv":
        return [CSVLogger(output_dir, name="csv")]  # csv/version_<n>: a resumed attempt keeps the earlier ones
    if kind == "wandb":
        logger = WandbLogger(
            project=cfg.logger.project, entity=cfg.logger.entity, name=run_name(cfg), group=run_group(cfg),
            tags=[cfg.task.name, cfg.norm.name, model, *cfg.logger.tags], save_dir=str(output_dir),
            mode=wandb_mode(cfg.logger.mode),
        )
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        return [logger]
    raise ValueError(f"unknown logger {kind!r}; choose wandb, csv or none")


def finish_wandb(exit_code: int) -> None:
    """Close the wandb run so the next run of a multirun starts its own."""
    import wandb
    if wandb.run is not None:
        wandb.finish(exit_code=exit_code)
