"""Whole layer searches on Ray, on this machine only: a local instance, a driver killed with SIGKILL and resumed, and a
two-node ray.cluster_utils.Cluster that loses a node mid-search. Tiny budgets, anchors and images."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from tests.conftest import REPO_ROOT

TINY = [
    "logger=none", "search.progress_bar=false", "search.workers=2", "search.population=3", "search.tournament=2",
    "search.max_ops=6", "search.seed_layers=[s0]", "references=[bn_relu,s0]", "search.object_store_memory=80000000",
    "proxy.image_size=8", "proxy.score_size=64", "proxy.rerank_size=64", "proxy.batch_size=8", "proxy.steps=6",
    "proxy.warmup_steps=2", "proxy.groups=2",
    "~proxy.anchors.efficientnet", "proxy.anchors.resnet.width=4", "proxy.anchors.mobilenet_v2.width_mult=0.1",
    "proxy.anchors.mobilenet_v2.depth_mult=0.15", "proxy.anchors.mobilenet_v2.output_stride=4",
    "protocols.screen.steps=3", "protocols.screen.min_accuracy=0.0", "protocols.screen.eval_size=32",
    "protocols.stability.steps=1", "protocols.stability.batch_size=8",
    "rerank.top=2", "rerank.keep=1", "rerank.steps=4", "rerank.reference_seeds=2",
]
WORKER_PROTOCOLS = ("finite", "stability", "quality", "proxy")


def search(search_dir, *overrides, wait=True):
    command = [sys.executable, "search.py", *TINY, f"hydra.run.dir={search_dir}", *overrides]
    if not wait:
        return subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def history(search_dir):
    path = search_dir / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")] if path.is_file() \
        else []


def candidates(entries):
    return [e for e in entries if e["kind"] == "candidate"]


def check_each_candidate_once(entries, budget):
    """Every candidate recorded once, and no layer trained twice (an equivalent reuses its outcome)."""
    found = candidates(entries)
    assert sorted(e["id"] for e in found) == list(range(budget))
    trained = Counter(e["fingerprint"] for e in found if set(e["times"]) & set(WORKER_PROTOCOLS))
    assert [fp for fp, n in trained.items() if n > 1] == []


def wait_until(condition, proc, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "the search ended before the test could act"
        assert time.time() < deadline
        time.sleep(0.2)


def test_killed_driver_resumes_with_its_population_and_cache_and_writes_the_outputs(tmp_path):
    run_dir = tmp_path / "s"
    proc = search(run_dir, "search.budget=10", wait=False)
    wait_until(lambda: len(candidates(history(run_dir))) >= 4, proc)
    os.kill(proc.pid, signal.SIGKILL)  # the driver only: Ray's processes share its fate
    proc.wait()
    before = history(run_dir)
    resumed = search(run_dir, "search.budget=10", f"+resume={run_dir}")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"{len(candidates(before))} candidates recorded" in resumed.stdout
    entries = history(run_dir)
    assert entries[:len(before)] == before
    check_each_candidate_once(entries, 10)
    assert Counter(e["name"] for e in entries if e["kind"] == "reference") == {"bn_relu": 1, "s0": 1}
    seed = next(e for e in candidates(entries) if e["origin"] == "seed")
    assert seed["status"] == "passed" and len(seed["scores"]) == 2  # the known layer, seeded, trains on both anchors
    reranked = Counter(e["name"] for e in entries if e["kind"] == "rerank")
    assert reranked["bn_relu"] == reranked["s0"] == 2 and 1 <= len(reranked) - 2 <= 2

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sampled"] == 10
    assert sum(r["ended"] for r in summary["protocols"].values()) + summary["passed"] + summary["failed"] == 10
    board = (run_dir / "leaderboard.md").read_text()
    assert "bn_relu (reference)" in board and "| stability |" in board
    (evolved,) = summary["evolved"]
    assert (run_dir / "norm" / f"{evolved}.yaml").is_file() and evolved in board
    assert (run_dir / "pareto.png").stat().st_size > 0 and (run_dir / "progress.png").is_file()
    assert f"norm=bn_relu,b0,s0,{evolved}" in (run_dir / "transfer_command.txt").read_text()

    again = search(run_dir, "search.budget=10", f"+resume={run_dir}")
    assert again.returncode == 0, again.stdout[-3000:]
    assert history(run_dir) == entries and "Started a local Ray instance" not in again.stderr  # nothing to evaluate


def test_bad_ray_address_and_config_are_refused_before_anything_starts(tmp_path):
    from pipelines.search.engine import EngineError, RayEngine
    started = time.time()
    with pytest.raises(EngineError, match="search.ray_address=127.0.0.1:1: nothing answers there"):
        RayEngine(2, "127.0.0.1:1")  # at once: Ray itself would wait for minutes
    assert time.time() - started < 15
    done = search(tmp_path / "t", "search.budget=2")  # the command line says what to change, exit status 1
    assert done.returncode == 1 and "search.budget=2 is smaller than search.population=3" in done.stdout
    assert not (tmp_path / "t" / "history.jsonl").exists()


def test_two_node_cluster_loses_a_node_mid_search_and_no_candidate_is_lost_or_repeated(tmp_path):
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80_000_000,
                                                            "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=1, object_store_memory=80_000_000)
        cluster.wait_for_nodes()
        head_id, worker_id = cluster.head_node.node_id, worker.node_id
        proc = search(tmp_path / "s", "search.budget=14", "proxy.steps=24", f"search.ray_address={cluster.address}",
                      wait=False)
        wait_until(lambda: any(e.get("node") == worker_id for e in history(tmp_path / "s")), proc)
        cluster.remove_node(worker)
        removed_at = len(history(tmp_path / "s"))
        assert proc.wait(timeout=600) == 0
    finally:
        cluster.shutdown()
    entries = history(tmp_path / "s")
    check_each_candidate_once(entries, 14)
    assert [e for e in entries if e["status"] == "failed"] == []  # the lost node's tasks were retried
    assert {e.get("node") for e in entries if e.get("node")} == {head_id, worker_id}
    assert all(e.get("node") in (head_id, None) for e in entries[removed_at + 2:])  # after it left, only the head
    assert len(entries) > removed_at + 2
