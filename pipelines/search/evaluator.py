"""The evaluation of one layer in a worker: the rejection protocols that need training, cheapest first, then the
proxy scores. (The static check and the fingerprint, which need none, run in the driver: ``fingerprint``.)

- ``finite``: the layer alone, forward and backward in training and eval mode on inputs of several scales: every
  output and gradient finite.
- ``stability``: the stress test. The first anchor with the layer, on a fixed batch; ``steps`` steps of normalized
  gradient ascent on the parameters that maximize the gradient norm of the loss (a double backward): rejected when
  that norm exceeds ``max_grad_norm`` or is not finite.
- ``quality``: the anchors one after another (in config order: cheapest first), each trained ``screen.steps`` steps
  (the start of its proxy schedule): rejected at the first one below ``screen.min_accuracy`` on the first
  ``screen.eval_size`` scoring images (or whose loss diverged); the anchors after it are not trained.
- ``proxy``: every anchor trained on to ``proxy.steps``: the scores are their top-1 on the scoring split.

A re-rank evaluation trains every anchor ``rerank.steps`` steps and scores on the re-rank split, nothing else.
Everything is seeded from the job's seed (the candidate's hash), so a retried task gives the same result.
"""
from __future__ import annotations

import math
import os
import socket
import time

import torch
import torch.nn.functional as F

from evonorm import norm_act_factory
from pipelines.search.proxy import ProxyData, ProxyTraining, build_anchor

PROTOCOLS = ("static", "fingerprint", "finite", "stability", "quality", "proxy")
WORKER_PROTOCOLS = PROTOCOLS[2:]
FINITE_SHAPE = (8, 12, 6, 6)


class Rejected(Exception):
    """A protocol rejected the layer; ``protocol`` is which, the message why."""

    def __init__(self, protocol: str, reason: str):
        super().__init__(reason)
        self.protocol = protocol


def finite_check(norm_act, scales: list[float], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    layer = norm_act(FINITE_SHAPE[1])
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        for scale in scales:
            x = (torch.randn(FINITE_SHAPE, generator=generator) * scale).requires_grad_()
            out = layer(x)
            grads = torch.autograd.grad(out.square().mean(), [x, *layer.parameters()], allow_unused=True)
            if not torch.isfinite(out).all() or not all(torch.isfinite(g).all() for g in grads if g is not None):
                raise Rejected("finite", f"non-finite output or gradient ({mode} mode, inputs of std {scale})")


def stability_check(model: torch.nn.Module, data: ProxyData, steps: int, step_size: float, batch_size: int,
                    max_grad_norm: float) -> float:
    """The largest gradient norm met; raises Rejected above ``max_grad_norm``. The model is changed."""
    x, y = data.batch("train", torch.arange(batch_size))
    params = [p for p in model.parameters() if p.requires_grad]
    worst = 0.0
    model.train()
    for step in range(steps + 1):
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=step < steps)
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        worst = max(worst, float(norm.detach())) if math.isfinite(float(norm.detach())) else math.inf
        if worst > max_grad_norm:
            raise Rejected("stability", f"gradient norm {worst:.3g} > {max_grad_norm:g} after {step} ascent steps")
        if step == steps:
            break
        ascent = torch.autograd.grad(norm, params, allow_unused=True)
        with torch.no_grad():
            ascent = [torch.zeros_like(p) if a is None else a for p, a in zip(params, ascent)]
            scale = step_size * torch.sqrt(sum(p.square().sum() for p in params)) / (
                torch.sqrt(sum(a.square().sum() for a in ascent)) + 1e-12)
            for p, a in zip(params, ascent):
                p.add_(a * scale)
    return worst


def train_anchor(name: str, training: ProxyTraining, until: int, protocol: str) -> None:
    loss = training.train(until)
    if not math.isfinite(loss):
        raise Rejected(protocol, f"{name}: the training loss became {loss} at step {training.done + 1}")


def evaluate(job: dict, data: ProxyData, settings: dict) -> dict:
    """The outcome of ``job`` ({"layer": {"norm", "kwargs"}, "seed", "rerank": bool}): status (passed, rejected),
    the protocol that ended it, why, the per-anchor scores, the screen accuracies, the seconds per protocol, and
    where it ran."""
    torch.set_num_threads(1)  # one CPU per Ray task
    torch.manual_seed(job["seed"])
    proxy, protocols, rerank = settings["proxy"], settings["protocols"], job.get("rerank", False)
    norm_act = norm_act_factory(job["layer"]["norm"], **job["layer"]["kwargs"])
    outcome = {"status": "passed", "ended_by": None, "reason": None, "scores": None, "screen": None, "times": {},
               "worst_grad_norm": None, "node": node_id(), "host": socket.gethostname(), "pid": os.getpid()}
    clock = time.perf_counter()

    def timed(protocol):
        nonlocal clock
        now = time.perf_counter()
        outcome["times"][protocol] = round(now - clock, 3)
        clock = now

    def trainings(steps):
        out = {}
        for name, spec in proxy["anchors"].items():
            model = build_anchor(spec, norm_act, data)
            if proxy["channels_last"]:
                model = model.to(memory_format=torch.channels_last)
            out[name] = ProxyTraining(model, data, steps, proxy["batch_size"], spec.get("lr", proxy["lr"]),
                                      proxy["momentum"], proxy["weight_decay"], proxy["warmup_steps"],
                                      proxy["label_smoothing"], job["seed"], proxy["channels_last"])
        return out

    try:
        if rerank:
            anchors = trainings(settings["rerank"]["steps"])
            for name, training in anchors.items():
                train_anchor(name, training, settings["rerank"]["steps"], "proxy")
            outcome["scores"] = [anchors[name].accuracy("rerank") for name in anchors]
            timed("proxy")
            return outcome
        finite_check(norm_act, protocols["finite_scales"], job["seed"])
        timed("finite")
        stress = protocols["stability"]
        first = next(iter(proxy["anchors"].values()))
        outcome["worst_grad_norm"] = stability_check(build_anchor(first, norm_act, data), data, stress["steps"],
                                                     stress["step_size"], stress["batch_size"],
                                                     stress["max_grad_norm"])
        timed("stability")
        screen = protocols["screen"]
        anchors, outcome["screen"] = trainings(proxy["steps"]), []
        for name, training in anchors.items():
            train_anchor(name, training, screen["steps"], "quality")
            outcome["screen"].append(training.accuracy("score", screen["eval_size"]))
            if outcome["screen"][-1] < screen["min_accuracy"]:
                raise Rejected("quality", f"{name}: top-1 {outcome['screen'][-1]:.3f} < {screen['min_accuracy']} "
                                          f"after {screen['steps']} steps")
        timed("quality")
        for name, training in anchors.items():
            train_anchor(name, training, proxy["steps"], "proxy")
        outcome["scores"] = [training.accuracy("score") for training in anchors.values()]
        timed("proxy")
    except Rejected as rejection:
        timed(rejection.protocol)
        outcome.update(status="rejected", ended_by=rejection.protocol, reason=str(rejection))
    return outcome


def node_id() -> str | None:
    """The Ray node this runs on (None outside Ray)."""
    try:
        import ray
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except ImportError:
        return None
