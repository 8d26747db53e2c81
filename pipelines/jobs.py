"""The Hydra job this process runs: which multirun it belongs to, its grid point, DDP inside a sweep, and jobs
refused at their start. Shared by the run, sweep and search pipelines; imports none of them."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write

log = logging.getLogger(__name__)
# what Lightning's DDP launcher sets in the launching process's environment and leaves there
DDP_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")
RANK_EXIT_TIMEOUT_S = 60
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
