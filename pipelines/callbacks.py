"""Callbacks every task gets: a finite-loss guard, a loss-spike monitor, the best-validation record, a crash
checkpoint, a heartbeat."""
from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from typing import Callable

import pytorch_lightning as pl
import torch

from tasks.base import WatchedLoss


log = logging.getLogger(__name__)


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


class LossSpikeMonitor(pl.Callback):
    """Puts divergence on the record: a training loss far above its recent level is a spike.

    Rule, per watched loss (``losses``: a key of the training step's output -> its ``WatchedLoss``): a step's value is
    the loss, or its mean over the last ``smooth`` steps; the spike ratio of a step is ``|value| / max(|level|,
    floor)``, where ``level`` is the median of the values of the previous ``window`` steps (a median: one bad step
    does not move it). The ratio is defined once ``min_history`` steps are in the window; a step whose ratio exceeds
    ``factor`` is a spike. The floor keeps a loss near zero (a GAN discriminator that wins for a while) from turning
    small absolute changes into large ratios. Consecutive spiking steps are one event, logged as a warning when it
    starts; ``summary()`` (for ``results.json``) lists the events and the worst ratio of the run, spike or not, which
    says how close a run came. Each step's ratios are logged as ``divergence/<loss>_ratio`` (wandb, csv). The events
    survive a resume (checkpointed state).
    """

    def __init__(self, losses: dict[str, WatchedLoss], factor: float = 2.0, window: int = 50, min_history: int = 20):
        if factor <= 1 or min_history < 1 or window < min_history:
            raise ValueError(f"divergence: need factor > 1 and window >= min_history >= 1, got factor={factor}, "
                             f"window={window}, min_history={min_history}")
        self.losses, self.factor, self.window, self.min_history = dict(losses), factor, window, min_history
        self.history = {key: deque(maxlen=window) for key in self.losses}
        self.recent = {key: deque(maxlen=watched.smooth) for key, watched in self.losses.items()}
        self.events: list[dict] = []
        self.worst: dict | None = None  # the step with the highest ratio
        self.open: dict[str, dict] = {}  # key -> the event that the previous step belongs to

    def observe(self, step: int, key: str, loss: float) -> float | None:
        """Take one step's loss; its ratio (None while the window fills). Non-finite values are FiniteLossCheck's."""
        if not math.isfinite(loss):
            return None
        recent, history = self.recent[key], self.history[key]
        recent.append(loss)
        value = statistics.fmean(recent)
        level = statistics.median(history) if len(history) >= self.min_history else None
        history.append(value)
        if level is None:
            return None
        ratio = abs(value) / max(abs(level), self.losses[key].floor)
        if self.worst is None or ratio > self.worst["ratio"]:
            self.worst = {"loss": key, "step": step, "value": value, "level": level, "ratio": ratio}
        event = self.open.get(key)
        if ratio <= self.factor:
            self.open.pop(key, None)
        elif event is not None:  # the same blow-up goes on
            event["last_step"] = step
            if ratio > event["ratio"]:
                event.update(peak_step=step, value=value, ratio=ratio)
        else:
            event = {"loss": key, "step": step, "last_step": step, "peak_step": step, "value": value, "level": level,
                     "ratio": ratio}
            self.events.append(event)
            self.open[key] = event
            log.warning("loss spike at step %d: %s = %.4g, %.1fx its running median %.4g over the last %d steps "
                        "(a spike: above %gx; the run goes on and its record says so)", step, key, value, ratio,
                        level, len(history) - 1, self.factor)
        return ratio

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not isinstance(outputs, dict):
            outputs = {"loss": outputs}
        ratios = {}
        for key in self.losses:
            value = outputs.get(key)
            if value is not None:
                ratio = self.observe(trainer.global_step, key, float(value))
                if ratio is not None:
                    ratios[f"divergence/{key}_ratio"] = ratio
        if ratios and trainer.loggers:
            pl_module.log_dict(ratios, on_step=True, on_epoch=False)

    def summary(self) -> dict:
        watched = ", ".join(f"{k} (floor {w.floor}" + (f", mean of {w.smooth} steps)" if w.smooth > 1 else ")")
                            for k, w in self.losses.items())
        return {"spikes": len(self.events), "events": self.events, "worst": self.worst,
                "rule": f"|loss| > {self.factor}x max(median of the previous {self.window} steps, floor): {watched}"}

    def state_dict(self):
        return {"history": {k: list(v) for k, v in self.history.items()},
                "recent": {k: list(v) for k, v in self.recent.items()}, "events": self.events, "worst": self.worst}

    def load_state_dict(self, state_dict):
        for name in ("history", "recent"):
            for key, values in state_dict.get(name, {}).items():
                if key in self.losses:
                    getattr(self, name)[key].extend(values)
        self.events, self.worst = state_dict["events"], state_dict["worst"]


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
