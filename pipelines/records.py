"""The ``results.json`` record of a run: writing it, reading it back, and telling a live run from a dead one.

A run writes its record at start (``running``) with its pid, host and a heartbeat time that it refreshes while it
works, so that a run killed with SIGKILL (which cannot write ``failed``) is recognisable as dead: on its own host
its pid is gone, and anywhere its heartbeat stops.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)
RESULTS_FILE = "results.json"
HEARTBEAT_STALE_FACTOR = 10  # a heartbeat older than this many intervals (and at least 10 minutes) means dead
HEARTBEAT_STALE_MIN_S = 600


def write_record(output_dir: Path, record: dict) -> None:
    if rank_zero_only.rank != 0:  # DDP: one process writes the record
        return
    tmp = output_dir / (RESULTS_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(output_dir / RESULTS_FILE)  # atomic: a reader never sees half a file


def read_record(run_dir: Path) -> dict | None:
    """The record in ``run_dir``, or None when there is none or it cannot be read (with a warning naming it)."""
    path = Path(run_dir) / RESULTS_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("%s cannot be read (%s: %s): it counts as no record", path, type(e).__name__, e)
        return None


def process_identity() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def heartbeat_age_s(record: dict, now: float | None = None) -> float | None:
    beat = record.get("heartbeat")
    return None if beat is None else (now or time.time()) - float(beat)


def is_dead(record: dict, now: float | None = None) -> bool:
    """A ``running`` record whose process is gone (same host) or whose heartbeat stopped (any host)."""
    if record.get("status") != "running":
        return False
    if record.get("host") == socket.gethostname() and record.get("pid") is not None \
            and not pid_exists(int(record["pid"])):
        return True
    age = heartbeat_age_s(record, now)
    interval = float(record.get("heartbeat_interval_s") or 60)
    return age is not None and age > max(HEARTBEAT_STALE_MIN_S, HEARTBEAT_STALE_FACTOR * interval)


def effective_status(record: dict, now: float | None = None) -> str:
    """completed, failed, running (alive) or dead (a ``running`` record left by a killed process)."""
    return "dead" if is_dead(record, now) else str(record.get("status"))
