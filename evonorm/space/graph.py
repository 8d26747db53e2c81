"""Layer graphs: an explicit node list (what a mutator edits), the formula text (what people read and type) and
the canonical form (what identifies a layer up to operand order and redundancy).

A graph is a tuple of ``Node(op, inputs)``; ``inputs`` index earlier nodes (so it is acyclic by construction) and
the last node is the output. Leaves are nodes too (``x``, ``v0``, ``v1``, ``0``, ``1``). Equality (``==``, hash) is
structural: same expression as written, whatever the node numbering, duplicated or unused nodes
(``normalize()``). ``canonical_hash()`` also ignores the operand order of add, mul and max.
"""
from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, NamedTuple

from .primitives import AGG_SETS, AGG_STATS, FULL, LEAVES, OPS, Op, out_axes


class GraphError(ValueError):
    """An invalid graph: unknown op, wrong arity, an input that is not an earlier node, an output without x."""


class ParseError(ValueError):
    """A formula that does not parse; the message says where (column and caret) and what was expected."""


class Node(NamedTuple):
    op: str
    inputs: tuple[int, ...] = ()


# ---------------------------------------------------------------------------------------------------------------
# printing: (text, precedence) per node; precedence 1 sum, 2 product, 3 negation, 4 atom

_INFIX = {"add": ("+", 1), "mul": ("*", 2), "div": ("/", 2)}


def _print_node(op: str, args: list[tuple[str, int]], negated: list[tuple[str, int] | None]) -> tuple[str, int]:
    """(text, precedence) of a node from its operands'; ``negated[k]``: what operand k negates, if it is a neg
    (a + (-b) prints as a - b)."""
    if not args:
        return op, 4
    if op == "neg":
        text, prec = args[0]
        return "-" + (text if prec == 4 else f"({text})"), 3
    if op in _INFIX:
        sym, prec = _INFIX[op]
        (lt, lp), (rt, rp) = args
        left = lt if lp >= prec else f"({lt})"
        if op == "add" and negated[1] is not None:
            sub, sub_prec = negated[1]
            return f"{left} - {sub if sub_prec > 1 else f'({sub})'}", 1
        return f"{left} {sym} {rt if rp > prec else f'({rt})'}", prec  # left-associative: a - (b - c) keeps ()
    return f"{op}({', '.join(t for t, _ in args)})", 4


# ---------------------------------------------------------------------------------------------------------------
# the graph

def _as_node(node: Node | tuple) -> Node:
    """Node(op, inputs) from a Node, (op,) or (op, inputs)."""
    if isinstance(node, str) or not 1 <= len(node) <= 2:
        raise TypeError(f"a node is Node(op, inputs) or (op, inputs), got {node!r}")
    return Node(node[0], tuple(int(i) for i in (node[1] if len(node) == 2 else ())))


@dataclass(frozen=True, eq=False)
class Graph:
    """An immutable layer graph; ``Graph(nodes)`` checks it (``check=False`` to build one and ask ``errors()``)."""
    nodes: tuple[Node, ...]

    def __init__(self, nodes: Iterable[Node | tuple], *, check: bool = True):
        object.__setattr__(self, "nodes", tuple(_as_node(n) for n in nodes))
        if check:
            self.check()

    # ------------------------------------------------------------------ validity

    def errors(self) -> list[str]:
        """What makes the graph invalid (empty: valid)."""
        if not self.nodes:
            return ["a graph needs at least one node"]
        found = []
        for i, (op, inputs) in enumerate(self.nodes):
            if op not in OPS:
                found.append(f"node {i}: unknown op {op!r} (valid: {', '.join(OPS)})")
                continue
            if len(inputs) != OPS[op].arity:
                found.append(f"node {i}: {op} takes {OPS[op].arity} input(s), got {len(inputs)}")
            bad = [j for j in inputs if not 0 <= j < i]
            if bad:
                found.append(f"node {i}: inputs {bad} are not earlier nodes (0..{i - 1})")
        if not found and self.axes[-1] != FULL:
            found.append(f"the output {self.formula()} must vary like x, over (N, C, H, W) "
                         + ("(it does not depend on x)" if not self.depends_on_x else
                            "(an aggregation reduces it; combine it with x element-wise)"))
        return found

    @property
    def is_valid(self) -> bool:
        return not self.errors()

    def check(self) -> Graph:
        found = self.errors()
        if found:
            raise GraphError("invalid layer graph: " + "; ".join(found))
        return self

    # ------------------------------------------------------------------ per-node facts

    @property
    def output(self) -> int:
        return len(self.nodes) - 1

    def op(self, i: int) -> Op:
        return OPS[self.nodes[i].op]

    @cached_property
    def axes(self) -> tuple[frozenset, ...]:
        """Per node, the axes it varies along (subset of "ncs"); the output must have all three."""
        out: list[frozenset] = []
        for op, inputs in self.nodes:
            out.append(out_axes(OPS[op], [out[j] for j in inputs]))
        return tuple(out)

    @cached_property
    def x_dependent(self) -> tuple[bool, ...]:
        """Per node, whether it depends on x."""
        out: list[bool] = []
        for op, inputs in self.nodes:
            out.append(op == "x" or any(out[j] for j in inputs))
        return tuple(out)

    @cached_property
    def reachable(self) -> frozenset[int]:
        """The nodes the output uses (itself included)."""
        seen, todo = set(), [self.output]
        while todo:
            i = todo.pop()
            if i not in seen:
                seen.add(i)
                todo.extend(self.nodes[i].inputs)
        return frozenset(seen)

    @property
    def depends_on_x(self) -> bool:
        return self.x_dependent[-1]

    @property
    def uses_batch_stats(self) -> bool:
        """An aggregation over (N, H, W) of something that depends on x (a B-series layer, with running
        statistics); False: an S-series, batch-independent layer."""
        return any(self.is_batch_aggregation(i) for i in self.reachable)

    def is_batch_aggregation(self, i: int) -> bool:
        node = self.nodes[i]
        return OPS[node.op].axes == "nhw" and self.x_dependent[node.inputs[0]]

    @property
    def parameters(self) -> tuple[str, ...]:
        """The learnable leaves the output uses, of ("v0", "v1")."""
        used = {self.nodes[i].op for i in self.reachable}
        return tuple(p for p in ("v0", "v1") if p in used)

    @property
    def num_nodes(self) -> int:
        """Nodes of this node list, leaves included (``normalize()`` first for the count of what the output uses)."""
        return len(self.nodes)

    @property
    def num_ops(self) -> int:
        """Intermediate (op) nodes of this node list: nodes that are not leaves."""
        return sum(op not in LEAVES for op, _ in self.nodes)

    def replace(self, i: int, op: str | None = None, inputs: Iterable[int] | None = None, *,
                check: bool = True) -> Graph:
        """A copy with node ``i``'s op and/or inputs replaced (a mutation)."""
        old = self.nodes[i]
        node = Node(old.op if op is None else op, old.inputs if inputs is None else tuple(inputs))
        return Graph(self.nodes[:i] + (node,) + self.nodes[i + 1:], check=check)

    # ------------------------------------------------------------------ text

    @cached_property
    def _texts(self) -> tuple[tuple[str, int], ...]:
        texts: list[tuple[str, int]] = []
        for op, inputs in self.nodes:
            negated = [texts[self.nodes[j].inputs[0]] if self.nodes[j].op == "neg" else None for j in inputs]
            texts.append(_print_node(op, [texts[j] for j in inputs], negated))
        return tuple(texts)

    def formula(self, i: int | None = None) -> str:
        """The formula of the output (or of node ``i``): shared nodes are written out at each use."""
        return self._texts[self.output if i is None else i][0]

    def __str__(self) -> str:
        return self.formula()

    def __repr__(self) -> str:
        return f"Graph({self.formula()!r})" if self.nodes else "Graph([])"

    # ------------------------------------------------------------------ normal and canonical forms

    def _rebuild(self, sort: bool) -> Graph:
        """Common subexpressions merged, unused nodes dropped, nodes numbered in the order a parse of the formula
        creates them (depth first, operands left to right); ``sort``: operands of add, mul, max ordered first."""
        table: list[Node] = []  # merged nodes, numbered as first met
        ids: dict[Node, int] = {}
        texts: list[tuple[str, int]] = []
        where: list[int] = []  # this graph's node -> merged node
        for op, inputs in self.nodes:
            ins = [where[j] for j in inputs]
            if sort and OPS[op].commutative:  # a - b stays a - b; shorter operand first, then alphabetical
                ins.sort(key=lambda k: (table[k].op == "neg", len(texts[k][0]), texts[k][0]))
            node = Node(op, tuple(ins))
            if node not in ids:
                ids[node] = len(table)
                table.append(node)
                negated = [texts[table[k].inputs[0]] if table[k].op == "neg" else None for k in ins]
                texts.append(_print_node(op, [texts[k] for k in ins], negated))
            where.append(ids[node])
        order: dict[int, int] = {}

        def visit(k: int) -> None:
            if k not in order:
                for j in table[k].inputs:
                    visit(j)
                order[k] = len(order)

        visit(where[-1])
        nodes = sorted(order, key=order.get)
        return Graph([Node(table[k].op, tuple(order[j] for j in table[k].inputs)) for k in nodes], check=False)

    def normalize(self) -> Graph:
        """The same expression as written, in normal form: what ``parse(str(self))`` gives."""
        return self._normal

    @cached_property
    def _normal(self) -> Graph:
        return self._rebuild(sort=False)

    @cached_property
    def _canonical(self) -> Graph:
        return self._rebuild(sort=True)

    def canonical(self) -> Graph:
        """The normal form with the operands of add, mul and max in a fixed order: equal for graphs that differ
        only in those orders, in node numbering, duplicated or unused nodes."""
        return self._canonical

    def canonical_hash(self, length: int = 12) -> str:
        """Hex digest (``length`` characters) of the canonical formula."""
        return hashlib.sha256(self._canonical.formula().encode()).hexdigest()[:length]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Graph) and self._normal.nodes == other._normal.nodes

    def __hash__(self) -> int:
        return hash(self._normal.nodes)


# ---------------------------------------------------------------------------------------------------------------
# parsing: sum := product (('+' | '-') product)*; product := unary (('*' | '/') unary)*;
# unary := '-' unary | atom; atom := 0 | 1 | leaf | function '(' sum (',' sum)* ')' | '(' sum ')'

_TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d*)?|\.\d+)|(?P<name>[A-Za-z_]\w*)|(?P<sym>[-+*/(),])|(?P<bad>\S))")
_NAMED_LEAVES = tuple(name for name in LEAVES if name[0].isalpha())


def _valid_names() -> str:
    plain = [name for name, op in OPS.items() if op.kind == "elementwise" and name not in ("add", "mul", "div", "neg")]
    return (f"leaves {', '.join(LEAVES)}; operators + - * /; functions {', '.join(plain)} (and add, mul, div, neg); "
            f"aggregations <{'|'.join(AGG_STATS)}>_<{'|'.join(AGG_SETS)}> (e.g. std_hw)")


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []  # (kind, value, column from 1)
        pos = 0
        while (m := _TOKEN.match(text, pos)) is not None:  # None: the end, or only whitespace left
            kind = m.lastgroup
            col = m.start(kind) + 1
            if kind == "bad":
                self.fail(col, f"unexpected character {m.group(kind)!r}")
            self.tokens.append((kind, m.group(kind), col))
            pos = m.end()
        self.tokens.append(("end", "", len(text.rstrip()) + 1))
        self.at = 0
        self.nodes: list[Node] = []
        self.ids: dict[Node, int] = {}

    def fail(self, col: int, message: str):
        raise ParseError(f"column {col}: {message}\n  {self.text}\n  {' ' * (col - 1)}^")

    def peek(self) -> tuple[str, str, int]:
        return self.tokens[self.at]

    def take(self) -> tuple[str, str, int]:
        tok = self.tokens[self.at]
        self.at += 1
        return tok

    def expect(self, sym: str, what: str) -> None:
        kind, value, col = self.take()
        if value != sym or kind != "sym":
            self.fail(col, f"expected {what}, found {value!r}" if value else f"expected {what}, found the end")

    def node(self, op: str, *inputs: int) -> int:
        node = Node(op, inputs)
        if node not in self.ids:
            self.ids[node] = len(self.nodes)
            self.nodes.append(node)
        return self.ids[node]

    def parse(self) -> Graph:
        out = self.sum()
        kind, value, col = self.peek()
        if kind != "end":
            self.fail(col, f"unexpected {value!r}; expected an operator (+ - * /) or the end")
        graph = Graph(self.nodes, check=False)
        assert graph.output == out
        found = graph.errors()
        if found:
            raise GraphError(f"{'; '.join(found)}\n  {self.text}")
        return graph

    def sum(self) -> int:
        left = self.product()
        while self.peek()[1] in ("+", "-") and self.peek()[0] == "sym":
            sym = self.take()[1]
            right = self.product()
            left = self.node("add", left, right if sym == "+" else self.node("neg", right))
        return left

    def product(self) -> int:
        left = self.unary()
        while self.peek()[1] in ("*", "/") and self.peek()[0] == "sym":
            sym = self.take()[1]
            left = self.node("mul" if sym == "*" else "div", left, self.unary())
        return left

    def unary(self) -> int:
        if self.peek()[:2] == ("sym", "-"):
            self.take()
            return self.node("neg", self.unary())
        return self.atom()

    def atom(self) -> int:
        kind, value, col = self.take()
        if kind == "num":
            if float(value) not in (0.0, 1.0):
                self.fail(col, f"unknown constant {value}: the constants are 0 and 1 (0 is the paper's initial "
                               "node, 1 writes B1's x + 1)")
            return self.node("0" if float(value) == 0.0 else "1")
        if kind == "sym" and value == "(":
            inner = self.sum()
            self.expect(")", "')'")
            return inner
        if kind == "name":
            if value in _NAMED_LEAVES:
                if self.peek()[1] == "(":
                    self.fail(self.peek()[2], f"{value} is a leaf, not a function")
                return self.node(value)
            op = OPS.get(value)
            if op is None or not op.arity:
                close = difflib.get_close_matches(value, [*_NAMED_LEAVES, *(n for n in OPS if OPS[n].arity)], n=3)
                hint = f" (did you mean {' or '.join(close)}?)" if close else ""
                self.fail(col, f"unknown name {value!r}{hint}; valid: {_valid_names()}")
            if self.peek()[1] != "(":
                self.fail(self.peek()[2], f"expected '(' after the function {value}")
            self.take()
            args = [self.sum()]
            while self.peek()[1] == ",":
                self.take()
                args.append(self.sum())
            self.expect(")", "',' or ')'" if len(args) < op.arity else "')'")
            if len(args) != op.arity:
                self.fail(col, f"{value} takes {op.arity} argument{'s' * (op.arity > 1)}, got {len(args)}")
            return self.node(value, *args)
        found = repr(value) if value else "the end"
        self.fail(col, f"expected an operand (x, v0, v1, 0, 1, a function call, '(' or '-'), found {found}")


def parse(text: str) -> Graph:
    """The graph of a formula, in normal form (``str`` of it is the formula's canonical spelling). Raises
    ParseError (with column and caret) or GraphError (a valid parse that is no layer, e.g. without x)."""
    if not isinstance(text, str):
        raise TypeError(f"a layer formula is a string, got {type(text).__name__}")
    return _Parser(text).parse()


def as_graph(graph: Graph | str | None) -> Graph:
    """A Graph from a Graph or a formula; None is an error that says how to give one."""
    if graph is None:
        raise ValueError("the graph layer needs its formula: norm_act('graph', C, graph='x * sigmoid(v1 * x) / "
                         "std_hwg(x)'), or on the command line norm=graph \"norm.kwargs.graph='<formula>'\" (the "
                         "paper's layers: evonorm.space.PAPER_LAYERS)")
    if isinstance(graph, Graph):
        return graph.check()
    return parse(graph)
