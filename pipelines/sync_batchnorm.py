"""Lightning Trainer arguments from the trainer config: a SyncBN that keeps BN-ReLU layers whole, and DDP that
finds the parameters a backward pass leaves out when the task optimizes manually (a GAN's G and D steps)."""
from __future__ import annotations

import logging

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm

from evonorm.baselines import convert_sync_batchnorm, revert_sync_batchnorm

log = logging.getLogger(__name__)


class NormActSyncBatchNorm(TorchSyncBatchNorm):
    """``trainer.sync_batchnorm=true``: Lightning's plugin would drop the activation of every BatchNormAct2d."""

    def apply(self, model):
        return convert_sync_batchnorm(model)

    def revert(self, model):
        return super().revert(revert_sync_batchnorm(model))


def may_run_processes(kwargs: dict) -> bool:
    """Whether the Trainer may start several processes (for ``strategy=auto`` Lightning then picks DDP)."""
    devices = kwargs.get("devices", "auto")
    one_device = devices in (1, "1") or isinstance(devices, list) and len(devices) == 1
    return not one_device or kwargs.get("num_nodes", 1) > 1


def trainer_arguments(trainer_cfg: DictConfig, module: pl.LightningModule | None = None) -> dict:
    kwargs = OmegaConf.to_container(trainer_cfg, resolve=True)
    strategy = kwargs.get("strategy", "auto")
    if (strategy == "ddp" or strategy == "auto" and may_run_processes(kwargs)) and module is not None \
            and not module.automatic_optimization:
        # each manual backward (a GAN's D step, then its G step) reaches part of the parameters: DDP must find the rest
        log.info("manual optimization under DDP: strategy=ddp_find_unused_parameters_true")
        kwargs["strategy"] = "ddp_find_unused_parameters_true"
    if kwargs.pop("sync_batchnorm", False):
        kwargs["plugins"] = [*kwargs.get("plugins", []), NormActSyncBatchNorm()]
    return kwargs
