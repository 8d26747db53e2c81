"""What every task hands the run pipeline.

A task's LightningModule may define ``record_extras() -> dict``: entries the pipeline adds to ``results.json``
after testing (e.g. BigGAN's FID of the untrained generator).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pytorch_lightning as pl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchedLoss:
    """How a training loss is watched for divergence (pipelines.callbacks.LossSpikeMonitor)."""
    floor: float = 0.1  # lower bound of its running level: near zero, small moves do not make large ratios
    smooth: int = 1  # judge the mean of the last this-many steps (a GAN's losses swing from step to step by design)


@dataclass
class TaskParts:
    module: pl.LightningModule
    datamodule: pl.LightningDataModule
    model: str  # architecture name, for the result record
    dataset: str
    monitor: str  # validation metric that picks the best checkpoint; test/<same name> is the headline
    mode: str  # "max" or "min"
    # submodules of ``module`` (dotted names) that ``compile=true`` compiles: the parts with static, traceable
    # compute (not e.g. detection post-processing, whose shapes depend on the data)
    compile_targets: tuple[str, ...] = ()
    # the training losses (keys of the training step's output) a spike in which is divergence, and how to watch each
    watched_losses: dict[str, WatchedLoss] = field(default_factory=lambda: {"loss": WatchedLoss()})

    def compile(self) -> list[str]:
        """torch.compile the compile targets in place (``nn.Module.compile``): their state_dict keys stay those of
        the eager model, so checkpoints, resume and ``backbone_ckpt`` work across both paths. Compilation itself
        happens lazily, at each target's first call (again when a call's shapes, dtypes or train/eval mode differ)."""
        if not self.compile_targets:
            log.warning("compile: task %s names no submodules to compile; it runs eager",
                        type(self.module).__name__)
        for name in self.compile_targets:
            self.module.get_submodule(name).compile()
        return list(self.compile_targets)
