"""The transfer report from synthetic records: statistics, noise marks, missing/failed/dead runs, merged sweeps."""
import csv
import json
import os
import socket
import subprocess
import time

import pytest

from pipelines.records import effective_status
from pipelines.report import build_report, collect_records, heat_map_colours, main, write_report

ACC, FID = ("val/acc1", "max"), ("val/fid_ema", "min")


def write_run(root, name, task, norm, seed, value=None, *, headline=ACC, status="completed", started_at=None,
              **extra):
    monitor, mode = headline
    run_dir = root / name
    run_dir.mkdir(parents=True)
    test = {} if value is None else {"test/" + monitor.removeprefix("val/"): value, "test/loss": 1.0}
    record = {"status": status, "task": task, "norm": {"name": norm, "kwargs": {}}, "seed": seed, "test": test,
              "monitor": monitor, "mode": mode, "started_at": started_at or time.time(), "steps": 10, "epochs": 1,
              "wall_time_s": 5.0, **extra}
    (run_dir / "results.json").write_text(json.dumps(record))
    return record


def exited_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_running_record_of_this_process_pid_is_an_earlier_incarnations():
    """A container restarted after a kill runs as the same pid (often 1) on the same host: that record is dead."""
    record = {"status": "running", "pid": os.getpid(), "host": socket.gethostname(), "heartbeat": time.time()}
    assert effective_status(record) == "dead"
    assert effective_status({**record, "pid": os.getppid()}) == "running"


def test_a_non_finite_headline_is_no_value_and_no_rank(tmp_path):
    write_run(tmp_path, "a", "biggan", "bn_relu", 0, 300.0, headline=FID)
    write_run(tmp_path, "b", "biggan", "b0", 0, float("nan"), headline=FID)
    report = build_report(collect_records([tmp_path]))
    cell = report.cell("b0", "biggan")
    assert cell.outcome_text() == "1 non-finite" and cell.rank is None and cell.delta is None
    assert report.cell("bn_relu", "biggan").rank == 1 and report.unfinished_count() == 1


def read_csv(path):
    with open(path) as f:
        return {row["layer"]: row for row in csv.DictReader(f)}


def error_bar_lengths(ax) -> list[float]:
    """The drawn error bars of a bar chart (matplotlib draws none for a NaN error)."""
    return [float(abs(seg[1][1] - seg[0][1])) for coll in ax.collections for seg in coll.get_segments() if len(seg)]


def test_one_seed_has_no_std_and_unknown_spread(tmp_path, request):
    write_run(tmp_path, "a", "classification", "bn_relu", 0, 0.90)
    write_run(tmp_path, "b", "classification", "s0", 0, 0.92)
    write_run(tmp_path, "c", "classification", "s0", 1, 0.94)
    write_report([tmp_path], tmp_path)
    assert (tmp_path / "transfer.png").read_bytes()[:4] == b"\x89PNG"
    figures = request.getfixturevalue("saved_figures")  # from here on, figures are kept instead of written
    write_report([tmp_path], tmp_path)
    bars = figures[0].subfigs[1].axes[0]
    assert error_bar_lengths(bars) == [pytest.approx(2 * 0.0141421, rel=1e-3)]  # s0's two seeds; bn_relu's one: none
    (tmp_path / "c" / "results.json").unlink()
    report = write_report([tmp_path], tmp_path)
    cell = report.cell("s0", "classification")
    assert cell.std is None and cell.within_noise is None
    assert cell.delta == pytest.approx(0.02) and cell.rank == 1
    assert "0.92 (n=1)" in (tmp_path / "transfer.md").read_text()
    assert "+0.02?" in (tmp_path / "transfer.md").read_text()
    rows = read_csv(tmp_path / "transfer.csv")
    assert rows["s0"]["classification.std"] == "" and rows["s0"]["classification.within_noise"] == ""


def test_difference_within_seed_spread_is_marked_noise(tmp_path):
    for seed, (ref, small, large) in enumerate([(0.90, 0.91, 0.95), (0.92, 0.90, 0.97)]):
        write_run(tmp_path, f"r{seed}", "classification", "bn_relu", seed, ref)
        write_run(tmp_path, f"s{seed}", "classification", "s0", seed, small)
        write_run(tmp_path, f"b{seed}", "classification", "b0", seed, large)
    report = build_report(collect_records([tmp_path]))
    assert report.cell("s0", "classification").within_noise is True  # |Δ| 0 < std 0.014
    assert report.cell("b0", "classification").within_noise is False  # Δ 0.05 > std 0.014
    assert report.cell("b0", "classification").std == pytest.approx(0.0141421, rel=1e-4)
    md = write_report([tmp_path], tmp_path) and (tmp_path / "transfer.md").read_text()
    assert "| b0 | 0.96 ± 0.014 (n=2) | +0.05 | 1 |" in md
    assert "≈" in md.split("| s0 |")[1].split("\n")[0]


def test_heat_map_pales_a_difference_within_noise_and_greys_a_missing_cell(tmp_path):
    for seed, (ref, clear, noisy) in enumerate([(0.90, 0.95, 0.90), (0.92, 0.97, 1.02)]):
        write_run(tmp_path, f"r{seed}", "classification", "bn_relu", seed, ref)
        write_run(tmp_path, f"b{seed}", "classification", "b0", seed, clear)
        write_run(tmp_path, f"s{seed}", "classification", "s0", seed, noisy)
    write_run(tmp_path, "g", "classification", "gn_relu", 0, status="failed")
    report = build_report(collect_records([tmp_path]))
    b0, s0 = report.cell("b0", "classification"), report.cell("s0", "classification")
    assert b0.relative_gain_pct == pytest.approx(s0.relative_gain_pct)  # the same gain, only the spread differs
    assert b0.within_noise is False and s0.within_noise is True
    rgba, _ = heat_map_colours(report)
    b0_colour, s0_colour = (rgba[report.norms.index(n), 0, :3] for n in ("b0", "s0"))
    assert b0_colour[1] > b0_colour[0]  # green: better than the reference
    assert (s0_colour >= b0_colour).all() and s0_colour.sum() > b0_colour.sum() + 0.5  # the same hue, paled
    assert rgba[report.norms.index("gn_relu"), 0, :3] == pytest.approx([0.85] * 3)


def test_lower_is_better_metric_ranks_and_colours_the_right_way(tmp_path):
    write_run(tmp_path, "a", "biggan", "bn_relu", 0, 100.0, headline=FID)
    write_run(tmp_path, "b", "biggan", "s0", 0, 80.0, headline=FID)
    report = build_report(collect_records([tmp_path]))
    cell = report.cell("s0", "biggan")
    assert report.headlines[0].metric == "test/fid_ema" and report.headlines[0].mode == "min"
    assert cell.rank == 1 and cell.delta == pytest.approx(-20.0) and cell.relative_gain_pct == pytest.approx(20.0)


def test_missing_reference_layer_says_what_to_do(tmp_path, capsys):
    write_run(tmp_path, "a", "classification", "b0", 0, 0.90)
    write_run(tmp_path, "b", "classification", "s0", 0, 0.92)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reference layer 'bn_relu' has no completed run" in out and "--reference" in out
    assert "layers with results: b0, s0" in out
    rows = read_csv(tmp_path / "transfer.csv")
    assert rows["s0"]["classification.delta"] == "" and rows["s0"]["classification.rank"] == "1"
    assert main([str(tmp_path), "--reference", "b0"]) == 0
    assert read_csv(tmp_path / "transfer.csv")["s0"]["classification.delta"] != ""


def test_two_sweep_dirs_merge_and_the_newest_record_wins(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    write_run(first, "a", "classification", "bn_relu", 0, 0.90, started_at=100.0)
    write_run(first, "b", "classification", "s0", 0, 0.50, started_at=100.0)
    write_run(second, "b", "classification", "s0", 0, 0.93, started_at=200.0)  # a later re-run of s0
    write_run(second, "c", "maskrcnn", "bn_relu", 0, 0.20, headline=("val/segm_AP", "max"))
    write_run(second, "d", "maskrcnn", "s0", 0, 0.25, headline=("val/segm_AP", "max"))
    report = write_report([first, second], tmp_path)
    assert [h.task for h in report.headlines] == ["classification", "maskrcnn"]
    assert report.cell("s0", "classification").values == [0.93]
    assert report.cell("s0", "maskrcnn").values == [0.25]
    assert read_csv(tmp_path / "transfer.csv")["s0"]["mean_rank"] == "1.0"


def test_failed_dead_running_and_missing_runs_are_shown(tmp_path):
    write_run(tmp_path, "a", "classification", "bn_relu", 0, 0.90)
    write_run(tmp_path, "b", "classification", "bn_relu", 1, 0.91)
    write_run(tmp_path, "c", "classification", "s0", 0, status="failed", error="NonFiniteLossError: ...")
    write_run(tmp_path, "d", "classification", "s0", 1, status="running", pid=exited_pid(),
              host=socket.gethostname(), heartbeat=time.time())
    write_run(tmp_path, "e", "classification", "b0", 0, status="running", pid=os.getppid(),  # alive
              host=socket.gethostname(), heartbeat=time.time())
    write_run(tmp_path, "f", "classification", "b0", 1, status="running", pid=1, host="another-node",
              heartbeat=time.time() - 3600, heartbeat_interval_s=30)
    write_run(tmp_path, "g", "classification", "gn_relu", 0, 0.88)  # gn_relu seed 1: no record at all
    report = write_report([tmp_path], tmp_path)
    assert report.cell("s0", "classification").outcome_text() == "1 failed, 1 dead"
    assert report.cell("b0", "classification").outcome_text() == "1 dead, 1 running"
    assert report.cell("gn_relu", "classification").outcome_text() == "1 completed, 1 missing"
    assert report.unfinished_count() == 5
    md = (tmp_path / "transfer.md").read_text()
    assert "| s0 | 1 failed, 1 dead |" in md and "0.88 (n=1); 1 missing" in md
    # under the table, each run that did not complete: what happened and where
    assert f"- classification / s0 / seed 0: failed: NonFiniteLossError: ... (`{tmp_path / 'c'}`)" in md
    assert "- classification / s0 / seed 1: dead (killed: its process is gone or its heartbeat stopped) at step 10" \
        in md
    assert f"(`{tmp_path / 'd'}`)" in md and f"- classification / b0 / seed 0: running (pid {os.getppid()}" in md


def test_records_without_monitor_get_a_clear_note(tmp_path):
    record = write_run(tmp_path, "a", "classification", "bn_relu", 0, 0.9)
    del record["monitor"], record["mode"]
    (tmp_path / "a" / "results.json").write_text(json.dumps(record))
    report = write_report([tmp_path], tmp_path)
    assert report.headlines[0].metric is None
    assert report.cell("bn_relu", "classification").outcome_text() == "1 no metric"
    assert "no record names its monitor metric" in (tmp_path / "transfer.md").read_text()


def test_three_tasks_picture_and_missing_dir(tmp_path, capsys):
    for task, headline, values in [("classification", ACC, (0.90, 0.91)), ("maskrcnn", ("val/segm_AP", "max"),
                                   (0.20, 0.18)), ("biggan", FID, (120.0, 100.0))]:
        for norm, value in zip(("bn_relu", "s0"), values):
            write_run(tmp_path, f"{task}-{norm}", task, norm, 0, value, headline=headline)
    write_run(tmp_path, "x", "biggan", "b0", 0, status="failed")
    write_report([tmp_path], tmp_path)
    assert (tmp_path / "transfer.png").stat().st_size > 10_000
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2 and not (tmp_path / "empty" / "transfer.md").exists()
    assert "no run records (results.json) under" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # over several sweeps, the first one's own report would be replaced
        main([str(tmp_path), str(tmp_path / "empty")])
    assert "several dirs: give --out DIR" in capsys.readouterr().err


def test_architectures_are_columns_ranked_on_their_own(tmp_path, saved_figures):
    """task.model.arch=a,b: a column per task and architecture (with its kwargs), not superseded records."""
    values = {("torchvision:mobilenet_v2", "bn_relu"): 0.80, ("torchvision:mobilenet_v2", "s0"): 0.85,
              ("timm:efficientnet_b0", "bn_relu"): 0.90, ("timm:efficientnet_b0", "s0"): 0.70}
    for i, ((arch, norm), value) in enumerate(values.items()):
        write_run(tmp_path, f"{i}", "classification", norm, 0, value, sweep_job=i,
                  config={"task": {"model": {"arch": arch, "kwargs": {"width_mult": 0.5} if i < 2 else None}}})
    write_run(tmp_path, "m", "maskrcnn", "s0", 0, 0.2, headline=("val/segm_AP", "max"),
              config={"task": {"model": {"arch": "preact_resnet18", "kwargs": None}}})
    report = write_report([tmp_path], tmp_path)
    names = [h.name for h in report.headlines]
    heat_map = saved_figures[0].subfigs[0].axes[0]
    assert heat_map.get_xticklabels()[1].get_text().startswith("classification\n@ timm:efficientnet_b0\n")
    assert names == ["classification @ torchvision:mobilenet_v2(width_mult=0.5)",
                     "classification @ timm:efficientnet_b0", "maskrcnn"]
    assert report.cell("s0", names[0]).rank == 1 and report.cell("s0", names[1]).rank == 2
    assert report.cell("s0", names[1]).delta == pytest.approx(-0.2)
    assert report.messages == ["task maskrcnn: the reference 'bn_relu' has no completed run, no differences shown"]
    md = (tmp_path / "transfer.md").read_text()
    assert "classification @ timm:efficientnet_b0: test/acc1 (higher is better)" in md
    assert float(read_csv(tmp_path / "transfer.csv")["s0"]["mean_rank"]) == pytest.approx(4 / 3)  # 1, 2 and 1
    write_run(tmp_path, "f", "classification", "b0", 0, status="failed", sweep_job=9,
              config={"task": {"model": {"arch": "timm:efficientnet_b0", "kwargs": None}}})
    write_report([tmp_path], tmp_path)
    assert "- classification @ timm:efficientnet_b0 / b0 / seed 0: failed" in (tmp_path / "transfer.md").read_text()
