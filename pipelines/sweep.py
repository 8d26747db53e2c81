"""Hydra multirun glue: which sweep a job belongs to, DDP inside a sweep, the check of every grid point before a
sweep starts, and the report at its end."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from pipelines.records import RESULTS_FILE, config_changes, effective_status, read_record
from tasks.common.checks import first_of

log = logging.getLogger(__name__)
MAX_EXIT_STATUS = 125  # higher exit codes mean "killed by a signal" to shells
# what Lightning's DDP launcher sets in the launching process's environment and leaves there
DDP_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")
RANK_EXIT_TIMEOUT_S = 60
SHOWN_REFUSALS = 5  # a refused sweep names this many grid points, then counts the rest
REFUSED_JOBS_FILE = "refused_jobs.txt"  # in the sweep dir: "<job dir>\t<why>" per job refused at its start


def multirun_sweep_dir() -> Path | None:
    """The sweep dir when this process runs a job of a Hydra multirun, else None."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir)


def multirun_job_overrides() -> list[str] | None:
    """This job's overrides (its grid point) when it is a job of a Hydra multirun, else None."""
    return list(HydraConfig.get().overrides.task) if multirun_sweep_dir() is not None else None


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


def ddp_launch_state() -> dict:
    """What a DDP job changes in this process; taken before the job's Trainer exists, for ``end_ddp_job``."""
    return {"env": {k: os.environ.get(k) for k in DDP_LAUNCH_ENV}, "argv": list(sys.argv),
            "threads": torch.get_num_threads()}


def end_ddp_job(trainer, launch_state: dict) -> None:
    """Tear a DDP job down so that the next job of a sweep in this process launches its ranks afresh.

    Lightning's launcher leaves ``LOCAL_RANK`` (and the port, world size, thread count) in ``os.environ``: the next
    Trainer would take ``LOCAL_RANK`` to mean that its processes were started externally, launch no ranks and wait
    for them forever. The ranks it launched are waited for (killed after ``RANK_EXIT_TIMEOUT_S``), after taking them
    from Lightning's child-process observer, which would otherwise kill this process, i.e. the sweep, when a rank of
    a failed job exits with an error.
    """
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    ranks = list(getattr(launcher, "procs", None) or [])
    if ranks:
        launcher.procs.clear()  # the observer holds this list: empty, it stops without killing anyone
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # also frees ranks that wait in a collective for this one
    for rank in ranks:
        try:
            rank.wait(timeout=RANK_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("DDP rank process %d still running %d s after its job ended; killing it", rank.pid,
                        RANK_EXIT_TIMEOUT_S)
            rank.kill()
            rank.wait()
    for key, value in launch_state["env"].items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    sys.argv[:] = launch_state["argv"]
    torch.set_num_threads(launch_state["threads"])


def refuse_job(error: Exception) -> None:
    """Note a job of this multirun refused at its start (a run begun in its dir since the sweep's check). Its dir
    holds another run's record, which the report may take for this grid point's: the sweep's end counts the note.
    A file, not memory: a launcher may run each job in a process of its own."""
    with open(multirun_sweep_dir() / REFUSED_JOBS_FILE, "a") as notes:
        notes.write(f"{Path(HydraConfig.get().runtime.output_dir).resolve()}\t{error}\n")
    log.error("job refused: %s; the sweep goes on", error)


def refused_job_dirs(sweep_dir: Path) -> set[Path]:
    notes = sweep_dir / REFUSED_JOBS_FILE
    return {Path(line.split("\t", 1)[0]) for line in notes.read_text().splitlines()} if notes.is_file() else set()


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
        from pipelines.run import RunDirConflict, check_config, previous_attempt, run_config  # the training stack

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
