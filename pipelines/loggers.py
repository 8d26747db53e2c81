"""Experiment loggers. wandb never blocks: offline unless the user set WANDB_MODE or has credentials."""
from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from pipelines.checks import ConfigError
from pipelines.jobs import multirun_sweep_dir

log = logging.getLogger(__name__)
ONLINE_START_TIMEOUT_S = 30  # wandb's own default waits 90 s


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


def start_wandb(mode: str, **init):
    """``wandb.init(mode=mode, **init)``. Online (credentials found), a start that fails within
    ``ONLINE_START_TIMEOUT_S`` (or ``WANDB_INIT_TIMEOUT``: no network, a rejected key) is logged and the run goes
    offline instead: a run never fails or waits long for wandb."""
    import wandb
    if mode == "online":
        timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", ONLINE_START_TIMEOUT_S))  # the user's, where set
        try:
            return wandb.init(mode="online", settings=wandb.Settings(init_timeout=timeout), **init)
        except Exception as e:
            log.warning("wandb could not start online (%s: %s); logging offline instead (upload later with wandb "
                        "sync <the run's wandb dir>)", type(e).__name__, e)
            mode = "offline"
    return wandb.init(mode=mode, **init)


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
        run = dict(project=cfg.logger.project, entity=cfg.logger.entity, name=run_name(cfg), group=run_group(cfg),
                   tags=[cfg.task.name, cfg.norm.name, model, *cfg.logger.tags])
        # rank 0 starts the wandb run (the other DDP ranks log nothing)
        experiment = None
        if rank_zero_only.rank == 0:
            experiment = start_wandb(wandb_mode(cfg.logger.mode), dir=str(output_dir), **run)
            # the training step as the charts' x-axis, as WandbLogger does for a run it starts itself
            experiment.define_metric("trainer/global_step")
            experiment.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        logger = WandbLogger(experiment=experiment, save_dir=str(output_dir), **run)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        return [logger]
    raise ConfigError(f"unknown logger {kind!r}; choose logger=wandb, csv or none")


def finish_wandb(exit_code: int, divergence: dict | None = None) -> None:
    """Close the wandb run so the next run of a multirun starts its own; the loss-spike record (results.json's
    ``divergence``) goes into its summary first."""
    import wandb
    if wandb.run is not None:
        if divergence is not None:
            worst = divergence.get("worst") or {}
            wandb.run.summary.update({"divergence/spikes": divergence["spikes"],
                                      "divergence/worst_ratio": worst.get("ratio"),
                                      "divergence/events": divergence["events"]})
        wandb.finish(exit_code=exit_code)
