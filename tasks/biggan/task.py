"""Builds the biggan task's parts from its config (the registry entry; imports the training stack)."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from tasks.base import TaskParts, WatchedLoss
from tasks.common.checks import require_positive

from .data import GanData
from .features import build_feature_net
from .models import Discriminator, Generator
from .module import BigGanModule


def build(cfg: DictConfig, norm_act) -> TaskParts:
    model, optim, metrics = cfg.model, cfg.optim, cfg.metrics
    require_positive("task.optim", d_steps=optim.d_steps, accumulate=optim.accumulate)
    require_positive("task.metrics", fid_samples=metrics.fid_samples, test_fid_samples=metrics.test_fid_samples,
                     grid_columns=metrics.grid_columns, grid_classes=metrics.grid_classes)
    data = GanData(**OmegaConf.to_container(cfg.data, resolve=True), resolution=model.resolution,
                   z_dim=model.z_dim, draws_per_step=optim.d_steps * optim.accumulate,
                   fid_samples=metrics.fid_samples, test_fid_samples=metrics.test_fid_samples)
    generator = Generator(norm_act, data.num_classes, model.resolution, model.g_ch, model.z_dim, model.shared_dim,
                          model.g_attention, model.g_mults, shared_init_norm=model.shared_init_norm)
    discriminator = Discriminator(data.num_classes, model.resolution, model.d_ch, model.d_attention, model.d_mults)
    feature_net = build_feature_net(metrics.inception_weights, metrics.image_size)
    module = BigGanModule(generator, discriminator, feature_net, data.num_classes, model.z_dim,
                          batch_size=cfg.data.batch_size, is_splits=metrics.is_splits,
                          grid_columns=metrics.grid_columns, grid_classes=metrics.grid_classes,
                          grid_batch_size=cfg.data.eval_batch_size, **OmegaConf.to_container(optim, resolve=True))
    # compile=true: the Gs. Not D: called on the real and the fake batch before one backward, its spectral norms
    # fail compiled ("modified by an inplace operation" on the power-iteration vector; eager clones it)
    # divergence: either hinge loss, as a mean over 10 steps (D and G take turns winning: single steps swing several
    # times the level in a smooth run), far above its recent level. Floors: D's loss is 2 at chance (D outputs 0 on
    # every image), so a D that loses its edge for a while and returns to chance is no blow-up; G's floor is the
    # hinge margin 1, as its loss crosses 0 while training goes well
    watched = {"loss_d": WatchedLoss(floor=2.0, smooth=10), "loss_g": WatchedLoss(floor=1.0, smooth=10)}
    return TaskParts(module, data, model=f"biggan{model.resolution}", dataset=cfg.data.name, monitor="val/fid_ema",
                     mode="min", compile_targets=("generator", "generator_ema"),
                     watched_losses=watched)
