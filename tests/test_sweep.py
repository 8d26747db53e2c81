"""The transfer sweep end to end at tiny sizes: Hydra multirun over tasks x layers with per-task budgets, a failing
job, the report written by the sweep, the exit status, a second invocation that skips, the submitit launcher."""
import contextlib
import csv
import json
import os
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from pipelines.records import write_record
from pipelines.checks import RunDirConflict, run_config
from pipelines.jobs import refuse_job
from pipelines.sweep import TransferReportCallback, grid_jobs
from tasks import TASKS
from tests.conftest import CONF_DIR, REPO_ROOT

# Per-task tiny budgets, selected like the transfer demo's: conf/budget/<experiment>/<task>.yaml.
TINY_BUDGETS = {
    "classification": {"task": {"epochs": 1, "model": {"width": 8},
                                "data": {"limit_train": 512, "limit_eval": 256, "batch_size": 64}}},
    "biggan": {"task": {"epochs": 1, "model": {"g_ch": 4, "d_ch": 4, "shared_dim": 16},
                        "data": {"batch_size": 8, "steps_per_epoch": 3, "limit_train": 256, "val_size": 64,
                                 "eval_batch_size": 16},
                        "metrics": {"fid_samples": 16, "test_fid_samples": 16, "image_size": 32, "is_splits": 2,
                                    "grid_columns": 2}}},
}
TINY_BUDGETS["maskrcnn"] = {"task": {
    "steps": 2, "data": {"batch_size": 2, "eval_batch_size": 4}, "optim": {"num_drawn": 2},
    "model": {"fpn_channels": 16, "head_channels": 16, "box_fc_dim": 32, "anchor_sizes": [8, 16, 32, 64, 128],
              "train_sizes": [64], "test_size": 64, "max_size": 64, "rpn_pre_nms_top_n_train": 100,
              "rpn_post_nms_top_n_train": 50, "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20,
              "rpn_batch_size_per_image": 32, "box_batch_size_per_image": 16, "box_detections_per_img": 10}}}
QUIET = {"logger": {"name": "none"}, "trainer": {"enable_progress_bar": False, "num_sanity_val_steps": 0}}


def write_tiny_study(root, tasks, norms):
    """A test-only experiment (and a layer name the factory rejects) in a config dir on Hydra's search path."""
    for task in tasks:
        (root / "budget" / "tiny_study").mkdir(parents=True, exist_ok=True)
        (root / "budget" / "tiny_study" / f"{task}.yaml").write_text(yaml.safe_dump(TINY_BUDGETS[task]))
    (root / "experiment").mkdir()
    sweep = {"hydra": {"sweeper": {"params": {"task": ",".join(tasks), "norm": ",".join(norms)}}}}
    (root / "experiment" / "tiny_study.yaml").write_text("# @package _global_\n" + yaml.safe_dump({**QUIET, **sweep}))
    (root / "norm").mkdir()
    (root / "norm" / "not_a_layer.yaml").write_text("name: not_a_layer\nkwargs: {}\n")


def sweep(tmp_path, *overrides, env=None):
    return subprocess.run(
        [sys.executable, "run.py", "-m", "experiment=tiny_study", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
         *overrides], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env=env or {**os.environ, "WANDB_MODE": "disabled"})


def demo_budget_files():
    return sorted((REPO_ROOT / "conf" / "budget" / "transfer_demo").glob("*.yaml"))


@pytest.mark.parametrize("budget_file", demo_budget_files(), ids=lambda p: p.stem)
def test_transfer_demo_gives_each_task_its_budget(budget_file):
    budget = yaml.safe_load(budget_file.read_text())
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        demo = compose("config", overrides=["experiment=transfer_demo", f"task={budget_file.stem}"],
                       return_hydra_config=True)
        plain = compose("config", overrides=[f"task={budget_file.stem}"])
    assert set(demo.hydra.sweeper.params.task.split(",")) == set(TASKS)
    merged = OmegaConf.merge(plain, budget)
    assert OmegaConf.to_container(demo.task) == OmegaConf.to_container(merged.task)
    assert demo.task != plain.task


def test_transfer_sweep_report_failures_and_rerun(tmp_path):
    tasks, norms = ["classification", "biggan"], ["bn_relu", "s0", "not_a_layer"]
    write_tiny_study(tmp_path / "conf", tasks, norms)
    sweep_dir = tmp_path / "sweep"
    first = sweep(tmp_path, f"hydra.sweep.dir={sweep_dir}")
    assert first.returncode == 2, first.stderr[-3000:]  # the two not_a_layer jobs failed; the others ran
    records = {(r["task"], r["norm"]["name"]): r for r in
               (json.loads(p.read_text()) for p in sweep_dir.glob("*/results.json"))}
    assert len(records) == 6
    failed = records[("classification", "not_a_layer")]
    assert failed["status"] == "failed" and "unknown" in failed["error"] and "ckpt_path" not in failed["error"]
    # each task ran with its own budget while `task` was swept
    assert records[("classification", "s0")]["config"]["task"]["data"]["limit_train"] == 512
    assert records[("classification", "s0")]["steps"] == 512 // 64
    assert records[("biggan", "s0")]["config"]["task"]["data"]["steps_per_epoch"] == 3

    with open(sweep_dir / "transfer.csv") as f:
        rows = {row["layer"]: row for row in csv.DictReader(f)}
    assert list(rows) == norms
    for (task, norm), record in records.items():
        if norm == "not_a_layer":
            assert rows[norm][f"{task}.outcomes"] == "1 failed" and rows[norm][f"{task}.mean"] == ""
            continue
        metric = rows[norm][f"{task}.metric"]
        assert metric == "test/" + record["monitor"].removeprefix("val/")
        assert float(rows[norm][f"{task}.mean"]) == record["test"][metric]
        assert rows[norm][f"{task}.n"] == "1" and rows[norm][f"{task}.outcomes"] == "1 completed"
    assert (sweep_dir / "transfer.png").read_bytes()[:4] == b"\x89PNG"
    report = (sweep_dir / "transfer.md").read_text()
    assert "| not_a_layer | 1 failed |" in report
    # under the table: where each failed run is, and why
    failed_dir = next(sweep_dir.glob("*-classification-not_a_layer-s0"))
    assert "- classification / not_a_layer / seed 0: failed: ConfigError: task=classification norm=not_a_layer " \
        "cannot be built from this config: unknown" in report
    assert f"(`{failed_dir}`)" in report

    second = sweep(tmp_path, f"+resume={sweep_dir}")
    assert second.returncode == 2, second.stderr[-3000:]
    assert second.stdout.count("completed already") == 4
    for (task, norm), record in records.items():
        again = json.loads(next(sweep_dir.glob(f"*-{task}-{norm}-s0/results.json")).read_text())
        assert (again == record) == (norm != "not_a_layer")  # completed kept as is, failed ones retried


def test_resumed_sweep_with_a_dir_of_another_configuration_is_refused_before_any_job(tmp_path):
    """Every grid point is checked before the first job: a conflict refuses the whole sweep, nothing half-runs."""
    write_tiny_study(tmp_path / "conf", ["classification"], ["bn_relu", "s0"])
    sweep_dir = tmp_path / "sweep"
    stale = sweep_dir / "1-classification-s0-s0"
    stale.mkdir(parents=True)
    (stale / "results.json").write_text(json.dumps({
        "status": "failed", "task": "classification", "norm": {"name": "s0", "kwargs": {}}, "seed": 0,
        "config": {"task": {"name": "classification", "epochs": 5}, "trainer": {"num_nodes": 2}}}))
    out = sweep(tmp_path, f"+resume={sweep_dir}")
    assert out.returncode == 1, out.stderr[-3000:]
    assert "1 grid point(s) of this sweep cannot run; no job started" in out.stdout
    assert f"norm=s0 task=classification experiment=tiny_study +resume={sweep_dir}: RunDirConflict: {stale} holds " \
           "a run of another configuration (differs in task.epochs (was 5, now 1), trainer.num_nodes (was 2, now 1))" \
           in out.stdout
    assert not (sweep_dir / "0-classification-bn_relu-s0").exists()


def test_grid_points_sharing_an_output_dir_are_refused_before_any_job(tmp_path):
    write_tiny_study(tmp_path / "conf", ["classification"], ["bn_relu", "s0"])
    out = sweep(tmp_path, f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.sweep.subdir=${task.name}")
    assert out.returncode == 1, out.stderr[-3000:]
    assert f"norm=s0 task=classification experiment=tiny_study: shares its output dir {tmp_path / 'sweep'}/" \
           "classification with norm=bn_relu task=classification experiment=tiny_study; name every swept key in " \
           "hydra.sweep.subdir" in out.stdout
    assert not (tmp_path / "sweep" / "classification").exists()


@contextlib.contextmanager
def multirun_config(sweep_dir, *overrides, params=None):
    """The config of a multirun over ``params`` as its callbacks get it (the multirun's Hydra, as run.py -m has it,
    in its first job), with its grid points' ``(output dir, run config)``."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra.sweep.dir={sweep_dir}", "logger=none", *overrides],
                      return_hydra_config=True)
        cfg.hydra.mode = RunMode.MULTIRUN
        with open_dict(cfg):
            cfg.hydra.sweeper.params = params or {}
        jobs = [(output_dir, run_config(job_cfg)) for _, output_dir, job_cfg in grid_jobs(cfg)]
        cfg.hydra.runtime.output_dir = str(jobs[0][0])  # as the first job has it
        HydraConfig.instance().set_config(cfg)
        try:
            yield cfg, jobs
        finally:
            HydraConfig.instance().cfg = None  # later tests run outside any Hydra job


def write_completed(job_dir, config, status="completed", overrides=None):
    job_dir.mkdir(parents=True, exist_ok=True)
    write_record(job_dir, {"status": status, "task": config["task"]["name"], "norm": {"name": config["norm"]["name"]},
                           "seed": config["seed"], "config": config, "test": {}, "overrides": overrides})


def test_a_job_refused_at_its_start_counts_in_the_exit_status(tmp_path):
    """A run begun in a job's dir after the sweep's check refuses the job, and its record (completed, of the same
    grid point) would pass for this job's: the refusal itself is counted, once per sweep invocation."""
    sweep_dir = tmp_path / "sweep"
    callback = TransferReportCallback()
    with multirun_config(sweep_dir) as (cfg, [(job_dir, config)]):
        callback.on_multirun_start(cfg)
        write_completed(job_dir, config)  # what the other process's run left
        refuse_job(RunDirConflict("begun by another process"))
        with pytest.raises(SystemExit) as status:
            callback.on_multirun_end(cfg)
        assert status.value.code == 1
        assert (sweep_dir / "refused_jobs.txt").read_text() == f"{job_dir}\tbegun by another process\n"
        callback.on_multirun_start(cfg)  # a new invocation: nothing refused yet, and the grid point completed
        callback.on_multirun_end(cfg)


def test_exit_status_counts_this_sweeps_grid_points_only(tmp_path):
    """Runs of other invocations in the sweep dir (another seed, a failed layer) are in the report, not the status;
    a grid point that differs from a newer record only in a key the table does not show still counts."""
    sweep_dir = tmp_path / "sweep"
    callback = TransferReportCallback()
    with multirun_config(sweep_dir, "seed=0", params={"norm": "bn_relu,s0"}) as (cfg, jobs):
        for job_dir, config in jobs:  # an earlier invocation: seed 0, both completed
            write_completed(job_dir, config)
    with multirun_config(sweep_dir, "seed=1", params={"norm": "bn_relu,s0,gn_relu"}) as (cfg, jobs):
        callback.on_multirun_start(cfg)
        for job_dir, config in jobs:
            write_completed(job_dir, config)
        callback.on_multirun_end(cfg)  # seed 1 complete: status 0 although seed 0 has no gn_relu run
        write_completed(jobs[1][0], jobs[1][1], status="failed")
        with pytest.raises(SystemExit) as status:
            callback.on_multirun_end(cfg)
        assert status.value.code == 1
    lr = {"task.optim.lr": "0.1,0.2"}
    with multirun_config(sweep_dir / "lr", params={"norm": "s0", **lr}) as (cfg, [first, second]):
        callback.on_multirun_start(cfg)
        write_completed(*first, status="failed")
        write_completed(*second)  # newer, same task, layer and seed: the table shows it
        with pytest.raises(SystemExit) as status:
            callback.on_multirun_end(cfg)
        assert status.value.code == 1
    assert "1 record(s) left out for a newer one of the same task, architecture, layer and seed that ran another configuration: " \
           f"`{first[0]}` for `{second[0]}` (differs in task.optim.lr (was 0.1, now 0.2))" in \
           (sweep_dir / "lr" / "transfer.md").read_text()


def test_a_report_that_cannot_be_written_makes_the_exit_status_nonzero(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("pipelines.report.write_report", broken)
    callback = TransferReportCallback()
    with multirun_config(tmp_path / "sweep") as (cfg, [(job_dir, config)]):
        callback.on_multirun_start(cfg)
        write_completed(job_dir, config)
        with pytest.raises(SystemExit) as status:
            callback.on_multirun_end(cfg)
    assert status.value.code == 1
    assert f"could not be written; once the cause is fixed, write it with python -m pipelines.report " \
           f"{tmp_path / 'sweep'}" in caplog.text and "disk full" in caplog.text


def test_resuming_a_dir_without_a_sweep_run_is_refused(tmp_path, caplog):
    """+resume=<a mistyped or new dir> started a fresh sweep there without a word."""
    with multirun_config(tmp_path / "nothing", f"+resume={tmp_path / 'nothing'}") as (cfg, _):
        with pytest.raises(SystemExit) as status:
            TransferReportCallback().on_multirun_start(cfg)
    assert status.value.code == 1 and "no sweep run there to go on with" in caplog.text


def test_a_grid_point_completed_under_another_job_number_is_refused_before_any_job(tmp_path):
    """A value added in the middle of a grid renumbers the jobs after it: their completed runs are in other dirs."""
    sweep_dir = tmp_path / "sweep"
    with multirun_config(sweep_dir, params={"norm": "bn_relu,s0"}) as (cfg, [(_, bn_relu), (s0_dir, s0)]):
        write_completed(sweep_dir / "0-classification-s0-s0", s0)  # the grid of an earlier invocation: s0 first
        with pytest.raises(SystemExit) as status:
            TransferReportCallback().on_multirun_start(cfg)
    assert status.value.code == 1 and not s0_dir.exists()


def test_grid_points_alike_in_config_but_not_in_overrides_are_told_apart(tmp_path):
    """compile=true,false leaves the run config as it is: only the recorded overrides tell the two grid points apart
    (a re-run with the second job's dir missing was refused as 'completed already' in the first's)."""
    sweep_dir = tmp_path / "sweep"
    params = {"compile": "true,false"}
    with multirun_config(sweep_dir, params=params) as (cfg, [(first_dir, config), (second_dir, _)]):
        first_overrides = next(grid_jobs(cfg))[0]
        write_completed(first_dir, config, overrides=first_overrides)
        TransferReportCallback().on_multirun_start(cfg)  # not refused: job 1 has not run
    with multirun_config(sweep_dir, "+resume=" + str(sweep_dir), params={"compile": "false,true"}) as (cfg, _):
        with pytest.raises(SystemExit):  # the same grid points in another order: job 1 ran under job 0's number
            TransferReportCallback().on_multirun_start(cfg)


def test_submitit_local_launcher_runs_one_process_per_job(tmp_path):
    write_tiny_study(tmp_path / "conf", ["classification"], ["bn_relu", "gn_relu"])
    out = sweep(tmp_path, f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra/launcher=submitit_local")
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/results.json")]
    assert sorted(r["norm"]["name"] for r in records if r["status"] == "completed") == ["bn_relu", "gn_relu"]
    assert len({r["pid"] for r in records}) == 2  # each job in its own process
    assert "| gn_relu |" in (tmp_path / "sweep" / "transfer.md").read_text()


def test_ddp_sweep_runs_each_job_once_and_measures_over_all_ranks(tmp_path):
    """Lightning re-launches DDP ranks with the command line: in a sweep, each rank must run its job, not the sweep.
    Every job launches its ranks afresh (the first job used to leave LOCAL_RANK behind, and the second then waited
    forever for ranks it believed started externally); one record and one wandb run per job; the metrics cover the
    samples of both ranks."""
    tasks = ["classification", "biggan", "maskrcnn"]
    write_tiny_study(tmp_path / "conf", tasks, ["b0"])  # every parameter must get a gradient (FPN: no activation)
    # odd image counts: the distributed sampler repeats an image on one rank, COCOeval must count it once
    budget = tmp_path / "conf" / "budget" / "tiny_study" / "maskrcnn.yaml"
    maskrcnn_budget = yaml.safe_load(budget.read_text())
    maskrcnn_budget["task"]["data"].update(val_size=3, test_size=5)
    budget.write_text(yaml.safe_dump(maskrcnn_budget))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HOME=str(tmp_path))
    sweep_dir = tmp_path / "sweep"
    out = sweep(tmp_path, f"hydra.sweep.dir={sweep_dir}", "trainer=ddp", "trainer.accelerator=cpu",
                "trainer.devices=2", "trainer.precision=32-true", "trainer.benchmark=false", "logger.name=wandb",
                env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    job_dirs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name not in (".hydra", "wandb"))
    assert job_dirs == [f"{n}-{task}-b0-s0" for n, task in enumerate(tasks)]
    records = {}
    for job_dir, task in zip(job_dirs, tasks):
        records[task] = json.loads((sweep_dir / job_dir / "results.json").read_text())
        assert records[task]["status"] == "completed"
        assert len(list((sweep_dir / job_dir / "wandb").glob("offline-run-*"))) == 1
    assert {r["pid"] for r in records.values()} == {records["classification"]["pid"]}  # the sweep process wrote
    assert records["classification"]["steps"] == 512 // (64 * 2)
    assert {"test/fid_ema", "test/is_ema"} <= set(records["biggan"]["test"])
    assert records["biggan"]["g_steps"] == 3  # steps_per_epoch G steps on every rank, not a share of them
    assert {"test/segm_AP", "test/bbox_AP"} <= set(records["maskrcnn"]["test"])
    coco_eval = records["maskrcnn"]["coco_eval"]
    assert (coco_eval["val"]["images"], coco_eval["test"]["images"]) == (3, 5)
