"""The driver's cheap protocols: the static check and the functional-equivalence fingerprint (AutoML-Zero's cache
key), both from one float64 forward pass of the layer on fixed probe inputs, in milliseconds.

Two layers with the same fingerprint compute the same function of x and the parameters v0, v1 (set to fixed random
values, not their init, so that ``v0 * x`` is not mistaken for 0): the second one reuses the first one's outcome
instead of being trained. Outputs are rounded to ``DIGITS`` significant digits before hashing, so that float
rounding between two equal formulas (``(a + b) + c`` and ``a + (b + c)``) does not tell them apart.
"""
from __future__ import annotations

import hashlib

import torch

from evonorm.space import Graph, GraphNormAct
from pipelines.search.mutator import series_problem

PROBE_SHAPE = (6, 12, 5, 7)  # N, C, H, W all different, 4 groups of 3 channels: no two aggregations coincide
PROBE_GROUPS = 4
DIGITS = 6


def probe_outputs(graph: Graph) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output (before its affine, in training mode) on two fixed random inputs, in float64."""
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(PROBE_SHAPE, generator=generator, dtype=torch.float64) for _ in range(2)]
    # v0 and v1 each their own values, whichever of them the layer has
    values = {name: torch.rand(PROBE_SHAPE[1], generator=generator, dtype=torch.float64) + 0.5 for name in ("v0", "v1")}
    layer = GraphNormAct(PROBE_SHAPE[1], graph=graph, groups=PROBE_GROUPS, dtype=torch.float64)
    with torch.no_grad():
        for name in graph.parameters:
            getattr(layer, name).copy_(values[name])
        return layer(inputs[0]), layer(inputs[1])


def static_problem(graph: Graph, series: str, outputs: tuple[torch.Tensor, torch.Tensor]) -> str | None:
    """Why the layer is rejected without training (None: it is not): not a valid graph, not of the series, or
    an output that does not change with x (e.g. ``x * 0``) or is constant."""
    problems = graph.errors() or [series_problem(graph, series)]
    if problems[0]:
        return "; ".join(problems)
    first, second = outputs
    if torch.equal(first, second) or bool((first == first.flatten()[0]).all()):
        return "the output does not depend on x (constant)"
    return None


def fingerprint(outputs: tuple[torch.Tensor, torch.Tensor]) -> str:
    """A hex digest of the probe outputs rounded to ``DIGITS`` significant digits (NaN and inf as such)."""
    digest = hashlib.sha256()
    for out in outputs:
        digest.update(" ".join(f"{v:.{DIGITS - 1}e}" for v in out.flatten().tolist()).encode())
    return digest.hexdigest()[:16]
