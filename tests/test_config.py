"""Config composition: every group option composes, the CLI lists groups and rejects unknown options."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from evonorm import NORM_ACT_LAYERS, norm_act_factory
from tests.conftest import CONF_DIR, REPO_ROOT


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def test_every_layer_name_has_a_norm_config():
    assert options("norm") == sorted(NORM_ACT_LAYERS)


@pytest.mark.parametrize("group", ["task", "norm", "trainer", "logger", "experiment"])
def test_every_option_composes(group, tmp_path):
    for option in options(group):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[f"{group}={option}", f"output_dir={tmp_path}"])
        assert cfg.task.name and cfg.norm.name and cfg.logger.name
        assert cfg.trainer.max_epochs == cfg.task.epochs
        if group == "norm":
            assert cfg.norm.name == option
            kwargs = dict(cfg.norm.kwargs)
            if option == "graph":  # its formula is the one value the file leaves to the command line
                assert kwargs["graph"] is None
                kwargs["graph"] = "x * sigmoid(v1 * x) / std_hwg(x)"
            norm_act_factory(cfg.norm.name, **kwargs)(24)  # the kwargs are valid for the layer


def test_experiment_states_deltas_only(tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        base = compose("config", overrides=[f"output_dir={tmp_path}"])
        exp = compose("config", overrides=["experiment=imagenet_r50", f"output_dir={tmp_path}"])
    assert exp.task.model.arch == "preact_resnet50" and exp.task.data.name == "imagefolder"
    assert exp.trainer.strategy == "ddp"
    assert exp.task.optim.momentum == base.task.optim.momentum  # untouched keys come from the task file


def test_readme_names_only_existing_keys(tmp_path):
    """Every config key the README names (``task.data.root``, ``trainer.num_nodes``, ...) exists in some task's
    composed config, so a command copied from it does not fail with "Key ... is not in struct"."""
    readme = (REPO_ROOT / "README.md").read_text()
    keys = set(re.findall(r"(?<![\w.+/-])((?:task|trainer|report|norm)\.[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?![\w(/])",
                          readme))
    assert len(keys) > 20  # the pattern still finds them
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfgs = [compose("config", overrides=[f"task={task}", f"output_dir={tmp_path}"]) for task in options("task")]
        cfgs.append(compose("config", overrides=["norm=graph", f"output_dir={tmp_path}"]))  # norm.kwargs.graph
    absent = object()
    assert [k for k in sorted(keys) if all(OmegaConf.select(c, k, default=absent) is absent for c in cfgs)] == []


def run_cli(*args):
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_help_lists_groups():
    out = run_cli("--help")
    assert out.returncode == 0
    for line in ("norm: b0, b1, b2, bn_relu", "task: biggan, classification", "logger: csv, none, wandb"):
        assert line in out.stdout


def test_cli_unknown_norm_lists_choices():
    out = run_cli("norm=b9")
    assert out.returncode != 0
    assert "Could not find 'norm/b9'" in out.stderr
    assert "s0" in out.stderr and "bn_relu" in out.stderr
