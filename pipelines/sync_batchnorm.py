"""Lightning Trainer arguments from the trainer config, with a SyncBN that keeps BN-ReLU layers whole."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm

from evonorm.baselines import convert_sync_batchnorm, revert_sync_batchnorm


class NormActSyncBatchNorm(TorchSyncBatchNorm):
    """``trainer.sync_batchnorm=true``: Lightning's plugin would drop the activation of every BatchNormAct2d."""

    def apply(self, model):
        return convert_sync_batchnorm(model)

    def revert(self, model):
        return super().revert(revert_sync_batchnorm(model))


def trainer_arguments(trainer_cfg: DictConfig) -> dict:
    kwargs = OmegaConf.to_container(trainer_cfg, resolve=True)
    if kwargs.pop("sync_batchnorm", False):
        kwargs["plugins"] = [*kwargs.get("plugins", []), NormActSyncBatchNorm()]
    return kwargs
