"""Callbacks every task gets: a finite-loss guard, the best-validation record, a crash checkpoint, a heartbeat."""
from __future__ import annotations

import math
import time
from typing import Callable

import pytorch_lightning as pl
import torch


class NonFiniteLossError(FloatingPointError):
    pass


class FiniteLossCheck(pl.Callback):
    """Stop at the first NaN/Inf training loss with an error that says what to try (``remedies``: the overrides that
    fit the task, see ``pipelines.run.nan_loss_remedies``); checkpoints stay."""

    def __init__(self, remedies: str):
        self.remedies = remedies

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"training loss became {loss.item()} at step {trainer.global_step} (epoch {trainer.current_epoch}). "
                f"{self.remedies}. The checkpoints of earlier epochs, if any, stay in the run's checkpoints/ folder "
                "(none is saved now: the weights may be broken).")


class CheckpointOnException(pl.Callback):
    """Save the state of a run that crashes or is interrupted, so that it can be resumed.

    Not after NaN (the weights are broken) and not before the first training step (nothing to resume: a run that
    fails in setup, e.g. a missing dataset, must not point the user to an untrained model). ``saved`` says whether
    this run wrote the file.
    """

    def __init__(self, path):
        self.path = path
        self.saved = False

    def on_exception(self, trainer, pl_module, exception):
        if not isinstance(exception, NonFiniteLossError) and trainer.global_step > 0:
            trainer.save_checkpoint(self.path)
            self.saved = True


class Heartbeat(pl.Callback):
    """Calls ``beat(trainer)`` at most every ``interval_s`` seconds while batches run (training, validation, test),
    and whenever a checkpoint is saved, so that the record of a killed run can be told from a live one and says how
    far it got."""

    def __init__(self, beat: Callable[[pl.Trainer], None], interval_s: float):
        self.beat, self.interval_s = beat, interval_s
        self.last = time.monotonic()

    def _maybe_beat(self, trainer):
        if time.monotonic() - self.last >= self.interval_s:
            self.beat(trainer)
            self.last = time.monotonic()

    def on_train_batch_end(self, trainer, *args):
        self._maybe_beat(trainer)

    def on_validation_batch_end(self, trainer, *args):
        self._maybe_beat(trainer)

    def on_test_batch_end(self, trainer, *args):
        self._maybe_beat(trainer)

    def on_save_checkpoint(self, trainer, *args):  # what a run killed from here on can resume from: say how far
        self.beat(trainer)
        self.last = time.monotonic()


class BestMetrics(pl.Callback):
    """Keeps every validation metric of the epoch that was best on ``monitor``."""

    def __init__(self, monitor: str, mode: str = "max"):
        self.monitor, self.mode = monitor, mode
        self.best: dict[str, float] = {}

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        current = self.best.get(self.monitor)
        better = current is None or (value > current if self.mode == "max" else value < current)
        if better and math.isfinite(value):
            self.best = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self.best["epoch"] = trainer.current_epoch
            self.best["step"] = trainer.global_step

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state_dict):
        self.best = state_dict["best"]
