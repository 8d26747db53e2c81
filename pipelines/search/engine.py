"""Ray as the search's engine: evaluations are Ray tasks (one CPU each), as many in flight as there are workers,
handled in the order they finish (``ray.wait(num_returns=1)``), on a local instance or a cluster.

A task whose worker process or node dies is retried (``max_retries``; the evaluation is seeded from the candidate,
so the retry gives the same result); one that still fails, or raises, comes back as a failure and the search goes
on. The workers import this project: on a cluster every node needs it at the same path (``PYTHONPATH`` is set to
this checkout) or installed (``pip install -e``).
"""
from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
from pathlib import Path

from pipelines.checks import ConfigError
from pipelines.search.evaluator import evaluate

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
CONNECT_TIMEOUT_S = 10  # Ray itself waits minutes for an address where nothing listens


class EngineError(RuntimeError):
    """Ray could not be started or reached."""


def probe(address: str) -> None:
    """Refuse at once a ``host:port`` (or ``ray://host:port``) where nothing listens; ``auto`` is Ray's to find."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as e:
        raise EngineError(f"search.ray_address={address}: nothing answers there ({type(e).__name__}: {e}); start "
                          "a Ray cluster there (ray start --head), or leave search.ray_address=null for a local "
                          "instance") from e


def import_ray(address: str | None):
    """``ray``, imported for ``address``: a ``ray://`` client of a cluster with token authentication (Ray's default
    since 2.5x) sends the token only if ``RAY_AUTH_MODE=token`` was set before ray was imported."""
    token = os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").is_file()
    if (address or "").startswith("ray://") and token and "RAY_AUTH_MODE" not in os.environ:
        if "ray" in sys.modules:
            log.warning("ray was imported before the search set RAY_AUTH_MODE=token; if the connection to %s "
                        "times out, export RAY_AUTH_MODE=token", address)
        os.environ["RAY_AUTH_MODE"] = "token"
    return importlib.import_module("ray")


class Failure:
    """An evaluation that crashed (after its retries): what the driver records instead of an outcome."""

    def __init__(self, error: BaseException):
        self.error = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"


class RayEngine:
    def __init__(self, workers: int, address: str | None = None, max_retries: int = 2,
                 object_store_memory: int | None = None):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"search.workers={workers!r}: a whole number >= 1 (evaluations in flight)")
        self.workers = workers
        if address is not None:
            probe(address)
        self.ray = ray = import_ray(address)
        env = {"PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO_ROOT)) if p)}
        try:
            if address is None:
                ray.init(num_cpus=workers, include_dashboard=False, object_store_memory=object_store_memory,
                         log_to_driver=False, runtime_env={"env_vars": env})
            else:
                ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": env})
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"search.ray_address={address}" if address else "a local Ray instance"
            hint = ("start one there (ray start --head), or leave search.ray_address=null for a local instance"
                    if address else "check `ray status` and the memory free for its object store")
            raise EngineError(f"{where}: Ray is not reachable ({type(e).__name__}: {e}); {hint}") from e
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < 1:
            raise EngineError(f"the Ray cluster at {address} offers no CPU to run evaluations on")
        if cpus < workers:
            log.warning("search.workers=%d but the Ray cluster has %g CPUs: the extra evaluations wait", workers, cpus)
        self.task = ray.remote(num_cpus=1, max_retries=max_retries)(evaluate)
        self.pending: dict = {}  # ObjectRef -> job

    def put(self, value):
        """Into the object store once (the proxy data): tasks get the reference."""
        return self.ray.put(value)

    @property
    def has_room(self) -> bool:
        return len(self.pending) < self.workers

    def submit(self, job: dict, *args) -> None:
        self.pending[self.task.remote(job, *args)] = job

    def next_finished(self) -> tuple[dict, dict | Failure]:
        """The next evaluation to finish: its job and outcome (or Failure)."""
        (ref,), _ = self.ray.wait(list(self.pending), num_returns=1)
        job = self.pending.pop(ref)
        try:
            return job, self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            log.warning("evaluation of %s failed after its retries: %s", job["name"], e)
            return job, Failure(e)

    def shutdown(self) -> None:
        for ref in self.pending:
            self.ray.cancel(ref, force=True)
        self.pending.clear()
        self.ray.shutdown()
