"""One factory for every norm-act layer: ``norm_act(name, num_features, apply_act=True, **kwargs)``."""
from __future__ import annotations

from functools import partial
from typing import Callable

from torch import nn

from .baselines import BatchNormAct2d, FilterResponseNormTLU, GroupNormAct
from .batch import EvoNormB0, EvoNormB1, EvoNormB2
from .sample import EvoNormS0, EvoNormS1, EvoNormS2
from .space import GraphNormAct, as_graph

NORM_ACT_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "b0": EvoNormB0,
    "b1": EvoNormB1,
    "b2": EvoNormB2,
    "s0": EvoNormS0,
    "s1": EvoNormS1,
    "s2": EvoNormS2,
    "bn_relu": partial(BatchNormAct2d, act="relu"),
    "bn_silu": partial(BatchNormAct2d, act="silu"),
    "gn_relu": partial(GroupNormAct, act="relu"),
    "gn_silu": partial(GroupNormAct, act="silu"),
    "frn_tlu": FilterResponseNormTLU,
    "graph": GraphNormAct,  # a layer of the search space: needs graph=<formula> (evonorm.space)
}
# The layers a name alone builds (what sweeps, benchmarks and tests go through); "graph" needs its formula too.
NORM_ACT_NAMES = tuple(name for name in NORM_ACT_LAYERS if name != "graph")
# Types whose parameters take no weight decay (the reference trains EvoNorm parameters without it).
NORM_LAYER_TYPES = (
    EvoNormB0, EvoNormB1, EvoNormB2, EvoNormS0, EvoNormS1, EvoNormS2, FilterResponseNormTLU, GraphNormAct,
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
)


def norm_act(name: str, num_features: int, apply_act: bool = True, **kwargs) -> nn.Module:
    """Build the norm-act layer ``name`` for ``num_features`` channels.

    ``apply_act=False`` asks for the layer at a position with no activation after it. Extra keyword arguments
    (``eps``, ``groups``, ``momentum``, ``linear``, ``device``, ``dtype``, ``graph`` for "graph", ...) go to the
    layer.
    """
    try:
        layer = NORM_ACT_LAYERS[name]
    except KeyError:
        raise ValueError(f"unknown norm-act layer {name!r}; valid names: {', '.join(NORM_ACT_LAYERS)}") from None
    if "act" in kwargs:  # bn_relu with act="silu" would be bn_silu under another name
        raise ValueError(f"norm-act layer {name!r} names its activation: choose the name with the one wanted "
                         f"({', '.join(NORM_ACT_NAMES)}) instead of act={kwargs['act']!r}")
    return layer(num_features, apply_act=apply_act, **kwargs)


def norm_act_factory(name: str, **kwargs) -> Callable[..., nn.Module]:
    """``norm_act`` with the name and layer options bound: what model builders take."""
    if name not in NORM_ACT_LAYERS:
        norm_act(name, 1)  # raises the ValueError that lists the names
    if name == "graph":  # a formula that does not parse fails here, before any model is built; parsed once
        kwargs["graph"] = as_graph(kwargs.get("graph"))
    return partial(norm_act, name, **kwargs)
