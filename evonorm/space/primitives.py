"""The op table of the layer search space: leaves, element-wise primitives and aggregations, with their arity,
commutativity, how they change a node's shape and how they compute.

Shapes are tracked as the set of axes a node varies along: ``n`` (sample), ``c`` (channel), ``s`` (spatial H, W).
x varies along all three, v0/v1 along ``c``, the constants along none. Tensors keep 4 dims with size 1 where a node
does not vary, so broadcasting does the rest; a mean or variance over an axis a node does not vary along is that of
the broadcast tensor (each value counts equally), so no node is ever expanded to x's size for an aggregation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FULL = frozenset("ncs")  # x's shape (N, C, H, W): what the output must have


@dataclass(frozen=True)
class Op:
    name: str            # as written in formulas and stored in nodes
    arity: int           # 0: a leaf
    kind: str            # "leaf", "elementwise" or "aggregate"
    commutative: bool = False
    stat: str = ""       # aggregations: "mean", "std" (sqrt(biased var + eps)) or "rms" (sqrt(mean(x^2) + eps))
    axes: str = ""       # aggregations: "nhw", "hw", "hwg" or "hwc"
    doc: str = ""


# Aggregation index sets (the paper's I): their name in the paper's terms and the node axes each removes.
AGG_SETS = {
    "nhw": ("batch", frozenset("ns")),
    "hw": ("instance", frozenset("s")),
    "hwg": ("group", frozenset("s")),    # the group statistic is per (sample, group), broadcast to its channels
    "hwc": ("layer", frozenset("cs")),
}
AGG_STATS = {
    "mean": "mean",
    "std": "sqrt(biased variance + eps)",
    "rms": "sqrt(mean of squares + eps)",
}
# Running buffer per batch aggregation: the pre-sqrt quantity, its name stem and initial value (B0's running_var).
RUNNING = {"mean": ("running_mean", 0.0), "std": ("running_var", 1.0), "rms": ("running_sq_mean", 1.0)}

LEAVES = ("x", "v0", "v1", "0", "1")
SEARCH_LEAVES = ("x", "v0", "v1", "0")  # the paper's initial nodes; 1 exists for writing B1's (x + 1)
PARAMETERS = {"v0": 0.0, "v1": 1.0}     # learnable per-channel leaves and their initial value

_OPS = [
    Op("x", 0, "leaf", doc="the input, (N, C, H, W)"),
    Op("v0", 0, "leaf", doc="learnable per-channel vector, init zeros"),
    Op("v1", 0, "leaf", doc="learnable per-channel vector, init ones"),
    Op("0", 0, "leaf", doc="the constant 0"),
    Op("1", 0, "leaf", doc="the constant 1 (not a search leaf; for B1's x + 1)"),
    Op("add", 2, "elementwise", True, doc="a + b"),
    Op("mul", 2, "elementwise", True, doc="a * b"),
    Op("div", 2, "elementwise", doc="a / b, |b| clamped to >= eps keeping its sign (+0 as +, -0 as -)"),
    Op("max", 2, "elementwise", True, doc="element-wise maximum"),
    Op("neg", 1, "elementwise", doc="-a"),
    Op("sigmoid", 1, "elementwise"),
    Op("tanh", 1, "elementwise"),
    Op("exp", 1, "elementwise"),
    Op("slog", 1, "elementwise", doc="sign(a) * log(|a| + eps)"),
    Op("ssqrt", 1, "elementwise", doc="sign(a) * sqrt(|a| + eps)"),
    Op("abs", 1, "elementwise"),
    Op("square", 1, "elementwise"),
] + [Op(f"{stat}_{axes}", 1, "aggregate", stat=stat, axes=axes, doc=f"{AGG_STATS[stat]} over the {AGG_SETS[axes][0]} "
        f"set") for stat in AGG_STATS for axes in AGG_SETS]

OPS: dict[str, Op] = {op.name: op for op in _OPS}
FUNCTIONS = tuple(name for name, op in OPS.items() if op.arity)  # callable by name in formulas
ELEMENTWISE = tuple(name for name, op in OPS.items() if op.kind == "elementwise")
AGGREGATES = tuple(name for name, op in OPS.items() if op.kind == "aggregate")


def out_axes(op: Op, inputs: list[frozenset]) -> frozenset:
    """The axes a node varies along, from its inputs'."""
    if op.kind == "leaf":
        return {"x": FULL, "v0": frozenset("c"), "v1": frozenset("c")}.get(op.name, frozenset())
    if op.kind == "aggregate":
        return inputs[0] - AGG_SETS[op.axes][1]
    return frozenset().union(*inputs)


# ---------------------------------------------------------------------------------------------------------------
# computation (eps guards: div, slog and ssqrt stay finite at 0, and so do their gradients)

def safe_div(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """a / b with |b| clamped to >= eps, keeping b's sign (copysign: +0 gives +eps, -0 gives -eps). A clamp, not
    + eps: denominators >= eps (the paper layers' are >= sqrt(eps)) divide exactly. copysign: half the time of a
    where() on CPU."""
    return a / b.abs().clamp_min(eps).copysign(b)


# name -> f(eps, *operands)
COMPUTE = {
    "add": lambda eps, a, b: a + b,
    "mul": lambda eps, a, b: a * b,
    "div": lambda eps, a, b: safe_div(a, b, eps),
    "max": lambda eps, a, b: torch.maximum(a, b),
    "neg": lambda eps, a: -a,
    "sigmoid": lambda eps, a: torch.sigmoid(a),
    "tanh": lambda eps, a: torch.tanh(a),
    "exp": lambda eps, a: torch.exp(a),
    "slog": lambda eps, a: torch.sign(a) * torch.log(a.abs() + eps),
    "ssqrt": lambda eps, a: torch.sign(a) * torch.sqrt(a.abs() + eps),
    "abs": lambda eps, a: a.abs(),
    "square": lambda eps, a: a.square(),
}
assert set(COMPUTE) == set(ELEMENTWISE)


def moment(t: torch.Tensor, stat: str, axes: str, groups: int) -> torch.Tensor:
    """The pre-sqrt quantity of an aggregation (mean, biased variance or mean of squares), keeping 4 dims.

    hwg: per (sample, group of contiguous channels) as the S layers and GroupNorm, back on (N, C, 1, 1); an
    operand without a channel axis has one value for all groups (its layer statistic).
    """
    def reduce(u: torch.Tensor, dims) -> torch.Tensor:
        if stat == "mean":
            return u.mean(dims, keepdim=True)
        if stat == "std":
            return u.var(dims, unbiased=False, keepdim=True)
        return u.square().mean(dims, keepdim=True)

    if axes == "hwg" and t.shape[1] > 1:
        n, c = t.shape[:2]
        grouped = reduce(t.reshape(n, groups, -1), -1)  # (n, groups, 1)
        return grouped.expand(n, groups, c // groups).reshape(n, c, 1, 1)
    dims = {"nhw": (0, 2, 3), "hw": (2, 3), "hwg": (1, 2, 3), "hwc": (1, 2, 3)}[axes]
    return reduce(t, dims)


def finish(m: torch.Tensor, stat: str, eps: float) -> torch.Tensor:
    """The aggregation's value from its pre-sqrt quantity (the batch one, or a running buffer in eval)."""
    return m if stat == "mean" else m.add(eps).sqrt()
