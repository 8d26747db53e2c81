"""Hydra multirun glue: the check of every grid point before a sweep starts, and the report at its end."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from pipelines.checks import RunDirConflict, check_config, previous_attempt, run_config
from pipelines.jobs import REFUSED_JOBS_FILE, refused_job_dirs
from pipelines.records import RESULTS_FILE, config_changes, effective_status, read_record
from tasks.common.checks import first_of

log = logging.getLogger(__name__)
MAX_EXIT_STATUS = 125  # higher exit codes mean "killed by a signal" to shells
SHOWN_REFUSALS = 5  # a refused sweep names this many grid points, then counts the rest


def grid_jobs(config: DictConfig):
    """Yields ``(job overrides, output dir, job config)`` for every grid point of this multirun, composed as Hydra's
    basic sweeper and launchers compose them (the job config without its ``hydra`` node, as the job gets it).
    Yields nothing under another sweeper, whose grid is its own."""
    if OmegaConf.select(config, "hydra.sweeper._target_") != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
        log.info("sweeper %s: its grid points are checked as each job starts", config.hydra.sweeper.get("_target_"))
        return
    loader = GlobalHydra.instance().config_loader()
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create(config_loader=loader).parse_overrides([*params, *config.hydra.overrides.task])
    batches = BasicSweeper.split_arguments(parsed, config.hydra.sweeper.get("max_batch_size"))
    for num, overrides in enumerate(job for batch in batches for job in batch):
        job_cfg = loader.load_sweep_config(config, list(overrides))
        with open_dict(job_cfg):
            job_cfg.hydra.job.num = job_cfg.hydra.job.id = num
        output_dir = Path(str(config.hydra.sweep.dir)) / str(job_cfg.hydra.sweep.subdir)
        with read_write(job_cfg), open_dict(job_cfg):
            del job_cfg["hydra"]
        yield overrides, output_dir, job_cfg


class TransferReportCallback(Callback):
    """Before every multirun: check each grid point's config, that no two share an output dir and, where its output
    dir exists (a re-run sweep, ``+resume=<sweep dir>``), that the dir holds no other configuration's run, no live one
    and no checkpoints without a readable record, and that no other dir of the sweep holds its completed run (a grid
    that numbers its jobs otherwise); if one fails, refuse the sweep before any job starts (exit status 1). At its
    end: write the transfer report of the sweep dir, and exit with the number of this sweep's grid points that did
    not complete (failed, dead, missing, or refused at their start) as the status, so that scripts and CI notice;
    with 1 where all did but the report could not be written."""

    def __init__(self):
        self.job_dirs: list[Path] = []  # this invocation's grid points (none known under another sweeper)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if config.get("resume") and not any(sweep_dir.rglob(RESULTS_FILE)):
            log.error("+resume=%s: no sweep run there to go on with (no <job dir>/%s); to start a sweep in that dir, "
                      "give hydra.sweep.dir=%s instead; no job started", config.resume, RESULTS_FILE, config.resume)
            sys.exit(1)
        (sweep_dir / REFUSED_JOBS_FILE).unlink(missing_ok=True)  # an earlier invocation's
        completed = completed_records(sweep_dir)
        refusals, first_at = [], {}
        for overrides, output_dir, job_cfg in grid_jobs(config):
            if output_dir in first_at:  # the later job would find the earlier one's run there and be refused
                refusals.append(f"{' '.join(overrides)}: shares its output dir {output_dir} with "
                                f"{' '.join(first_at[output_dir])}; name every swept key in hydra.sweep.subdir")
                continue
            first_at[output_dir] = overrides
            try:
                check_config(job_cfg)
                job_config = run_config(job_cfg)
                previous, _ = previous_attempt(output_dir, job_config, job_cfg.ckpt_path)
                done_elsewhere = previous is None and next(
                    (d for d, r in completed if same_grid_point(r, overrides, job_config)), None)
                if done_elsewhere:
                    refusals.append(f"{' '.join(overrides)}: completed already in {done_elsewhere}, another job "
                                    "number: this command numbers its grid otherwise than the one that made the "
                                    "sweep dir (keys in another order, or a value added in the middle). Give the "
                                    f"keys in that command's order ({sweep_dir / 'multirun.yaml'}, "
                                    "hydra.overrides.task), and sweep values to add on their own")
            except (ValueError, RunDirConflict) as e:
                refusals.append(f"{' '.join(overrides)}: {type(e).__name__}: {e}")
        if refusals:
            log.error("%d grid point(s) of this sweep cannot run; no job started:\n  %s", len(refusals),
                      first_of(refusals, SHOWN_REFUSALS, sep="\n  "))
            sys.exit(1)  # Hydra turns a callback's exceptions into warnings and goes on
        self.job_dirs = list(first_at)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from pipelines.report import write_report  # matplotlib etc. only when a sweep ends

        sweep_dir = Path(config.hydra.sweep.dir)
        logger = config.get("logger", {})
        try:
            report = write_report([sweep_dir], sweep_dir, reference=config.report.reference,
                                  wandb_logger=logger if logger.get("name") == "wandb" else None)
        except Exception:  # Hydra would make it a warning and exit 0
            log.exception("the transfer report of %s could not be written; once the cause is fixed, write it with "
                          "python -m pipelines.report %s", sweep_dir, sweep_dir)
            report = None
        refused = refused_job_dirs(sweep_dir)
        if self.job_dirs:
            failures = sum(d.resolve() in refused or effective_status(read_record(d) or {}) != "completed"
                           for d in self.job_dirs)
        elif report is not None:  # another sweeper's grid: what the report shows of the sweep dir
            failures = report.unfinished_count() + len(refused - {Path(r["_dir"]).resolve() for r in report.unfinished})
        else:
            failures = len(refused)
        if failures:
            log.error("%d grid point(s) of the sweep did not complete; see %s%s", failures, sweep_dir / "transfer.md",
                      f" and {sweep_dir / REFUSED_JOBS_FILE}" if refused else "")
        if failures or report is None:
            sys.exit(min(failures or 1, MAX_EXIT_STATUS))


def completed_records(sweep_dir: Path) -> list[tuple[Path, dict]]:
    """The completed runs under ``sweep_dir`` that recorded their config."""
    records = ((path.parent, read_record(path.parent)) for path in sorted(sweep_dir.rglob(RESULTS_FILE)))
    return [(d, r) for d, r in records if r and r.get("config") is not None and effective_status(r) == "completed"]


def job_overrides(overrides) -> list[str]:
    """A job's overrides, sorted and without ``+resume=`` (which a re-run adds): what makes it its grid point."""
    return sorted(o for o in overrides if not o.lstrip("+~").startswith("resume="))


def same_grid_point(record: dict, overrides, config: dict) -> bool:
    """Whether ``record`` ran the grid point of these overrides: the same overrides where it recorded them (keys
    that leave the config as it is, e.g. compile=true / false, tell grid points apart), else the same config."""
    if record.get("overrides") is not None:
        return job_overrides(record["overrides"]) == job_overrides(overrides)
    return not config_changes(record["config"], config)[0]
