"""LightningModule for class-conditional BigGAN: hinge loss, manual optimization of G and D, EMA of G, FID / IS.

One training step = ``d_steps`` D steps (each on its own real batch) + one G step, each step over ``accumulate``
sub-batches. The EMA G averages the parameters with decay min(ema_decay, (1 + s) / (10 + s)) after G step s (the
warm-up) and copies the buffers (running variances, spectral-norm vectors). Evaluation samples fixed latents from
the EMA G and the raw G in eval mode and measures FID / IS against held-out real images whose features are
computed once per run; the test stage also measures the untrained generator (its initial weights, kept for this).
"""
from __future__ import annotations

import copy
import logging
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import make_grid

from tasks.common.images import save_and_log_image

from .metrics import fid_is

log = logging.getLogger(__name__)
GENERATORS = ("ema", "raw")


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] -> [0, 1]."""
    return ((images + 1) / 2).clamp(0, 1)


def hinge_d_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return F.relu(1 - d_real).mean(), F.relu(1 + d_fake).mean()


def hinge_g_loss(d_fake: torch.Tensor) -> torch.Tensor:
    return -d_fake.mean()


def ortho_penalty(model: nn.Module, skip: tuple[str, ...]) -> torch.Tensor:
    """BigGAN's orthogonal regularisation sum ||W W^T * (1 - I)||_F^2 / 2 over weight matrices (same gradient)."""
    total = 0.0
    for name, p in model.named_parameters():
        if p.ndim < 2 or not p.requires_grad or name.startswith(skip):
            continue
        w = p.flatten(1)
        gram = w @ w.t()
        total = total + (gram * (1 - torch.eye(len(w), device=w.device))).square().sum() / 2
    return total


def grid_row_classes(num_classes: int, grid_classes: int) -> torch.Tensor:
    """The classes of the sample grid's rows: ``grid_classes`` of them (at most all), evenly spaced over the labels,
    so a 1000-class grid stays a few rows and still spans the dataset."""
    rows = min(num_classes, grid_classes)
    return torch.arange(rows) * num_classes // rows


class BigGanModule(pl.LightningModule):
    def __init__(self, generator: nn.Module, discriminator: nn.Module, feature_net: nn.Module, num_classes: int,
                 z_dim: int, g_lr: float = 2e-4, d_lr: float = 4e-4, betas: tuple = (0.0, 0.999),
                 adam_eps: float = 1e-6, d_steps: int = 1, accumulate: int = 1, batch_size: int = 64,
                 ema_decay: float = 0.999, ortho_reg: float = 0.0, is_splits: int = 10, grid_columns: int = 10,
                 grid_classes: int = 10, grid_batch_size: int = 100, grid_seed: int = 99):
        super().__init__()
        self.save_hyperparameters(ignore=["generator", "discriminator", "feature_net"])
        self.automatic_optimization = False
        self.generator, self.discriminator = generator, discriminator
        self.generator_ema = copy.deepcopy(generator).requires_grad_(False)
        self.register_buffer("g_steps", torch.zeros((), dtype=torch.long))
        # Not submodules: the measuring network and the untrained G stay out of the parameter count and the
        # optimizer; the untrained G's weights travel in the checkpoint through on_save_checkpoint.
        object.__setattr__(self, "feature_net", feature_net)
        object.__setattr__(self, "untrained_generator", copy.deepcopy(generator).requires_grad_(False))
        rows = grid_row_classes(num_classes, grid_classes)
        z = torch.randn(len(rows) * grid_columns, z_dim, generator=torch.Generator().manual_seed(grid_seed))
        self.register_buffer("grid_z", z, persistent=False)
        self.register_buffer("grid_y", rows.repeat_interleave(grid_columns), persistent=False)
        self.real_rows: dict[str, torch.Tensor] = {}
        self.fake_rows: dict[str, list[torch.Tensor]] = {}
        self.extras: dict = {}

    # --- training ----------------------------------------------------------------------------------------------
    def sample_latents(self, n: int):
        z = torch.randn(n, self.hparams.z_dim, device=self.device)
        return z, torch.randint(0, self.hparams.num_classes, (n,), device=self.device)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        hp = self.hparams
        opt_g, opt_d = self.optimizers()
        chunks = list(zip(images.chunk(hp.d_steps * hp.accumulate), labels.chunk(hp.d_steps * hp.accumulate)))
        for d_step in range(hp.d_steps):
            opt_d.zero_grad(set_to_none=True)
            for x, y in chunks[d_step * hp.accumulate:(d_step + 1) * hp.accumulate]:
                z, y_fake = self.sample_latents(len(y))
                with torch.no_grad():
                    fake = self.generator(z, y_fake)
                loss_real, loss_fake = hinge_d_loss(self.discriminator(x, y), self.discriminator(fake, y_fake))
                loss_d = loss_real + loss_fake
                self.manual_backward(loss_d / hp.accumulate)
            opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        self.discriminator.requires_grad_(False)  # the G step needs no D weight gradients (BigGAN's toggle_grad)
        for _ in range(hp.accumulate):
            z, y_fake = self.sample_latents(hp.batch_size)
            loss_g = hinge_g_loss(self.discriminator(self.generator(z, y_fake), y_fake))
            if hp.ortho_reg:
                loss_g = loss_g + hp.ortho_reg * ortho_penalty(self.generator, skip=("shared",))
            self.manual_backward(loss_g / hp.accumulate)
        self.discriminator.requires_grad_(True)
        opt_g.step()
        self.g_steps += 1
        self.update_ema()
        self.log_dict({"train/loss_d": loss_d.detach(), "train/loss_d_real": loss_real.detach(),
                       "train/loss_d_fake": loss_fake.detach(), "train/loss_g": loss_g.detach()}, prog_bar=True)
        # FiniteLossCheck stops the run at a NaN / Inf in either loss; LossSpikeMonitor watches each
        return {"loss": (loss_d + loss_g).detach(), "loss_d": loss_d.detach(), "loss_g": loss_g.detach()}

    @torch.no_grad()
    def update_ema(self):
        step = int(self.g_steps)
        decay = min(self.hparams.ema_decay, (1 + step) / (10 + step))
        for p_ema, p in zip(self.generator_ema.parameters(), self.generator.parameters()):
            p_ema.lerp_(p, 1 - decay)
        for b_ema, b in zip(self.generator_ema.buffers(), self.generator.buffers()):
            b_ema.copy_(b)

    def configure_optimizers(self):
        hp = self.hparams
        trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731 - frozen affines stay out
        opt_g = torch.optim.Adam(trainable(self.generator), lr=hp.g_lr, betas=tuple(hp.betas), eps=hp.adam_eps)
        opt_d = torch.optim.Adam(trainable(self.discriminator), lr=hp.d_lr, betas=tuple(hp.betas), eps=hp.adam_eps)
        return [opt_g, opt_d]

    # --- evaluation --------------------------------------------------------------------------------------------
    def features(self, images_unit: torch.Tensor) -> torch.Tensor:
        return self.feature_net(images_unit).float()

    def real_features(self, split: str) -> torch.Tensor:
        """Feature rows of the held-out real images of ``split``, computed once per run (this rank's share)."""
        if split not in self.real_rows:
            start = time.perf_counter()
            loader = self.trainer.datamodule.real_loader(split, self.global_rank, self.trainer.world_size)
            rows = [self.features(images.to(self.device).float() / 255) for images, _ in loader]
            self.real_rows[split] = torch.cat(rows)
            log.info("FID real features (%s): %d images in %.1f s, once per run", split, len(self.real_rows[split]),
                     time.perf_counter() - start)
        return self.real_rows[split]

    def generators(self, stage: str) -> dict[str, nn.Module]:
        gens = {"ema": self.generator_ema, "raw": self.generator}
        if stage == "test":
            gens["untrained"] = self.untrained_generator
        return gens

    def on_fit_start(self):
        self.feature_net.to(self.device)
        self.untrained_generator.to(self.device)

    on_test_start = on_fit_start

    def _start_eval(self, stage: str):
        self.fake_rows = {key: [] for key in self.generators(stage)}
        self.eval_seconds = {key: 0.0 for key in self.generators(stage)}
        for g in self.generators(stage).values():
            g.eval()

    def _eval_step(self, batch, batch_idx: int, stage: str):
        z, y = batch
        for key, g in self.generators(stage).items():
            start = time.perf_counter()
            self.fake_rows[key].append(self.features(to_unit(g(z, y))))
            self.eval_seconds[key] += time.perf_counter() - start
        # Measure in the last step, not in on_*_epoch_end: callbacks' epoch-end hooks (BestMetrics) run before the
        # module's, and must see this evaluation's numbers.
        num_batches = self.trainer.num_val_batches if stage == "val" else self.trainer.num_test_batches
        if batch_idx == num_batches[0] - 1:
            self._end_eval(stage)

    def _end_eval(self, stage: str):
        real = self.real_features(stage)
        step = int(self.g_steps)
        results = {}
        for key, rows in self.fake_rows.items():
            start = time.perf_counter()
            results[key] = fid_is(real, torch.cat(rows), self.feature_net.num_features, self.hparams.is_splits)
            log.info("FID pass %s G (%s, G step %d): %d samples, %.1f s sampling + features, %.1f s FID/IS -> "
                     "FID %.2f, IS %.2f", key, stage, step, sum(len(r) for r in rows), self.eval_seconds[key],
                     time.perf_counter() - start, results[key]["fid"], results[key]["is"])
        for key in GENERATORS:
            self.log(f"{stage}/fid_{key}", results[key]["fid"], sync_dist=False)
            self.log(f"{stage}/is_{key}", results[key]["is"], sync_dist=False)
        self.extras[f"{stage}_fid_pass_seconds"] = round(self.eval_seconds["ema"], 2)
        if stage == "test":
            untrained = results["untrained"]["fid"]
            self.extras.update({"fid_untrained": untrained, "is_untrained": results["untrained"]["is"],
                                "fid_ratio_ema": results["ema"]["fid"] / untrained,
                                "fid_ratio_raw": results["raw"]["fid"] / untrained,
                                "g_steps": step})
        else:
            self.extras["final_val"] = {f"{key}/{m}": v for key, r in results.items() for m, v in r.items()}
        self.save_grids(stage, step)

    @torch.no_grad()
    def save_grids(self, stage: str, step: int):
        if self.global_rank != 0:
            return
        for key in GENERATORS:
            images = self.sample_grid(self.generators(stage)[key])
            grid = make_grid(images, nrow=self.hparams.grid_columns, padding=1, pad_value=1.0)
            save_and_log_image(self, (grid * 255).round().to(torch.uint8), f"{stage}-step{step:06d}-{key}",
                               f"{stage}/samples_{key}")

    def sample_grid(self, generator: nn.Module) -> torch.Tensor:
        """The grid's images in [0, 1], ``grid_batch_size`` at a time (eval mode has no batch statistics: chunks
        change nothing) so that a large grid fits in memory."""
        size = self.hparams.grid_batch_size
        return torch.cat([to_unit(generator(z, y)) for z, y in zip(self.grid_z.split(size), self.grid_y.split(size))])

    def on_validation_epoch_start(self):
        self._start_eval("val")

    def validation_step(self, batch, batch_idx):
        if not self.trainer.sanity_checking:  # nothing to measure before training
            self._eval_step(batch, batch_idx, "val")

    def on_test_epoch_start(self):
        self._start_eval("test")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "test")

    def record_extras(self) -> dict:
        feature_net = type(self.feature_net).__name__
        size = getattr(self.feature_net, "image_size", None)
        return {**self.extras, "feature_net": feature_net + (f" at {size} px" if size else ""),
                "params_g": sum(p.numel() for p in self.generator.parameters() if p.requires_grad),
                "params_d": sum(p.numel() for p in self.discriminator.parameters())}

    # --- checkpoints: the untrained G's weights, for the reference FID after a resume or in the test -------------
    def on_save_checkpoint(self, checkpoint):
        checkpoint["untrained_generator"] = self.untrained_generator.state_dict()

    def on_load_checkpoint(self, checkpoint):
        self.untrained_generator.load_state_dict(checkpoint["untrained_generator"])
