"""Divergence on the record: the loss-spike rule, its place in a run's results.json, and its mark in the report."""
import json
import math

import pytest

import tasks.classification.module as classification_module
from pipelines.callbacks import LossSpikeMonitor
from pipelines.report import build_report, collect_records, write_report
from pipelines.run import run
from tasks.base import WatchedLoss


def smooth_losses(steps, seed=0):
    """A training curve: decays from 2.3 to ~0.5 with +-20% step-to-step noise."""
    import random
    rng = random.Random(seed)
    return [(0.5 + 1.8 * math.exp(-s / 40)) * rng.uniform(0.8, 1.2) for s in range(steps)]


def test_rule_fires_on_a_blow_up_and_not_on_noise():
    monitor = LossSpikeMonitor({"loss": WatchedLoss()}, factor=2.0, window=50, min_history=20)
    losses = smooth_losses(300)
    losses[150:153] = [30.0, 500.0, 20.0]  # a blow-up of three steps, then back to the curve
    ratios = [monitor.observe(step, "loss", value) for step, value in enumerate(losses)]
    assert ratios[:20] == [None] * 20  # the window fills first
    assert len(monitor.events) == 1  # three spiking steps are one event
    event = monitor.events[0]
    assert (event["step"], event["last_step"], event["peak_step"], event["value"]) == (150, 152, 151, 500.0)
    assert event["ratio"] > 100 and monitor.worst["ratio"] == event["ratio"]
    assert max(r for r in ratios[153:] if r is not None) < 1.6  # the median kept its level: recovery is no spike
    quiet = LossSpikeMonitor({"loss": WatchedLoss()})
    for step, value in enumerate(smooth_losses(300, seed=1)):
        quiet.observe(step, "loss", value)
    assert quiet.events == [] and 1 < quiet.worst["ratio"] < 1.6


def test_the_floor_keeps_a_loss_near_zero_from_spiking():
    monitor = LossSpikeMonitor({"loss_d": WatchedLoss(floor=1.0)}, min_history=5, window=10)
    for step, value in enumerate([0.01] * 10 + [0.5, 1.9, -1.8]):  # a GAN loss wandering near 0
        monitor.observe(step, "loss_d", value)
    assert monitor.events == [] and monitor.worst["ratio"] == pytest.approx(1.9)
    monitor.observe(13, "loss_d", 5.0)
    assert len(monitor.events) == 1


def test_a_smoothed_loss_takes_swings_and_catches_a_sustained_rise():
    """GAN losses swing from step to step in a smooth run (D and G take turns): over 10-step means a swing is no
    spike, a rise that lasts is."""
    monitor = LossSpikeMonitor({"loss_g": WatchedLoss(floor=1.0, smooth=10)})
    swings = [1.0, -0.5, 4.5, 0.2] * 25  # raw ratios up to 4.5
    for step, value in enumerate(swings):
        monitor.observe(step, "loss_g", value)
    assert monitor.events == [] and monitor.worst["ratio"] < 2
    for step in range(100, 120):  # G loses for good
        monitor.observe(step, "loss_g", 12.0)
    assert len(monitor.events) == 1 and monitor.events[0]["step"] > 100


def test_bad_rule_is_refused():
    with pytest.raises(ValueError, match="window >= min_history"):
        LossSpikeMonitor({"loss": WatchedLoss()}, window=10, min_history=20)


def blow_up_at(monkeypatch, step, factor):
    """Raise the classification learning rate ``factor``-fold from ``step`` on (a forced divergence)."""
    schedule = classification_module.warmup_cosine
    monkeypatch.setattr(classification_module, "warmup_cosine",
                        lambda s, *args: schedule(s, *args) * (factor if s >= step else 1.0))


@pytest.mark.parametrize("forced", [False, True], ids=["normal", "lr-raised-mid-run"])
def test_a_run_records_a_forced_blow_up_and_nothing_on_a_normal_run(forced, compose_cfg, tmp_path, monkeypatch):
    """64 steps at the default rule: a learning rate raised 60-fold at step 40 is a spike on the record; the same
    run without it has none."""
    if forced:
        blow_up_at(monkeypatch, 40, 60.0)
    record = run(compose_cfg("norm=bn_relu", "task.data.limit_train=2048", "task.data.batch_size=32"))
    assert record["status"] == "completed"
    saved = json.loads((tmp_path / "results.json").read_text())["divergence"]
    assert saved["worst"] is not None and "2.0x max(median of the previous 50 steps" in saved["rule"]
    if forced:
        assert saved["spikes"] >= 1 and saved["events"][0]["step"] >= 40 and saved["worst"]["ratio"] > 2
    else:
        assert saved["spikes"] == 0 and saved["worst"]["ratio"] < 2


def write_record(root, name, norm, seed, value, spikes=0):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    events = [{"loss": "loss", "step": 150, "last_step": 152, "peak_step": 151, "value": 56.8, "level": 1.28,
               "ratio": 44.4}] * spikes
    record = {"status": "completed", "task": "classification", "norm": {"name": norm, "kwargs": {}}, "seed": seed,
              "test": {"test/acc1": value}, "monitor": "val/acc1", "mode": "max", "started_at": 1.0 + seed,
              "steps": 10, "epochs": 1, "wall_time_s": 5.0,
              "divergence": {"spikes": spikes, "events": events, "worst": events[0] if events else None}}
    (run_dir / "results.json").write_text(json.dumps(record))


def test_report_marks_a_cell_with_a_spiked_run_and_names_it(tmp_path):
    write_record(tmp_path, "a", "bn_relu", 0, 0.91)
    write_record(tmp_path, "b", "b0", 0, 0.90)
    write_record(tmp_path, "c", "b0", 1, 0.706, spikes=1)
    report = write_report([tmp_path], tmp_path)
    assert [r["_dir"] for r in report.cell("b0", "classification").spiked] == [str(tmp_path / "c")]
    assert report.cell("bn_relu", "classification").spiked == []
    text = (tmp_path / "transfer.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| b0 "))
    assert "(n=2) †1" in row
    assert f"- classification / b0 / seed 1: 1 spike(s), worst at step 151: loss = 56.8, 44.4x its running median " \
           f"1.28 (`{tmp_path / 'c'}`)" in text
    csv_text = (tmp_path / "transfer.csv").read_text()
    assert "classification.spiked_runs" in csv_text.splitlines()[0]
    assert build_report(collect_records([tmp_path])).cell("b0", "classification").values == [0.90, 0.706]
