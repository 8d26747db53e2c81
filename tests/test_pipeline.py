"""The run pipeline end to end on tiny real data: every layer trains, records are written, failures and resume."""
import copy
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import pipelines.run
from evonorm import NORM_ACT_NAMES
import evonorm
from pipelines.callbacks import FiniteLossCheck
from pipelines.records import write_record
from pipelines.checks import TOP_LEVEL_KEYS, ConfigError, RunDirConflict, check_config, newest_checkpoint, run_config
from pipelines.run import describe_error, nan_loss_remedies, run
from tests.conftest import CONF_DIR, REPO_ROOT, SMOKE_OVERRIDES

RECORD_KEYS = {"status", "task", "norm", "model", "dataset", "seed", "test", "best_val", "steps", "epochs",
               "wall_time_s", "params", "git_commit", "error"}


def read_record(path):
    return json.loads((path / "results.json").read_text())


def compose_task(*overrides):
    """The config of `python run.py <overrides>` (any task; compose_cfg's tiny settings are classification's)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def has_key(cfg, key: str) -> bool:
    return OmegaConf.select(cfg, key, default=KeyError) is not KeyError


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
    # the model trained holds the chosen layer: its state names, and none of another layer's (BN's running_mean, the
    # EvoNorms' v, FRN's tau, ...)
    state = {k.rsplit(".", 1)[-1] for k in torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)[
        "state_dict"]}
    chosen = set(evonorm.norm_act(norm, 8).state_dict())
    others = set().union(*(evonorm.norm_act(n, 8).state_dict() for n in evonorm.NORM_ACT_NAMES)) - chosen
    assert chosen <= state and not others & state


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
    """A run killed with SIGKILL leaves its last heartbeat's record (`running`, how far it got, a pid that is gone):
    a re-run resumes it from last.ckpt."""
    cfg = compose_cfg("norm=b0", "task.epochs=2", "heartbeat_s=0")
    crash_at_step(monkeypatch, 12)  # mid epoch 2, after last.ckpt of epoch 1 (step 8)
    written = []
    write = pipelines.run.write_record
    monkeypatch.setattr(pipelines.run, "write_record", lambda d, record: (
        written.append(json.loads(json.dumps(record, default=str))), write(d, record)))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg)
    crashed = read_record(tmp_path)
    assert crashed["status"] == "failed" and f"resume with the same overrides and +resume={tmp_path}" in \
        crashed["error"]
    assert crashed["heartbeat"] > crashed["started_at"]
    # what SIGKILL would have left: no crash checkpoint, the last heartbeat's record (before the one of the crash
    # checkpoint's save), of a process that is gone
    assert (written[-2]["status"], written[-2]["steps"]) == ("running", 12)
    killed = written[-3]
    assert (killed["status"], killed["steps"], killed["epochs"]) == ("running", 11, 1)
    (tmp_path / "checkpoints" / "on_exception.ckpt").unlink()
    gone = subprocess.Popen(["true"])
    gone.wait()
    write_record(tmp_path, {**killed, "pid": gone.pid})
    monkeypatch.undo()
    resumed = run(cfg)
    assert resumed["status"] == "completed" and resumed["steps"] == 16
    assert resumed["resumed_from"] == str(tmp_path / "checkpoints" / "last.ckpt")
    assert [(a["status"], a["steps"]) for a in resumed["previous_attempts"]] == [("dead", 11)]
    assert run(cfg) == resumed  # completed: skipped, the record stays as it is


def test_keys_new_since_a_record_are_taken_real_differences_refused(compose_cfg, tmp_path, caplog):
    """A key added to the project (trainer.num_nodes) must not make older runs impossible to resume."""
    cfg = compose_cfg()
    old = copy.deepcopy(run_config(cfg))
    del old["trainer"]["num_nodes"]
    done = {"status": "completed", "task": "classification", "norm": {"name": "b0", "kwargs": {}},
            "test": {"test/acc1": 0.5}, "config": old}
    write_record(tmp_path, done)
    with caplog.at_level(logging.INFO, logger="pipelines.run"):
        assert run(cfg) == done  # completed: skipped
    assert "taken at their current values: trainer.num_nodes=1" in caplog.text
    old.update(seed=1)
    old["norm"]["name"], old["task"]["epochs"], old["task"]["optim"]["lr"] = "s0", 3, 0.5
    write_record(tmp_path, {**done, "config": old})
    with pytest.raises(RunDirConflict, match=re.escape(
            "differs in norm.name (was 's0', now 'b0'), seed (was 1, now 0), task.epochs (was 3, now 1), and 1 more")):
        run(cfg)


def test_checkpoints_beside_an_unreadable_record_are_not_trained_over(compose_cfg, tmp_path, caplog):
    (tmp_path / "checkpoints").mkdir()
    torch.save({}, tmp_path / "checkpoints" / "last.ckpt")
    (tmp_path / "results.json").write_text('{"status": "runn')
    with pytest.raises(RunDirConflict, match="no readable results.json.* resume with ckpt_path=.*last.ckpt"):
        run(compose_cfg())
    assert f"{tmp_path / 'results.json'} cannot be read" in caplog.text
    assert (tmp_path / "results.json").read_text() == '{"status": "runn'


@pytest.mark.parametrize("overrides, key, message", [
    (["+data.root=/nonexistent"], "task.data.root", "did you mean task.data.root=/nonexistent (without '+')"),
    (["+sed=1"], "seed", "did you mean seed=1"),
    (["task.epochs=0"], "task.epochs", "task.epochs=0 leaves nothing to train"),
    (["task=biggan", "task.epochs=-1"], "task.epochs", "task.epochs=-1 leaves nothing to train"),
    (["task=maskrcnn", "task.steps=-5"], "task.steps", "task.steps=-5 leaves nothing to train"),
    (["trainer.max_epochs=0"], "trainer.max_epochs", "trainer.max_epochs=0 leaves nothing to train"),
    (["test_ckpt=final"], "test_ckpt", "test_ckpt must be 'best' or 'last'"),
    # keys that nothing takes: some builders ignored them (the first two), others failed with a bare TypeError
    (["task=maskrcnn", "+task.model.fpn_chanels=32"], "task.model.fpn_channels",
     "task.model.fpn_chanels: did you mean task.model.fpn_channels=32?"),
    (["task=biggan", "+task.metrics.grid_column=4"], "task.metrics.grid_columns",
     "task.metrics.grid_column: did you mean task.metrics.grid_columns=4?"),
    (["+task.data.rooot=/x"], "task.data.root", "task.data.rooot: did you mean task.data.root=/x?"),
    (["+norm.kwargs.epss=0.001"], "norm.kwargs.eps", "norm.kwargs.epss: did you mean norm.kwargs.eps=0.001?"),
    (["+trainer.max_step=3"], "trainer.max_epochs", "trainer.max_step: did you mean trainer.max_steps=3?"),
    (["+trainer.logger=false"], "logger", "trainer.logger: the pipeline sets it"),
], ids=["+data.root", "+sed", "epochs=0", "biggan-epochs=-1", "maskrcnn-steps=-5", "max_epochs=0", "test_ckpt",
        "+fpn_chanels", "+grid_column", "+rooot", "+epss", "+max_step", "+trainer.logger"])
def test_config_mistakes_are_refused_before_anything_starts(overrides, key, message, tmp_path):
    with pytest.raises(ValueError, match=re.escape(message)):
        run(compose_task(*overrides, f"output_dir={tmp_path}"))
    assert has_key(compose_task(*[o for o in overrides if o.startswith("task=")]), key)  # an override that works
    assert not (tmp_path / "results.json").exists()


def test_arguments_a_task_passes_through_and_lightnings_trainer_takes_are_known(tmp_path):
    for overrides in (["task=maskrcnn", "+task.model.rpn_nms_thresh=0.6", "+task.model.image_mean=[0.5,0.5,0.5]"],
                      ["+trainer.limit_train_batches=0.5"], ["experiment=maskrcnn_r50_fpn_coco"],
                      ["experiment=biggan128_imagenet"], ["norm=frn_tlu", "norm.kwargs={}"],
                      ["task=maskrcnn", "task.data.generate=null"]):
        check_config(compose_task(*overrides, f"output_dir={tmp_path}"))


def test_top_level_keys_are_those_of_the_config(compose_cfg):
    for overrides in ([], ["experiment=transfer_demo", "task=maskrcnn"], ["experiment=maskrcnn_r50_fpn_coco"]):
        assert set(compose_task(*overrides, "+resume=x")) == set(TOP_LEVEL_KEYS)


def test_a_live_run_or_another_configuration_is_not_overwritten(compose_cfg, tmp_path):
    write_record(tmp_path, {"status": "running", "task": "classification", "pid": os.getppid(),
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


@pytest.mark.parametrize("task, automatic_optimization, named", [
    ("classification", True, ["task.optim.lr", "task.optim.warmup_epochs", "task.optim.clip_grad_norm=0.5, now 1.0"]),
    ("biggan", False, ["task.optim.g_lr", "task.optim.d_lr"]),  # manual optimization: Lightning cannot clip
    ("maskrcnn", True, ["task.optim.lr", "task.optim.warmup_steps", "task.optim.clip_grad_norm=5.0, now 10.0"]),
])
def test_nan_loss_remedies_fit_the_task(task, automatic_optimization, named):
    cfg = compose_task(f"task={task}", "trainer=gpu")
    remedies = nan_loss_remedies(cfg, automatic_optimization)
    for key in named + ["trainer.precision=32-true"]:
        assert key in remedies
    assert "gradient_clip_val" not in remedies  # each task clips in its own key
    for key in re.findall(r"\b(?:task|trainer)\.[\w.]*\w", remedies):
        assert has_key(cfg, key), key


def test_checkpoint_of_another_task_or_layer_is_refused_by_name(compose_cfg, tmp_path):
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}}, other / "checkpoints" / "last.ckpt")
    write_record(other, {"status": "completed", "task": "maskrcnn", "norm": {"name": "s0", "kwargs": {}}})
    with pytest.raises(ValueError, match=f"belongs to a run of task=maskrcnn norm=s0 \\({other}\\)"):
        run(compose_cfg(f"ckpt_path={other / 'checkpoints' / 'last.ckpt'}", output_dir=tmp_path / "run"))
    error = read_record(tmp_path / "run")["error"]
    assert "not task=classification norm=b0" in error and len(error) < 400


def test_truncated_checkpoint_is_named_with_the_way_on(compose_cfg, tmp_path):
    cfg = compose_cfg()
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    best = ckpt_dir / "best-0-8.ckpt"
    torch.save({"weights": torch.zeros(1000)}, best)
    os.utime(best, (1, 1))
    (ckpt_dir / "last.ckpt").write_bytes(best.read_bytes()[:1000])  # killed while saving
    write_record(tmp_path, {"status": "failed", "task": "classification", "norm": {"name": "b0", "kwargs": {}},
                            "config": run_config(cfg)})
    with pytest.raises(ValueError, match=f"checkpoint {ckpt_dir / 'last.ckpt'} cannot be read .*Delete it .* "
                                         f"or pass ckpt_path={best}"):
        run(cfg)
    (ckpt_dir / "last.ckpt").unlink()
    assert newest_checkpoint(tmp_path) == best


def test_what_a_killed_run_leaves_says_its_headline_and_its_last_checkpoints_step(compose_cfg, tmp_path,
                                                                                   monkeypatch):
    """Between heartbeats (30 s by default) a SIGKILL left 'running, step 0' without the task's headline metric,
    though epoch checkpoints were on disk."""
    crash_at_step(monkeypatch, 12)
    written = []
    write = pipelines.run.write_record
    monkeypatch.setattr(pipelines.run, "write_record", lambda d, record: (
        written.append(json.loads(json.dumps(record, default=str))), write(d, record)))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(compose_cfg("norm=b0", "task.epochs=2", "heartbeat_s=3600"))
    running = [r for r in written if r["status"] == "running"]
    assert running[1]["monitor"] == "val/acc1" and running[1]["steps"] == 0  # as soon as the task is built
    assert [r["steps"] for r in running][2:] in ([8, 12], [8, 8, 12])  # epoch 1's checkpoints, the crash's


def test_resume_names_a_run_or_a_sweep_with_minus_m(compose_cfg, tmp_path):
    with pytest.raises(ValueError, match=f"\\+resume={tmp_path}: no run recorded there to go on with; to start a "
                                         f"run in that dir, give hydra.run.dir={tmp_path} instead"):
        run(compose_cfg(f"+resume={tmp_path}"))
    (tmp_path / "multirun.yaml").write_text("{}")
    with pytest.raises(ValueError, match="is a sweep dir: re-run the sweep with -m and its grid"):
        run(compose_cfg(f"+resume={tmp_path}"))
    assert not (tmp_path / "results.json").exists()


def test_a_checkpoint_with_the_unused_v_of_older_layers_is_refused_for_training_only(tmp_path):
    from pipelines.run import check_checkpoint_fits
    module = torch.nn.Sequential(evonorm.norm_act("b0", 4, apply_act=False))
    older = {**module.state_dict(), "0.v": torch.ones(4)}  # what such a layer held before commit 31f16b9
    torch.save({"state_dict": older, "optimizer_states": [{"state": {}, "param_groups": []}]}, tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match=r"holds the unused v of 1 EvoNorm layer\(s\) without activation \(e.g. "
                                         r"0.v\), which this code no longer has: its optimizer state does not fit"):
        check_checkpoint_fits(torch.load(tmp_path / "a.ckpt", weights_only=False), tmp_path / "a.ckpt", module)
    torch.save({"state_dict": older}, tmp_path / "weights.ckpt")  # weights only: they load
    check_checkpoint_fits(torch.load(tmp_path / "weights.ckpt", weights_only=False), tmp_path / "weights.ckpt", module)
    module.load_state_dict(older)


def test_a_checkpoint_dir_for_ckpt_path_says_what_to_give(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match=f"ckpt_path={tmp_path} is a dir; give a checkpoint file .*"
                                          "or \\+resume=<run dir>"):
        run(compose_cfg(f"ckpt_path={tmp_path}", output_dir=tmp_path / "run"))


def test_interrupted_sweep_job_says_how_to_resume_the_sweep(tmp_path):
    saved = tmp_path / "0-classification-b0-s0" / "checkpoints" / "on_exception.ckpt"
    assert f"+resume={saved.parent.parent} (or ckpt_path={saved})" in describe_error(KeyboardInterrupt(), saved)
    in_sweep = describe_error(KeyboardInterrupt(), saved, sweep_dir=tmp_path)
    assert in_sweep.startswith("interrupted") and f"re-running the sweep with +resume={tmp_path}" in in_sweep
    assert "ckpt_path" not in in_sweep


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


def test_csv_logger_writes_metrics_and_a_resumed_attempt_keeps_the_earlier_ones(compose_cfg, tmp_path):
    run(compose_cfg("logger=csv", "trainer.log_every_n_steps=1"))
    first = tmp_path / "csv" / "version_0" / "metrics.csv"
    metrics = first.read_text()
    assert "train/loss" in metrics and "val/acc1" in metrics
    write_record(tmp_path, {**read_record(tmp_path), "status": "failed"})  # resumed from last.ckpt: tested again
    run(compose_cfg("logger=csv", "trainer.log_every_n_steps=1"))
    assert first.read_text() == metrics and "test/acc1" in (tmp_path / "csv" / "version_1" / "metrics.csv").read_text()


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


def test_pipelines_import_no_circle():
    """run, sweep (and the search) share a base (records, checks, jobs, loggers) that imports none of them: no module
    of pipelines/ reaches itself through imports, function-level ones included."""
    import ast
    modules = {p.stem: p for p in (REPO_ROOT / "pipelines").glob("*.py") if p.stem != "__init__"}
    imports = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipelines"):
                found.add(node.module.split(".")[1] if "." in node.module else None)
                found.update(a.name for a in node.names if node.module == "pipelines")
            elif isinstance(node, ast.Import):
                found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("pipelines."))
        imports[name] = found & set(modules)

    def reaches(start, target, seen=()):
        return any(m == target or (m not in seen and reaches(m, target, (*seen, m))) for m in imports[start])

    assert imports["run"] and imports["sweep"]  # the walk sees imports at all
    assert [m for m in modules if reaches(m, m)] == []


@pytest.mark.parametrize("overrides, message", [
    (["task.epochs=0"], "ConfigError: task.epochs=0 leaves nothing to train"),
    (["task.data.root={tmp}/nowhere"], "DatasetError: Fashion-MNIST not found"),
    (["norm.kwargs.momentum=2"], "ConfigError: task=classification norm=b0 cannot be built from this config: "
                                 "momentum must be a number in [0, 1], got 2"),
], ids=["config-value", "missing-dataset", "layer-option"])
def test_a_refused_run_shows_its_message_without_a_traceback(overrides, message, tmp_path):
    """An expected refusal prints its message alone (exit status 1); HYDRA_FULL_ERROR=1 brings the traceback back."""
    command = [sys.executable, "run.py", "logger=none", f"hydra.run.dir={tmp_path / 'run'}",
               *(o.format(tmp=tmp_path) for o in overrides)]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    quiet = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 1 and message in quiet.stdout + quiet.stderr
    assert "Traceback" not in quiet.stdout + quiet.stderr
    if overrides == ["task.epochs=0"]:
        full = subprocess.run(command, cwd=REPO_ROOT, env={**env, "HYDRA_FULL_ERROR": "1"}, capture_output=True,
                              text=True, timeout=300)
        assert full.returncode != 0 and "Traceback" in full.stderr and message.split(": ", 1)[1] in full.stderr
