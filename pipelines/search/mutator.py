"""Random layer graphs and their mutation, per series: ``b`` (batch-dependent: uses an aggregation over (N, H, W))
and ``s`` (batch-independent: no such aggregation is ever drawn).

A genome is the whole node list of a Graph: the paper's initial nodes x, v0, v1 and 0 first, then the intermediate
nodes, one primitive each; the last node is the output. Nodes the output does not use stay in the genome (a later
mutation may connect them) but not in the layer (its canonical form prunes them).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

from evonorm.space import AGGREGATES, ELEMENTWISE, OPS, SEARCH_LEAVES, Graph, Node
from pipelines.checks import ConfigError

SERIES = ("b", "s")
LEAF_NODES = tuple(Node(leaf) for leaf in SEARCH_LEAVES)
MUTATIONS = ("op", "inputs", "op and inputs")


def genome(graph: Graph) -> Graph:
    """``graph`` with the initial nodes first (a parsed formula has only those it uses, in its own order)."""
    if graph.nodes[:len(LEAF_NODES)] == LEAF_NODES:
        return graph
    where, nodes = {}, list(LEAF_NODES)
    for i, (op, inputs) in enumerate(graph.nodes):
        if Node(op) in LEAF_NODES:
            where[i] = LEAF_NODES.index(Node(op))
        else:
            where[i] = len(nodes)
            nodes.append(Node(op, tuple(where[j] for j in inputs)))
    return Graph(nodes)


def series_problem(graph: Graph, series: str) -> str | None:
    """Why ``graph`` is not a layer of ``series`` (None: it is)."""
    if series == "s" and graph.uses_batch_stats:
        return "series s forbids batch aggregations (*_nhw of something that depends on x)"
    if series == "b" and not graph.uses_batch_stats:
        return "series b layers use batch statistics (an *_nhw aggregation of something that depends on x)"
    return None


@dataclass(frozen=True)
class Mutator:
    """Draws layers of a series: random ones of ``min_ops`` to ``max_ops`` intermediate nodes, and mutants that
    change one intermediate node's op and/or inputs. Both are valid graphs whose output varies like x (uses x);
    the s series draws no batch aggregation, the b series keeps at least one."""
    series: str
    min_ops: int = 3
    max_ops: int = 10
    max_tries: int = 10_000

    def __post_init__(self):
        if self.series not in SERIES:
            raise ConfigError(f"search.series={self.series!r}: choose b (batch-dependent) or s (batch-independent)")
        if not 1 <= self.min_ops <= self.max_ops:
            raise ConfigError(f"search.min_ops={self.min_ops}, search.max_ops={self.max_ops}: need "
                             "1 <= min_ops <= max_ops")

    @cached_property
    def ops(self) -> tuple[str, ...]:
        aggregates = tuple(a for a in AGGREGATES if self.series == "b" or OPS[a].axes != "nhw")
        return ELEMENTWISE + aggregates

    def _inputs(self, rng: random.Random, op: str, before: int) -> tuple[int, ...]:
        return tuple(rng.randrange(before) for _ in range(OPS[op].arity))

    def fits(self, graph: Graph) -> bool:
        return graph.is_valid and series_problem(graph, self.series) is None

    def random_graph(self, rng: random.Random) -> Graph:
        """A random layer of the series with ``min_ops`` to ``max_ops`` intermediate nodes, all of them used: each
        node takes the one before it (the first: x) as one operand, the others uniform over the earlier nodes;
        drawn again until the output varies like x (and, in series b, uses batch statistics)."""
        for _ in range(self.max_tries):
            nodes = list(LEAF_NODES)
            for _ in range(rng.randint(self.min_ops, self.max_ops)):
                op = rng.choice(self.ops)
                inputs = [len(nodes) - 1 if len(nodes) > len(LEAF_NODES) else 0,
                          *self._inputs(rng, op, len(nodes))[1:]]
                rng.shuffle(inputs)
                nodes.append(Node(op, tuple(inputs)))
            graph = Graph(nodes, check=False)
            if self.fits(graph):
                return graph
        raise RuntimeError(f"no valid layer graph in {self.max_tries} draws; raise search.max_ops")

    def mutate(self, parent: Graph, rng: random.Random) -> tuple[Graph, str]:
        """A mutant of ``parent``, a layer of the series that computes something else (another canonical form),
        and what changed (e.g. "node 6: op")."""
        parent = genome(parent)
        first = len(LEAF_NODES)
        for _ in range(self.max_tries):
            i = rng.randrange(first, len(parent.nodes))
            what = rng.choice(MUTATIONS)
            op, inputs = parent.nodes[i]
            if what != "inputs":
                op = rng.choice([o for o in self.ops if o != op])
            if what != "op" or OPS[op].arity != len(inputs):
                inputs = self._inputs(rng, op, i)
            child = parent.replace(i, op, inputs, check=False)
            if self.fits(child) and child.canonical_hash() != parent.canonical_hash():
                return child, f"node {i}: {what}"
        raise RuntimeError(f"no valid mutant of {parent.formula()} in {self.max_tries} tries")
