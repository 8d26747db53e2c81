"""LightningModule for Mask R-CNN: summed torchvision losses, SGD with warmup, COCO AP on val and test."""
from __future__ import annotations

import logging
import math
import time

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

from evonorm import param_groups_weight_decay
from tasks.common.images import save_and_log_image, with_caption
from tasks.common.optim import clip_gradients

from .evaluation import MASK_THRESHOLD, coco_ap, to_coco_results
from .model import BATCH_STATS

log = logging.getLogger(__name__)
FALLBACK_DRAWN = 3  # detections drawn on a panel where none reaches draw_score
# one colour per class (matplotlib's tab10 without its grey, which marks the below-threshold detections)
CLASS_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]


def warmup_then_decay(step: int, warmup_steps: int, warmup_factor: float, total_steps: int, schedule: str,
                      milestones: list[float], gamma: float = 0.1) -> float:
    """LR factor: linear warmup from ``warmup_factor`` to 1, then cosine to 0 or steps of ``gamma`` at the
    ``milestones`` (fractions of ``total_steps``)."""
    if step < warmup_steps:
        return warmup_factor + (1 - warmup_factor) * step / warmup_steps
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))
    return gamma ** sum(step >= m * total_steps for m in milestones)


class MaskRCNNModule(pl.LightningModule):
    def __init__(self, model: nn.Module, category_ids: list[int], class_names: list[str], lr: float = 0.02,
                 momentum: float = 0.9, weight_decay: float = 1e-4, warmup_steps: int = 100,
                 warmup_factor: float = 0.001, schedule: str = "cosine", milestones: tuple[float, ...] = (),
                 clip_grad_norm: float | None = None, num_drawn: int = 8, draw_score: float = 0.5):
        super().__init__()
        if schedule not in ("cosine", "step"):
            raise ValueError(f"task.optim.schedule must be cosine or step, got {schedule!r}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.predictions: dict[int, list[dict]] = {}  # image id -> its detections in COCO's results format
        self.drawn: list[tuple] = []  # panel_content of the first val images
        self.last_eval: dict = {}

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.model.freeze_norm_stats:  # batch-dependent layers normalize with running statistics
            for m in self.model.modules():
                if isinstance(m, BATCH_STATS):
                    m.eval()
        return self

    def training_step(self, batch, batch_idx):
        images, targets = batch
        losses = self.model(list(images), [{k: t[k] for k in ("boxes", "labels", "masks")} for t in targets])
        loss = sum(losses.values())
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=len(images))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip_gradients(self, optimizer, self.hparams.clip_grad_norm, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.SGD(param_groups_weight_decay(self.model, hp.weight_decay), lr=hp.lr,
                                    momentum=hp.momentum)
        total = self.trainer.estimated_stepping_batches
        factor = lambda s: warmup_then_decay(s, hp.warmup_steps, hp.warmup_factor, total, hp.schedule,  # noqa: E731
                                             list(hp.milestones))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # --- evaluation: predictions in COCO's results format, COCOeval at the end of the pass ----------------------

    def on_validation_epoch_start(self):
        self.start_eval()

    def on_test_epoch_start(self):
        self.start_eval()

    def start_eval(self):
        self.predictions, self.drawn = {}, []
        self.eval_started = time.time()

    # COCOeval runs after the last batch rather than in on_*_epoch_end: Lightning calls the callbacks' epoch-end
    # hooks (the pipeline's best-metrics record) before the module's, so they would not see the metrics
    def validation_step(self, batch, batch_idx):
        self.predict_batch(batch)
        if batch_idx == self.trainer.num_val_batches[0] - 1:
            self.finish_eval("val")

    def test_step(self, batch, batch_idx):
        self.predict_batch(batch)
        if batch_idx == self.trainer.num_test_batches[0] - 1:
            self.finish_eval("test")

    def predict_batch(self, batch):
        images, targets = batch
        outputs = self.model(list(images))
        category_ids = self.hparams.category_ids
        for image, target, output in zip(images, targets, outputs):
            image_id = int(target["image_id"])
            self.predictions[image_id] = to_coco_results(output, image_id, category_ids)
            if len(self.drawn) < self.hparams.num_drawn:
                self.drawn.append(panel_content(image, output, self.hparams.draw_score))

    def finish_eval(self, stage: str):
        predictions = gather_by_image(self.predictions)
        image_ids, results = list(predictions), [r for found in predictions.values() for r in found]
        predicted = time.time()
        metrics = coco_ap(self.trainer.datamodule.val_coco.coco, results, image_ids)
        log.info("%s COCO eval: %d images, %d detections, predicted in %.1f s, COCOeval %.1f s: box AP %.3f AP50 "
                 "%.3f, mask AP %.3f AP50 %.3f", stage, len(image_ids), len(results),
                 predicted - self.eval_started, time.time() - predicted, metrics["bbox_AP"], metrics["bbox_AP50"],
                 metrics["segm_AP"], metrics["segm_AP50"])
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, prog_bar=name in ("bbox_AP50", "segm_AP"), batch_size=1)
        self.last_eval[stage] = {"images": len(image_ids), "detections": len(results),
                                 "seconds": round(time.time() - self.eval_started, 1)}
        if self.drawn and not self.trainer.sanity_checking and self.global_rank == 0:  # one picture per run
            save_and_log_image(self, self.draw_predictions(), f"{stage}-predictions-step{self.global_step}",
                               f"{stage}/predictions")

    def draw_predictions(self) -> torch.Tensor:
        """The first val images with their predictions (masks, boxes, class and score), as one grid."""
        names = self.hparams.class_names
        panels = []
        for image, shown, confident, caption in self.drawn:
            colors = [CLASS_COLORS[(int(c) - 1) % len(CLASS_COLORS)] for c in shown["labels"]] if confident else "grey"
            picture = (image * 255).round().clamp(0, 255).to(torch.uint8)
            scale = max(1, 256 // max(picture.shape[-2:]))  # small images upscaled so the labels stay readable
            if scale > 1:
                picture = F.interpolate(picture[None], scale_factor=scale, mode="nearest")[0]
            if len(shown["boxes"]):
                masks = F.interpolate(shown["masks"][None].float(), scale_factor=scale, mode="nearest")[0] > 0
                picture = draw_segmentation_masks(picture, masks, alpha=0.45, colors=colors)
                labels = [f"{names[int(c) - 1]} {s:.2f}" for c, s in zip(shown["labels"], shown["scores"])]
                picture = draw_bounding_boxes(picture, shown["boxes"] * scale, labels=labels, colors=colors, width=2)
            panels.append(with_caption(picture, caption))
        size = max(p.shape[-1] for p in panels), max(p.shape[-2] for p in panels)
        panels = [F.pad(p, (0, size[0] - p.shape[-1], 0, size[1] - p.shape[-2])) for p in panels]
        return make_grid(panels, nrow=4, padding=4, pad_value=255)

    def record_extras(self) -> dict:
        return {"norm_placement": self.model.norm_placement, "coco_eval": self.last_eval}


def panel_content(image: torch.Tensor, output: dict, threshold: float) -> tuple[torch.Tensor, dict, bool, str]:
    """What one panel of the drawn predictions shows, on the CPU, masks as booleans (not every full-size mask
    probability of an image): the detections scoring at least ``threshold``, or where none does (early in
    training) the best ``FALLBACK_DRAWN``, to be drawn in grey so that the pasted objects of the input are not
    mistaken for predictions; whether they are the confident ones; the caption that says which."""
    scores = output["scores"]
    keep = (scores >= threshold).nonzero()[:, 0]
    confident = bool(len(keep))
    if confident:
        caption = f"{len(keep)} with score >= {threshold:.2f}"
    elif len(scores):
        keep = scores.argsort(descending=True)[:FALLBACK_DRAWN]
        caption = f"none >= {threshold:.2f}; grey: best {len(keep)}"
    else:
        caption = "no detections"
    shown = {k: output[k][keep].cpu() for k in ("boxes", "labels", "scores")}
    shown["masks"] = output["masks"][keep][:, 0].cpu() > MASK_THRESHOLD
    return image.cpu(), shown, confident, caption


def gather_by_image(predictions: dict[int, list[dict]]) -> dict[int, list[dict]]:
    """Every process's predictions, each image once (DDP: the distributed sampler repeats a few images so that
    all processes get as many batches); the dict itself in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return predictions
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, predictions)
    return {image_id: found for part in parts for image_id, found in part.items()}
