"""Hydra multirun glue: which sweep a job belongs to, DDP inside a sweep, and the report at the end of a sweep."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict, read_write

log = logging.getLogger(__name__)
MAX_EXIT_STATUS = 125  # higher exit codes mean "killed by a signal" to shells


def multirun_sweep_dir() -> Path | None:
    """The sweep dir when this process runs a job of a Hydra multirun, else None."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir)


def multirun_job_num() -> int | None:
    """This job's number in its multirun (the grid order), else None."""
    return HydraConfig.get().job.num if multirun_sweep_dir() is not None else None


def relaunch_ddp_as_this_job(output_dir: Path) -> None:
    """Lightning re-launches DDP ranks as ``python run.py <original argv> hydra.run.dir=<run dir>``: in a multirun
    that would start the whole sweep again in every rank. Make the re-launch run this job alone, in its own dir."""
    if multirun_sweep_dir() is None:
        return
    hydra_cfg = HydraConfig.get()
    hydra_overrides = [o for o in hydra_cfg.overrides.hydra if not o.startswith("hydra.mode=")]  # e.g. searchpath
    sys.argv = [sys.argv[0], *hydra_overrides, *hydra_cfg.overrides.task]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = str(output_dir)


class TransferReportCallback(Callback):
    """At the end of every multirun: write the transfer report of the sweep dir, and exit with the number of grid
    points that did not complete (failed, dead or missing) as the status, so that scripts and CI notice."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from pipelines.report import write_report  # matplotlib etc. only when a sweep ends

        sweep_dir = Path(config.hydra.sweep.dir)
        logger = config.get("logger", {})
        report = write_report([sweep_dir], sweep_dir, reference=config.report.reference,
                              wandb_logger=logger if logger.get("name") == "wandb" else None)
        failures = report.unfinished_count()
        if failures:
            log.error("%d grid point(s) of the sweep did not complete; see %s", failures, sweep_dir / "transfer.md")
            sys.exit(min(failures, MAX_EXIT_STATUS))
