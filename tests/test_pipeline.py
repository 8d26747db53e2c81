"""The run pipeline end to end on tiny real data: every layer trains, records are written, failures and resume."""
import json

import pytest
import torch

from evonorm import NORM_ACT_NAMES
from pipelines.run import run

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
    run(compose_cfg("logger=csv"))
    metrics = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/acc1" in metrics
