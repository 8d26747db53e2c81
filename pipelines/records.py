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

from tasks.common.checks import first_of

log = logging.getLogger(__name__)
RESULTS_FILE = "results.json"
HEARTBEAT_STALE_FACTOR = 10  # a heartbeat older than this many intervals (and at least 10 minutes) means dead
HEARTBEAT_STALE_MIN_S = 600
# how a run shows and feeds its progress, not what it computes: may differ between attempts and records
PROGRESS_SETTINGS = ("trainer.enable_progress_bar", "trainer.log_every_n_steps", "task.data.num_workers")
SHOWN_DIFFERENCES = 3  # a comparison of two configs names this many differing keys, then counts the rest
ABSENT = object()  # a config key one side lacks


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


def flat_items(tree, prefix: str = "") -> dict:
    """{"a.b": leaf, ...}; an empty dict is a leaf of its own (key "a.b.")."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in flat_items(sub, f"{prefix}{key}.").items()} or {prefix: {}}


def show(value) -> str:
    return "absent" if value is ABSENT else repr(value)


def config_changes(old: dict, new: dict) -> tuple[dict, dict]:
    """``(changed, added)`` from a stored run config to this one, by flat key: ``changed`` maps a key to its old and
    new value (a key dropped from the project counts), ``added`` holds the keys the old record lacks: keys added to
    the project since (e.g. trainer.num_nodes), which the old run had no way to set. ``PROGRESS_SETTINGS``
    are neither."""
    old_flat, new_flat = (
        {k: v for k, v in flat_items(config).items() if k.rstrip(".") not in PROGRESS_SETTINGS}
        for config in (old, new))
    changed = {k.rstrip("."): (v, new_flat.get(k, ABSENT)) for k, v in sorted(old_flat.items())
               if new_flat.get(k, ABSENT) != v}
    added = {k.rstrip("."): v for k, v in new_flat.items() if k not in old_flat}
    return changed, added


def describe_changes(changed: dict, shown: int = SHOWN_DIFFERENCES) -> str:
    return first_of([f"{k} (was {show(old)}, now {show(new)})" for k, (old, new) in changed.items()], shown)


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
    # this process's own pid in a record of this host: an earlier incarnation's (a restarted container's pid 1)
    if record.get("host") == socket.gethostname() and record.get("pid") is not None \
            and (int(record["pid"]) == os.getpid() or not pid_exists(int(record["pid"]))):
        return True
    age = heartbeat_age_s(record, now)
    interval = float(record.get("heartbeat_interval_s") or 60)
    return age is not None and age > max(HEARTBEAT_STALE_MIN_S, HEARTBEAT_STALE_FACTOR * interval)


def effective_status(record: dict, now: float | None = None) -> str:
    """completed, failed, running (alive) or dead (a ``running`` record left by a killed process)."""
    return "dead" if is_dead(record, now) else str(record.get("status"))
