"""The search space of the layer search (Liu et al. 2020, section 3): a layer is a DAG over x, v0, v1 and 0 of
element-wise primitives and aggregations, written and read as a formula, then a per-channel affine.

    from evonorm.space import parse, GraphNormAct, PAPER_LAYERS
    g = parse("x / max(std_nhw(x), v1 * x + std_hw(x))")   # EvoNorm-B0
    g.canonical_hash(), g.uses_batch_stats, g.nodes           # identity, series, node list for mutation
    layer = GraphNormAct(64, graph=g)                          # or evonorm.norm_act("graph", 64, graph=...)
"""
from .graph import Graph, GraphError, Node, ParseError, as_graph, parse
from .layer import GraphNormAct
from .primitives import AGG_SETS, AGG_STATS, AGGREGATES, ELEMENTWISE, LEAVES, OPS, SEARCH_LEAVES, Op

# The paper's six layers in this language; each equals the hand-written layer (evonorm.EvoNormB0 ...), the graph's
# v1 playing their v (tests/test_graph_layers.py).
PAPER_LAYERS = {
    "b0": "x / max(std_nhw(x), v1 * x + std_hw(x))",
    "b1": "x / max(std_nhw(x), (x + 1) * rms_hw(x))",
    "b2": "x / max(std_nhw(x), rms_hw(x) - x)",
    "s0": "x * sigmoid(v1 * x) / std_hwg(x)",
    "s1": "x * sigmoid(x) / std_hwg(x)",
    "s2": "x * sigmoid(x) / rms_hwg(x)",
}

__all__ = [
    "Graph", "GraphError", "Node", "ParseError", "as_graph", "parse", "GraphNormAct", "PAPER_LAYERS",
    "OPS", "Op", "LEAVES", "SEARCH_LEAVES", "ELEMENTWISE", "AGGREGATES", "AGG_SETS", "AGG_STATS",
]
