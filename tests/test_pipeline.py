"""The run pipeline end to end on tiny real data: every layer trains, records are written, failures and resume."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from evonorm import NORM_ACT_NAMES
from pipelines.run import run
from tests.conftest import REPO_ROOT, SMOKE_OVERRIDES

RECORD_KEYS = {"status", "task", "norm", "model", "dataset", "seed", "test", "best_val", "steps", "epochs",
               "wall_time_s", "params", "git_commit", "error"}


def read_record(path):
    return json.loads((path / "results.json").read_text())


@pytest.mark.parametrize("norm", NORM_ACT_NAMES)
def test_short_fit_every_norm(norm, compose_cfg, tmp_path):
    record = run(compose_cfg(f"norm={norm}"))
    saved = read_record(tmp_path)
    assert saved == json.loads(json.dumps(record, default=str))
    assert RECORD_KEYS <= saved.keys()
    assert saved["status"] == "completed" and saved["error"] is None
    assert saved["norm"]["name"] == norm
    assert saved["model"] == "preact_resnet_cifar" and saved["dataset"] == "fashion_mnist"
    assert saved["steps"] == 512 // 64 and saved["epochs"] == 1
    assert 0.0 <= saved["test"]["test/acc1"] <= saved["test"]["test/acc5"] <= 1.0
    assert "val/acc1" in saved["best_val"] and saved["params"] > 0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_training_learns(compose_cfg, tmp_path):
    """Three epochs on 2k images must beat chance (10%) clearly, or the pipeline is broken somewhere."""
    record = run(compose_cfg("norm=bn_relu", "task.epochs=3", "task.model.width=16", "task.data.limit_train=2048",
                             "task.data.limit_eval=512"))
    assert record["test"]["test/acc1"] > 0.65


def test_failed_run_writes_record(compose_cfg, tmp_path):
    with pytest.raises(Exception, match="Fashion-MNIST not found"):
        run(compose_cfg(f"task.data.root={tmp_path / 'nowhere'}"))
    saved = read_record(tmp_path)
    assert saved["status"] == "failed"
    assert "Fashion-MNIST not found" in saved["error"] and "apt-get install dataset-fashion-mnist" in saved["error"]


def test_bad_test_ckpt_is_rejected(compose_cfg, tmp_path):
    with pytest.raises(ValueError, match="test_ckpt must be 'best' or 'last'"):
        run(compose_cfg("test_ckpt=final"))
    assert read_record(tmp_path)["status"] == "failed"


def test_nan_loss_stops_with_clear_error(compose_cfg, tmp_path):
    with pytest.raises(FloatingPointError, match="lower learning rate"):
        run(compose_cfg("norm=bn_relu", "task.optim.lr=1e30", "task.optim.warmup_epochs=0"))
    assert read_record(tmp_path)["status"] == "failed"


def test_resume_continues_step_count(compose_cfg, tmp_path):
    first = tmp_path / "first"
    run(compose_cfg("norm=b0", output_dir=first))
    last = first / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 8
    second = tmp_path / "second"
    record = run(compose_cfg("norm=b0", "task.epochs=2", f"ckpt_path={last}", output_dir=second))
    assert record["steps"] == 16 and record["epochs"] == 2
    assert record["resumed_from"] == str(last)


def test_csv_logger_writes_metrics(compose_cfg, tmp_path):
    run(compose_cfg("logger=csv", "trainer.log_every_n_steps=1"))
    metrics = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/acc1" in metrics


def test_same_seed_same_result(compose_cfg, tmp_path):
    records = [run(compose_cfg("norm=s0", "trainer.deterministic=true", output_dir=tmp_path / str(i)))
               for i in range(2)]
    assert records[0]["test"] == records[1]["test"]


def test_ddp_with_hydra_on_cpu(tmp_path):
    """Two CPU processes (gloo): Lightning re-launches run.py inside the same Hydra run dir; rank 0 writes."""
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "run.py", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "trainer.precision=32-true", *SMOKE_OVERRIDES, f"hydra.run.dir={run_dir}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    record = read_record(run_dir)
    assert record["status"] == "completed"
    assert record["steps"] == 512 // (64 * 2)  # each process sees half of the data per step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_killed_run_keeps_its_state(tmp_path):
    """SIGTERM mid-training: the record says so, and a checkpoint to resume from is saved."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "run.py", *SMOKE_OVERRIDES, "task.epochs=50", f"hydra.run.dir={run_dir}"],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    record = read_record(run_dir)
    assert record["status"] == "failed" and record["error"].startswith("interrupted")
    assert "ckpt_path=" in record["error"] and record["steps"] >= 8
    assert (run_dir / "checkpoints" / "on_exception.ckpt").is_file()


def test_mobilenet_v2_runs_on_the_default_data(compose_cfg, tmp_path):
    record = run(compose_cfg("task.model.arch=mobilenet_v2", "task.model.width_mult=0.25", "norm=s0"))
    assert record["status"] == "completed" and record["model"] == "mobilenet_v2"
