import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")  # tests never talk to wandb unless a test asks for it
os.environ.setdefault("WANDB_SILENT", "true")

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = str(REPO_ROOT / "conf")

# Tiny but real: a few hundred Fashion-MNIST images, width-8 network, one epoch.
SMOKE_OVERRIDES = [
    "logger=none", "trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0", "task.epochs=1",
    "task.model.width=8", "task.data.limit_train=512", "task.data.limit_eval=256", "task.data.batch_size=64",
]


@pytest.fixture
def compose_cfg(tmp_path):
    """Compose conf/config.yaml like `python run.py` would, with the run's output in tmp_path."""
    from hydra import compose, initialize_config_dir

    def compose_with(*overrides: str, output_dir: Path = tmp_path):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("config", overrides=[*SMOKE_OVERRIDES, f"output_dir={output_dir}", *overrides])

    return compose_with


@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """The matplotlib figures the code under test saves, kept open to inspect (nothing is written)."""
    figures = []
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", lambda fig, *a, **k: figures.append(fig))
    return figures
