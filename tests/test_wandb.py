"""wandb runs offline without a login, one wandb run per Hydra job, named <task>-<norm>-s<seed>, grouped by
sweep, tagged with task, layer and model; the sweep's transfer table goes to wandb too."""
import os
import subprocess
import sys

from pipelines.loggers import ONLINE_START_TIMEOUT_S, start_wandb, wandb_mode
from tests.conftest import REPO_ROOT, SMOKE_OVERRIDES


def test_wandb_mode_never_prompts(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(None) == "disabled"
    assert wandb_mode("offline") == "offline"


def test_an_online_start_that_fails_goes_offline_with_a_warning(monkeypatch, caplog):
    """Credentials but no network: wandb waited, then failed the run."""
    import wandb
    calls = []

    def init(mode, **kwargs):
        calls.append((mode, kwargs.get("settings")))
        if mode == "online":
            raise wandb.errors.CommError("context deadline exceeded")
        return "offline run"

    monkeypatch.setattr(wandb, "init", init)
    assert start_wandb("online", project="p") == "offline run"
    assert [mode for mode, _ in calls] == ["online", "offline"] and calls[0][1].init_timeout == ONLINE_START_TIMEOUT_S
    assert "wandb could not start online (CommError: context deadline exceeded); logging offline instead" in caplog.text
    calls.clear()
    assert start_wandb("disabled") == "offline run" and calls == [("disabled", None)]


def test_a_run_is_named_grouped_and_tagged(compose_cfg, monkeypatch, tmp_path):
    import wandb

    from pipelines import loggers
    started = {}

    def start(mode, **init):
        started.update(init, mode=mode)
        run = wandb.init(mode="disabled")
        run.define_metric = lambda *args, **kwargs: started.setdefault("metrics", []).append((args, kwargs))
        return run

    monkeypatch.setattr(loggers, "start_wandb", start)
    cfg = compose_cfg("logger=wandb", "logger.mode=offline", "logger.group=study", "logger.tags=[extra]", "norm=s0",
                      "seed=3")
    try:
        loggers.build_loggers(cfg, tmp_path, "preact_resnet_cifar")
    finally:
        wandb.finish()
    assert started.pop("metrics") == [(("trainer/global_step",), {}),  # the charts' x-axis: the training step
                                      (("*",), {"step_metric": "trainer/global_step", "step_sync": True})]
    assert started == {"mode": "offline", "dir": str(tmp_path), "project": "evonorm-transfer", "entity": None,
                       "name": "classification-s0-s3", "group": "study",
                       "tags": ["classification", "s0", "preact_resnet_cifar", "extra"]}


def test_multirun_writes_one_offline_wandb_run_per_job(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HOME=str(tmp_path))
    overrides = [o for o in SMOKE_OVERRIDES if not o.startswith("logger=")]
    out = subprocess.run(
        [sys.executable, "run.py", "-m", "norm=b0,gn_relu", "logger=wandb", *overrides,
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    for job, norm in enumerate(["b0", "gn_relu"]):
        job_dir = tmp_path / "sweep" / f"{job}-classification-{norm}-s0"
        assert '"status": "completed"' in (job_dir / "results.json").read_text()
        runs = list((job_dir / "wandb").glob("offline-run-*"))
        assert len(runs) == 1
        run_file = next(runs[0].glob("run-*.wandb")).read_bytes()  # protobuf records: the strings are verbatim
        for expected in (f"classification-{norm}-s0", "sweep", "classification", norm, "preact_resnet_cifar"):
            assert expected.encode() in run_file
        assert f"classification-{'gn_relu' if norm == 'b0' else 'b0'}-s0".encode() not in run_file
    report_runs = list((tmp_path / "sweep" / "wandb").glob("offline-run-*"))
    assert len(report_runs) == 1
    report_file = next(report_runs[0].glob("run-*.wandb")).read_bytes()
    assert b"transfer-report" in report_file and b"transfer/table" in report_file
