"""The run pipeline end to end on tiny real data: every layer trains, records are written, failures and resume."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from evonorm import NORM_ACT_NAMES
from pipelines.callbacks import FiniteLossCheck
from pipelines.records import write_record
from pipelines.run import RunDirConflict, newest_checkpoint, run
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
    # the overrides the error suggests exist in the config
    assert "task.data.root=<folder> task.data.download=true" in saved["error"]
    assert {"root", "download"} <= set(compose_cfg().task.data)
    # failed before the first step: no checkpoint of an untrained model, and the error does not point to one
    assert "ckpt_path" not in saved["error"] and not (tmp_path / "checkpoints" / "on_exception.ckpt").exists()
    assert saved["pid"] == os.getpid() and saved["host"] == socket.gethostname()


def crash_at_step(monkeypatch, step):
    def crash(self, trainer, *args):
        if trainer.global_step == step:
            raise RuntimeError("simulated crash")
    monkeypatch.setattr(FiniteLossCheck, "on_train_batch_end", crash)


def test_rerun_in_the_same_dir_skips_completed_and_resumes_killed(compose_cfg, tmp_path, monkeypatch):
    """A run killed with SIGKILL leaves `running` with a pid that is gone: a re-run resumes it from last.ckpt."""
    cfg = compose_cfg("norm=b0", "task.epochs=2", "heartbeat_s=0")
    crash_at_step(monkeypatch, 12)  # mid epoch 2, after last.ckpt of epoch 1 (step 8)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg)
    crashed = read_record(tmp_path)
    assert crashed["status"] == "failed" and "resume with ckpt_path=" in crashed["error"]
    assert crashed["heartbeat"] > crashed["started_at"]
    # what SIGKILL would have left: no crash checkpoint, a `running` record of a process that is gone
    (tmp_path / "checkpoints" / "on_exception.ckpt").unlink()
    gone = subprocess.Popen(["true"])
    gone.wait()
    write_record(tmp_path, {**crashed, "status": "running", "error": None, "pid": gone.pid})
    monkeypatch.undo()
    resumed = run(cfg)
    assert resumed["status"] == "completed" and resumed["steps"] == 16
    assert resumed["resumed_from"] == str(tmp_path / "checkpoints" / "last.ckpt")
    assert [a["status"] for a in resumed["previous_attempts"]] == ["dead"]
    assert run(cfg) == resumed  # completed: skipped, the record stays as it is


def test_a_live_run_or_another_configuration_is_not_overwritten(compose_cfg, tmp_path):
    write_record(tmp_path, {"status": "running", "task": "classification", "pid": os.getpid(),
                            "host": socket.gethostname(), "heartbeat": time.time()})
    with pytest.raises(RunDirConflict, match="being run right now"):
        run(compose_cfg())
    write_record(tmp_path, {**read_record(tmp_path), "status": "failed", "config": {"seed": 1}})
    with pytest.raises(RunDirConflict, match="another configuration .*seed"):
        run(compose_cfg())


def test_newest_checkpoint_prefers_the_later_of_crash_and_last(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    assert newest_checkpoint(tmp_path) is None
    (ckpt_dir / "on_exception.ckpt").write_bytes(b"")
    (ckpt_dir / "last.ckpt").write_bytes(b"")
    os.utime(ckpt_dir / "last.ckpt", (1, 1))
    assert newest_checkpoint(tmp_path) == ckpt_dir / "on_exception.ckpt"


def test_sync_batchnorm_keeps_the_activation(compose_cfg):
    """torch's convert_sync_batchnorm turns BN-ReLU into a plain SyncBatchNorm; ours keeps norm + act."""
    from torch import nn

    from evonorm import norm_act
    from evonorm.baselines import BatchNormAct2d, SyncBatchNormAct2d
    from pipelines.sync_batchnorm import NormActSyncBatchNorm, trainer_arguments

    kwargs = trainer_arguments(compose_cfg("trainer.sync_batchnorm=true").trainer)
    assert "sync_batchnorm" not in kwargs and isinstance(kwargs["plugins"][0], NormActSyncBatchNorm)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), norm_act("bn_relu", 8), nn.BatchNorm2d(8))
    x = torch.randn(2, 3, 8, 8)
    expected, weight = model(x), model[1].weight
    synced = kwargs["plugins"][0].apply(model)
    assert type(synced[1]) is SyncBatchNormAct2d and synced[1].weight is weight
    assert type(synced[2]) is nn.SyncBatchNorm
    assert torch.equal(synced(x), expected) and (synced[1](torch.randn(2, 8, 4, 4)) >= 0).all()
    reverted = kwargs["plugins"][0].revert(synced)
    assert type(reverted[1]) is BatchNormAct2d and isinstance(reverted[1].act, nn.ReLU)


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
