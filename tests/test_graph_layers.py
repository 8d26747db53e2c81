"""The search space (evonorm.space): formulas and graphs (round trip, canonical hash, parse errors, validity), the
compiled layer against the hand-written EvoNorms and an independent full-size evaluator, its running statistics,
precision, torch.compile, guards, and the factory and pipeline entry (norm=graph)."""
import copy
import json
import random

import pytest
import torch
from torch._dynamo.utils import counters
from torch.testing import assert_close

import evonorm
from evonorm import norm_act, norm_act_factory, param_groups_weight_decay
from evonorm.space import (AGG_SETS, AGGREGATES, ELEMENTWISE, OPS, PAPER_LAYERS, SEARCH_LEAVES, Graph, GraphError,
                           GraphNormAct, Node, ParseError, parse)

TOL = {"rtol": 1e-10, "atol": 1e-10}
SHAPE = (3, 40, 5, 7)  # C != H != W; 40 channels -> 20 groups of 2
EPS = 1e-5

CORPUS = [
    *PAPER_LAYERS.values(),
    "x",
    "x * v1 + v0",
    "-x",
    "x - v1 * x",
    "x - (v1 - x)",
    "x - -x",
    "-(-x)",
    "-(x * v1)",
    "-x * v1",
    "x * -v1",
    "x / (x / v1)",
    "x + (1 + v0)",
    "(x + 1) * (v0 - 1)",
    "max(x, 0) + tanh(exp(x))",
    "x * sigmoid(x) / std_hwc(x) + mean_hw(x)",
    "slog(x) * ssqrt(abs(x)) - square(mean_hwg(x))",
    "x / max(rms_nhw(x), v1 * x + std_hw(x)) + mean_nhw(x)",
    "x * std_hwc(v1) + mean_hwg(v1) * x",
    "x / std_nhw(std_hw(x) + x)",
    "max(max(x, v0), max(v0, x))",
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def sample_input(shape=SHAPE, dtype=torch.float64):
    """Per-channel scale and a non-zero mean (variance and second moment differ)."""
    scale = torch.rand(1, shape[1], 1, 1, dtype=dtype) * 2 + 0.5
    return torch.randn(shape, dtype=dtype) * scale + torch.randn(1, shape[1], 1, 1, dtype=dtype)


def randomize(layer):
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name == "weight" else 0.0))
    return layer


# ---------------------------------------------------------------- formulas and graphs

@pytest.mark.parametrize("text", CORPUS)
def test_round_trip(text):
    g = parse(text)
    printed = str(g)
    again = parse(printed)
    assert again == g and again.nodes == g.nodes  # parse gives the normal form: same node list too
    assert str(again) == printed == g.formula()  # stable
    assert repr(g) == f"Graph({printed!r})"
    canon = g.canonical()
    assert parse(str(canon)).nodes == canon.nodes and canon.canonical() == canon


def test_paper_layers_print_as_written():
    for text in PAPER_LAYERS.values():
        assert str(parse(text)) == text


def test_spacing_and_sugar_print_canonically():
    assert str(parse("  x*sigmoid( v1*x )/std_hwg(x) ")) == "x * sigmoid(v1 * x) / std_hwg(x)"
    assert str(parse("add(x, neg(v1))")) == str(parse("x + -v1")) == "x - v1"
    assert str(parse("(((x)))")) == "x" and str(parse("x * 1.0")) == "x * 1"
    assert parse("x - v1").nodes == (Node("x"), Node("v1"), Node("neg", (1,)), Node("add", (0, 2)))


def test_graph_from_nodes_round_trips():
    """A node list with unused and duplicated nodes and its own numbering equals its parse (``==`` is
    structural); its normal form is what a parse gives."""
    nodes = [("v1",), ("x",), ("v0",), ("mul", (0, 1)), ("x",), ("std_hw", (4,)), ("sigmoid", (2,)),
             ("add", (3, 5)), ("std_nhw", (1,)), ("max", (8, 7)), ("div", (4, 9))]
    g = Graph(nodes)
    assert g.num_nodes == 11 and g.num_ops == 7 and g.nodes[3] == Node("mul", (0, 1))
    assert str(g) == PAPER_LAYERS["b0"]
    assert parse(str(g)) == g and parse(str(g)).nodes == g.normalize().nodes
    assert g.normalize().num_nodes == 8 and g.normalize().num_ops == 6
    assert hash(g) == hash(parse(PAPER_LAYERS["b0"])) and len({g, parse(PAPER_LAYERS["b0"])}) == 1
    assert g.parameters == ("v1",)  # v0 feeds only an unused node


@pytest.mark.parametrize("a, b", [
    ("x * v1 + std_hw(x)", "std_hw(x) + v1 * x"),
    ("x / max(std_nhw(x), v1 * x + std_hw(x))", "x / max(std_hw(x) + x * v1, std_nhw(x))"),
    ("x * sigmoid(x) / rms_hwg(x)", "sigmoid(x) * x / rms_hwg(x)"),
    ("(x + 1) * rms_hw(x)", "rms_hw(x) * (1 + x)"),
    ("x - v1", "-v1 + x"),
    ("max(x, v0) * max(v0, x)", "max(v0, x) * max(x, v0)"),
])
def test_canonical_hash_ignores_commutative_order(a, b):
    ga, gb = parse(a), parse(b)
    assert ga.canonical_hash() == gb.canonical_hash() and len(ga.canonical_hash()) == 12
    assert ga.canonical() == gb.canonical() and str(ga.canonical()) == str(gb.canonical())


def test_canonical_hash_ignores_unused_and_duplicate_nodes():
    base = parse("x * sigmoid(v1 * x) / std_hwg(x)")
    padded = Graph([("x",), ("0",), ("v1",), ("v0",), ("x",), ("mul", (2, 4)), ("exp", (3,)), ("sigmoid", (5,)),
                    ("mul", (0, 7)), ("std_hwg", (4,)), ("tanh", (1,)), ("div", (8, 9))])
    assert padded.canonical_hash() == base.canonical_hash()
    assert padded.canonical().nodes == base.canonical().nodes


def test_canonical_hash_tells_different_graphs_apart():
    hashes = {parse(text).canonical_hash() for text in CORPUS}
    assert len(hashes) == len(set(CORPUS))
    for a, b in [("x / v1", "v1 / x"), ("x - v1", "v1 - x"), ("x * std_hw(x)", "x * std_hwg(x)"),
                 ("x * rms_hw(x)", "x * std_hw(x)"), ("x * v0", "x * v1"), ("x + 0", "x + 1")]:
        assert parse(a).canonical_hash() != parse(b).canonical_hash(), (a, b)


@pytest.mark.parametrize("text, column, says", [
    ("x +", 4, "expected an operand"),
    ("x * (v1 + x", 12, "expected '\\)', found the end"),
    ("max(x)", 1, "max takes 2 arguments, got 1"),
    ("sigmoid(x, x)", 1, "sigmoid takes 1 argument, got 2"),
    ("x / 2", 5, "unknown constant 2: the constants are 0 and 1"),
    ("x $ 1", 3, "unexpected character '\\$'"),
    ("x(1)", 2, "x is a leaf, not a function"),
    ("sigmoid x", 9, "expected '\\(' after the function sigmoid"),
    ("x x", 3, "unexpected 'x'; expected an operator"),
    ("x * sigmod(x)", 5, "unknown name 'sigmod' \\(did you mean sigmoid\\?\\)"),
    ("", 1, "expected an operand"),
])
def test_parse_errors_say_where_and_what(text, column, says):
    with pytest.raises(ParseError, match=f"column {column}: {says}") as info:
        parse(text)
    lines = str(info.value).splitlines()
    assert lines[-2] == f"  {text}" and lines[-1] == " " * (column + 1) + "^"


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ParseError) as info:
        parse("x * sqrt(x)")
    message = str(info.value)
    assert "did you mean ssqrt" in message
    for name in ("x", "v0", "v1", "sigmoid", "tanh", "exp", "slog", "ssqrt", "abs", "square", "max"):
        assert name in message
    assert "<mean|std|rms>_<nhw|hw|hwg|hwc>" in message


@pytest.mark.parametrize("text, says", [
    ("v1 + 1", "does not depend on x"),
    ("std_hw(x)", "an aggregation reduces it"),
    ("x * 0 + mean_hwc(x)", None),  # valid: the output varies like x
])
def test_output_must_vary_like_x(text, says):
    if says is None:
        assert parse(text).is_valid
        return
    with pytest.raises(GraphError, match=says):
        parse(text)


def test_validity_of_node_lists():
    assert Graph([("x",), ("sigmoid", (0,))]).is_valid
    for nodes, says in [
        ([], "at least one node"),
        ([("x",), ("sigmoid", (1,))], r"node 1: inputs \[1\] are not earlier nodes"),  # a cycle
        ([("x",), ("sigmoid", (2,)), ("abs", (0,))], r"node 1: inputs \[2\] are not earlier nodes"),
        ([("x",), ("add", (0,))], "node 1: add takes 2 input"),
        ([("x",), ("relu", (0,))], "node 1: unknown op 'relu'"),
        ([("x",), ("v1",), ("mul", (1, 1))], "does not depend on x"),
    ]:
        with pytest.raises(GraphError, match=says):
            Graph(nodes)
        assert Graph(nodes, check=False).errors()


def test_graph_facts_and_mutation():
    b0 = parse(PAPER_LAYERS["b0"])
    assert b0.uses_batch_stats and b0.depends_on_x and b0.parameters == ("v1",)
    assert not parse(PAPER_LAYERS["s0"]).uses_batch_stats
    assert not parse("x * std_nhw(v1)").uses_batch_stats  # a batch aggregation of no batch
    assert b0.nodes == (Node("x"), Node("std_nhw", (0,)), Node("v1"), Node("mul", (2, 0)), Node("std_hw", (0,)),
                        Node("add", (3, 4)), Node("max", (1, 5)), Node("div", (0, 6)))
    assert b0.axes[1] == frozenset("c") and b0.axes[4] == frozenset("nc") and b0.axes[-1] == frozenset("ncs")
    assert b0.formula(5) == "v1 * x + std_hw(x)"
    # a mutation: node 4's op replaced, then its input resampled
    assert str(b0.replace(4, op="rms_hwc")) == "x / max(std_nhw(x), v1 * x + rms_hwc(x))"
    assert str(b0.replace(4, op="rms_hwc", inputs=[3])) == "x / max(std_nhw(x), v1 * x + rms_hwc(v1 * x))"
    with pytest.raises(GraphError, match="not earlier nodes"):
        b0.replace(4, inputs=[6])
    assert not b0.replace(7, op="mean_hw", inputs=[6], check=False).is_valid  # a reduced output
    with pytest.raises(AttributeError):
        b0.nodes = ()
    assert SEARCH_LEAVES == ("x", "v0", "v1", "0")
    assert set(OPS) >= {f"{s}_{a}" for s in ("mean", "std", "rms") for a in AGG_SETS}


# ---------------------------------------------------------------- random graphs: printing, canonical form, layer

def random_graph(rng: random.Random, num_ops: int) -> Graph:
    """A random valid graph over the search leaves (what a search would sample)."""
    nodes = [Node(leaf) for leaf in sorted(SEARCH_LEAVES, key=lambda leaf: leaf == "x")]  # x newest
    for _ in range(num_ops):  # operands: mostly the newest node (a deep graph), and any earlier one
        op = rng.choice(ELEMENTWISE if rng.random() < 0.6 else AGGREGATES)
        inputs = [len(nodes) - 1 if rng.random() < 0.6 else rng.randrange(len(nodes))]
        nodes.append(Node(op, tuple(inputs + [rng.randrange(len(nodes))] * (OPS[op].arity - 1))))
    g = Graph(nodes, check=False)
    if not g.is_valid:  # make the output vary like x
        nodes.append(Node(rng.choice(["add", "mul"]), (len(nodes) - 1, nodes.index(Node("x")))))
    return Graph(nodes)


def scramble(g: Graph, rng: random.Random) -> Graph:
    """The same function with commutative operands swapped, nodes duplicated and dead nodes added."""
    nodes, where = [], []
    for op, inputs in g.nodes:
        ins = [rng.choice(where[j]) for j in inputs]
        if OPS[op].commutative and rng.random() < 0.5:
            ins.reverse()
        copies = []
        for _ in range(rng.choice([1, 1, 2])):
            copies.append(len(nodes))
            nodes.append(Node(op, tuple(ins)))
        if rng.random() < 0.3:
            nodes.append(Node("exp", (rng.randrange(len(nodes)),)))
        where.append(copies)
    nodes.append(nodes[where[-1][0]])  # the output last again (a duplicate, which merges)
    return Graph(nodes)


def test_random_graphs_round_trip_and_hash_stably():
    rng = random.Random(0)
    for _ in range(150):
        g = random_graph(rng, rng.randint(1, 12))
        assert parse(str(g)) == g and str(parse(str(g))) == str(g)
        s = scramble(g, rng)
        assert s.canonical_hash() == g.canonical_hash() and s.canonical().nodes == g.canonical().nodes
        assert parse(str(g.canonical())).nodes == g.canonical().nodes


def brute_force(g: Graph, x: torch.Tensor, params: dict, groups: int, eps: float = EPS) -> torch.Tensor:
    """Independent evaluator (training mode): every node expanded to x's full shape, every statistic from the full
    tensor, groups by slicing."""
    n, c, h, w = x.shape
    full = []

    def stat(t, kind, dims):
        if kind == "mean":
            return t.mean(dims, keepdim=True)
        if kind == "std":
            return ((t - t.mean(dims, keepdim=True)) ** 2).mean(dims, keepdim=True).add(eps).sqrt()
        return (t * t).mean(dims, keepdim=True).add(eps).sqrt()

    for op, inputs in g.nodes:
        a = [full[j] for j in inputs]
        if op == "x":
            v = x
        elif op in ("v0", "v1"):
            v = params[op].view(1, -1, 1, 1)
        elif op in ("0", "1"):
            v = torch.tensor(float(op), dtype=x.dtype)
        elif OPS[op].kind == "aggregate":
            kind, axes = OPS[op].stat, OPS[op].axes
            if axes == "hwg":
                k = c // groups
                v = torch.cat([stat(a[0][:, i:i + k], kind, (1, 2, 3)).expand(-1, k, -1, -1)
                               for i in range(0, c, k)], 1)
            else:
                v = stat(a[0], kind, {"nhw": (0, 2, 3), "hw": (2, 3), "hwc": (1, 2, 3)}[axes])
        else:
            b = a[1] if len(a) > 1 else None
            v = {"add": lambda: a[0] + b, "mul": lambda: a[0] * b, "max": lambda: torch.maximum(a[0], b),
                 "div": lambda: a[0] / torch.where(torch.signbit(b), -1.0, 1.0).to(x.dtype) / b.abs().clamp_min(eps),
                 "neg": lambda: -a[0], "sigmoid": lambda: torch.sigmoid(a[0]), "tanh": lambda: torch.tanh(a[0]),
                 "exp": lambda: torch.exp(a[0]), "abs": lambda: a[0].abs(), "square": lambda: a[0] * a[0],
                 "slog": lambda: torch.sign(a[0]) * torch.log(a[0].abs() + eps),
                 "ssqrt": lambda: torch.sign(a[0]) * torch.sqrt(a[0].abs() + eps)}[op]()
        full.append(v.expand(n, c, h, w))
    return full[-1] * params["weight"].view(1, -1, 1, 1) + params["bias"].view(1, -1, 1, 1)


@pytest.mark.parametrize("text", CORPUS[6:])
def test_layer_matches_the_full_size_evaluator(text):
    """Aggregations of lower-rank nodes (v1, per-sample statistics) equal those of the broadcast tensors."""
    layer = randomize(GraphNormAct(12, graph=text, groups=3, dtype=torch.float64))
    x = sample_input((3, 12, 4, 5))
    params = dict(layer.named_parameters())
    assert_close(layer(x), brute_force(layer.graph, x, params, groups=3), rtol=1e-9, atol=1e-9)


def test_random_layers_match_the_full_size_evaluator():
    rng = random.Random(1)
    x = sample_input((2, 6, 3, 4))
    for _ in range(40):
        g = random_graph(rng, rng.randint(2, 10))
        layer = randomize(GraphNormAct(6, graph=g, groups=2, dtype=torch.float64))
        expected = brute_force(g.normalize(), x, dict(layer.named_parameters()), groups=2)
        assert_close(layer(x), expected, rtol=1e-7, atol=1e-9, equal_nan=True, msg=str(g))


# ---------------------------------------------------------------- the paper's layers, exactly

def paired(name, impl, apply_act, channels=SHAPE[1]):
    """The hand-written layer and the graph layer with the same random parameters (v -> v1)."""
    hand = randomize(norm_act(name, channels, apply_act=apply_act, impl=impl, dtype=torch.float64))
    graph = norm_act("graph", channels, apply_act=apply_act, graph=PAPER_LAYERS[name], dtype=torch.float64)
    with torch.no_grad():
        for key, p in hand.named_parameters():
            getattr(graph, "v1" if key == "v" else key).copy_(p)
    assert {k for k, _ in graph.named_parameters()} == {"v1" if k == "v" else k for k, _ in hand.named_parameters()}
    return hand, graph


def step_both(hand, graph, x):
    """Forward and backward of both: (output, input grad) pairs."""
    out = []
    for layer in (hand, graph):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
        out.append((y.detach(), xi.grad))
    return out


@pytest.mark.parametrize("apply_act", [True, False], ids=["act", "no_act"])
@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("name", list(PAPER_LAYERS))
def test_paper_layers_equal_the_hand_written_ones(name, impl, apply_act):
    """Outputs, gradients (x, weight, bias, v) and running variance over three training steps, then eval."""
    hand, graph = paired(name, impl, apply_act)
    for scale in (0.5, 2.0, 3.0):
        (y_h, gx_h), (y_g, gx_g) = step_both(hand, graph, sample_input() * scale)
        assert_close(y_g, y_h, **TOL)
        assert_close(gx_g, gx_h, **TOL)
    for key, p in hand.named_parameters():
        assert_close(getattr(graph, "v1" if key == "v" else key).grad, p.grad, **TOL, msg=key)
    if name.startswith("b") and apply_act:
        assert [k for k, _ in graph.named_buffers()] == ["running_var"]
        assert_close(graph.running_var, hand.running_var, **TOL)
    hand.eval(), graph.eval()
    (y_h, gx_h), (y_g, gx_g) = step_both(hand, graph, sample_input())
    assert_close(y_g, y_h, **TOL)
    assert_close(gx_g, gx_h, **TOL)


# ---------------------------------------------------------------- running statistics

def test_running_buffer_per_batch_aggregation():
    text = "x / std_nhw(x) + rms_nhw(x) * x - mean_nhw(x) + std_nhw(v1 * x) * x + x * std_nhw(v1)"
    layer = GraphNormAct(5, graph=text, dtype=torch.float64)
    buffers = dict(layer.named_buffers())
    # std_nhw(v1) depends on no batch: computed, not tracked
    assert list(buffers) == ["running_var", "running_sq_mean", "running_mean", "running_var_1"]
    for key, init in [("running_var", 1.0), ("running_sq_mean", 1.0), ("running_mean", 0.0), ("running_var_1", 1.0)]:
        assert torch.equal(buffers[key], torch.full((5,), init, dtype=torch.float64))
    x = sample_input((4, 5, 3, 2))
    with torch.no_grad():
        layer.v1.copy_(torch.rand(5, dtype=torch.float64) + 0.5)
    layer(x)
    dims = (0, 2, 3)
    vx = layer.v1.detach().view(1, -1, 1, 1) * x
    expected = {"running_var": 0.9 + 0.1 * x.var(dims, unbiased=False),
                "running_sq_mean": 0.9 + 0.1 * x.square().mean(dims),
                "running_mean": 0.1 * x.mean(dims),
                "running_var_1": 0.9 + 0.1 * vx.var(dims, unbiased=False)}
    for key, value in expected.items():
        assert_close(buffers[key], value, **TOL, msg=key)
    # eval: the buffers in place of the batch statistics, unchanged by the call
    layer.eval()
    before = {k: b.clone() for k, b in buffers.items()}
    x2 = sample_input((2, 5, 3, 2)) * 3
    c = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    want = (x2 / (c(before["running_var"]) + EPS).sqrt() + (c(before["running_sq_mean"]) + EPS).sqrt() * x2
            - c(before["running_mean"]) + (c(before["running_var_1"]) + EPS).sqrt() * x2 + x2 * EPS ** 0.5)
    assert_close(layer(x2), want, **TOL)
    assert all(torch.equal(buffers[k], before[k]) for k in before)


def test_running_buffer_of_a_channel_free_operand_has_one_value():
    layer = GraphNormAct(6, graph="x / std_nhw(mean_hwc(x))")
    assert layer.running_var.shape == (1,)
    layer(torch.randn(4, 6, 3, 3))
    layer.eval()(torch.randn(2, 6, 3, 3))


def test_non_finite_batch_statistic_is_never_written():
    layer = GraphNormAct(4, graph=PAPER_LAYERS["b0"], dtype=torch.float64)
    x = sample_input((3, 4, 5, 5))
    x[0, 1, 2, 2] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    layer(x)
    expected = 0.9 + 0.1 * x.var((0, 2, 3), unbiased=False)
    expected[1:3] = 1.0
    assert_close(layer.running_var, expected, **TOL)


def test_empty_batch_keeps_statistics_and_gives_zero_gradients():
    layer = randomize(GraphNormAct(6, graph="x * sigmoid(v0 + x) / max(std_nhw(x), v1 * x + std_hw(x))"))
    before = layer.running_var.clone()
    x = torch.empty(0, 6, 4, 4, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(layer.running_var, before)
    assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())


# ---------------------------------------------------------------- contract, precision, compile, guards

def test_no_act_is_affine_only():
    layer = randomize(GraphNormAct(6, graph=PAPER_LAYERS["b0"], apply_act=False, dtype=torch.float64))
    assert [k for k, _ in layer.named_parameters()] == ["weight", "bias"] and not list(layer.buffers())
    x = sample_input((2, 6, 3, 3))
    assert_close(layer(x), x * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1), **TOL)
    assert not layer.uses_batch_stats


def test_parameters_only_where_used_and_initialised_as_the_paper():
    layer = GraphNormAct(8, graph="x * sigmoid(v0 + x) + v1")
    p = dict(layer.named_parameters())
    assert set(p) == {"weight", "bias", "v0", "v1"}
    assert torch.equal(p["v0"], torch.zeros(8)) and torch.equal(p["v1"], torch.ones(8))
    assert torch.equal(p["weight"], torch.ones(8)) and torch.equal(p["bias"], torch.zeros(8))
    assert set(dict(GraphNormAct(8, graph="x * sigmoid(x)").named_parameters())) == {"weight", "bias"}
    assert GraphNormAct(40, graph=PAPER_LAYERS["s1"]).groups == 20  # the S layers' fallback
    assert "graph='x * sigmoid(x)'" in repr(GraphNormAct(8, graph="x*sigmoid(x)"))


@pytest.mark.parametrize("text", [PAPER_LAYERS["b0"], PAPER_LAYERS["s2"], "x * exp(-square(mean_hwc(x))) / rms_hw(x)"])
def test_autocast_bf16_statistics_in_float32(text):
    """bf16 input, float32 layer: bf16 out, finite, close to the float32 layer on the same values (inputs ~100:
    squares beyond bf16's precision)."""
    layer = randomize(GraphNormAct(SHAPE[1], graph=text, dtype=torch.float32))
    x = (sample_input(dtype=torch.float32) * 100).to(torch.bfloat16)
    reference = copy.deepcopy(layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    expected = reference(x.float())
    assert_close(y.float(), expected, rtol=0.02, atol=0.02)
    if layer.uses_batch_stats:
        assert layer.running_var.dtype == torch.float32
        assert_close(layer.running_var, reference.running_var, rtol=1e-6, atol=0)


@pytest.mark.parametrize("text", [PAPER_LAYERS["b0"], "slog(x) * sigmoid(v0 + x) / max(rms_nhw(x), v1 * x + "
                                  "std_hwc(x)) - mean_nhw(ssqrt(x)) + exp(tanh(x)) / abs(mean_hwg(x))"])
def test_compiles_whole(text):
    """fullgraph=True (a graph break raises) through AOT autograd, forward and backward, training (running
    buffers updated in the graph) then eval; inductor compiles the same graphs (checked by hand: slower)."""
    eager = randomize(GraphNormAct(8, graph=text, groups=4))
    layer = copy.deepcopy(eager)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    counters.clear()
    for training in (True, False):
        eager.train(training), compiled.train(training)
        x = torch.randn(4, 8, 5, 5)
        results = []
        for module in (eager, compiled):
            xi = x.clone().requires_grad_()
            y = module(xi)
            y.backward(torch.ones_like(y))
            results.append((y, xi.grad))
        assert_close(results[1][0], results[0][0])
        assert_close(results[1][1], results[0][1])
    assert not counters["graph_break"]
    for (key, a), b in zip(eager.named_buffers(), layer.buffers()):
        assert_close(b, a, msg=key)


@pytest.mark.parametrize("text", ["v1 / x", "slog(x)", "ssqrt(x) * v1", "x / x", "x / mean_hw(x)",
                                  "slog(v0) * x + ssqrt(v0 * x) / v0"])
def test_guards_stay_finite_at_zero(text):
    """div clamps |denominator| to >= eps (sign kept, +0 as +), slog and ssqrt add eps inside: finite outputs and
    gradients where the input (or v0, zeros at init) is exactly 0."""
    layer = GraphNormAct(4, graph=text)
    for x in (torch.zeros(2, 4, 3, 3), torch.randn(2, 4, 3, 3) * (torch.rand(2, 4, 3, 3) > 0.5)):
        x.requires_grad_()
        y = layer(x)
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), text
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
        layer.zero_grad()
    zeros = torch.zeros(1, 4, 1, 1)
    assert torch.equal(GraphNormAct(4, graph="x / (x - x)")(zeros + 3), zeros + 3 / EPS)


def test_input_checks():
    layer = GraphNormAct(8, graph="x * sigmoid(x)")
    with pytest.raises(ValueError, match="built for 8 channels but the input has 7"):
        layer(torch.randn(2, 7, 3, 3))
    with pytest.raises(ValueError, match="4D input"):
        layer(torch.randn(2, 8, 3))
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\]"):
        GraphNormAct(8, graph="x", momentum=2.0)


# ---------------------------------------------------------------- factory, weight decay, tasks, pipeline

def test_factory():
    layer = norm_act("graph", 64, graph="x * sigmoid(v1 * x) / std_hwg(x)")
    assert isinstance(layer, GraphNormAct) and layer.groups == 32 and evonorm.GraphNormAct is GraphNormAct
    assert norm_act("graph", 64, graph=parse(PAPER_LAYERS["b0"])).uses_batch_stats
    with pytest.raises(ValueError, match=r"needs its formula: norm_act\('graph', C, graph="):
        norm_act("graph", 64)
    with pytest.raises(ValueError, match="needs its formula.*norm.kwargs.graph"):
        norm_act_factory("graph", graph=None)
    with pytest.raises(ParseError, match="column 8"):
        norm_act_factory("graph", graph="x * (v1")  # at once, before any layer is built
    build = norm_act_factory("graph", graph="x * v1", eps=1e-3)
    assert build(16).eps == 1e-3 and build(16, apply_act=False).apply_act is False
    with pytest.raises(ValueError, match="valid names: .*graph"):
        norm_act("grap", 8)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), build(8))
    _, no_decay = param_groups_weight_decay(model, 1e-4)
    assert {id(p) for p in model[1].parameters()} <= {id(p) for p in no_decay["params"]}


def test_biggan_conditional_wrapper_fixes_the_graph_layers_affine():
    from tasks.biggan.layers import ConditionalNormAct
    wrapped = ConditionalNormAct(norm_act_factory("graph", graph=PAPER_LAYERS["s0"]), 8, cond_dim=4)
    norm = wrapped.norm
    assert not norm.weight.requires_grad and not norm.bias.requires_grad and norm.v1.requires_grad
    x, cond = torch.randn(2, 8, 4, 4), torch.randn(2, 4)
    gain = (1 + wrapped.gain(cond)).view(2, 8, 1, 1)
    bias = wrapped.bias(cond).view(2, 8, 1, 1)
    v = norm.v1.view(1, -1, 1, 1)
    std = x.view(2, 8, -1).var(-1, unbiased=False).add(EPS).sqrt().view(2, 8, 1, 1)  # 8 channels: 8 groups
    assert_close(wrapped(x, cond), gain * x * torch.sigmoid(v * x) / std + bias)


def test_maskrcnn_freeze_norm_stats_covers_graph_layers():
    from tasks.maskrcnn.model import BATCH_STATS
    assert isinstance(norm_act("graph", 8, graph=PAPER_LAYERS["b0"]), BATCH_STATS)


def test_pipeline_runs_norm_graph(compose_cfg, tmp_path):
    from pipelines.run import run
    formula = "x / max(std_nhw(x), v1 * x + std_hw(x))"
    record = run(compose_cfg("norm=graph", f"norm.kwargs.graph='{formula}'"))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == saved["status"] == "completed"
    assert saved["norm"] == {"name": "graph", "kwargs": {"graph": formula, "groups": 32, "eps": 1e-5,
                                                         "momentum": 0.1}}
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert any(k.endswith(".v1") for k in state) and any(k.endswith(".running_var") for k in state)


def test_pipeline_refuses_a_formula_that_does_not_parse(compose_cfg, tmp_path):
    from pipelines.run import run
    from pipelines.checks import ConfigError
    with pytest.raises(ConfigError, match="column 21: expected an operand") as refused:
        run(compose_cfg("norm=graph", "norm.kwargs.graph='x / max(std_nhw(x), )'"))
    assert isinstance(refused.value.__cause__, ParseError)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "failed" and "column 21" in saved["error"] and saved["steps"] == 0
    assert not (tmp_path / "checkpoints").exists()
