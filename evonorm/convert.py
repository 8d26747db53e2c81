"""Convert a model's BatchNorm layers (and optionally its GroupNorm layers) into one of this library's norm-act layers.

torchvision and timm models apply a norm and its activation in separate places (torchvision's ResNet calls one ReLU
module after two norms and after the residual add; others call ``F.relu``), so the conversion reads the model's
graph, traced with torch.fx: a norm whose output feeds only an activation becomes one layer with ``apply_act=True``
and the activation call goes; every other norm (before a residual add, in a linear bottleneck, in a head) becomes
the layer with ``apply_act=False``. A norm module that holds its activation (timm's ``BatchNormAct2d``) is one
position whose activation is its own.

A layer with an activation of its own (``bn_relu``: ReLU, ``gn_silu``: SiLU) takes in only that activation, so that
it computes what the model computed, and an activation it cannot take in stays after it; an EvoNorm (or FRN-TLU)
takes in any of ReLU, ReLU6, SiLU, Hardswish and GELU and replaces it with its own nonlinearity, as the paper does.
The new layer keeps the norm's name, so the model keeps its parameter names, and the norm's state wherever names and
shapes match (affine, running statistics); a layer of the norm's own kind (``bn_*`` for a BatchNorm, ``gn_*`` for a
GroupNorm) takes its ``eps`` and ``momentum`` (groups) too, so that ``bn_relu`` reproduces a BN-ReLU model exactly.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .factory import norm_act_factory

log = logging.getLogger(__name__)
NORMS = (_BatchNorm, nn.GroupNorm)  # what the tracer keeps whole, converted or not
ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.GELU: "gelu"}
ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6", F.silu: "silu",
                        F.hardswish: "hardswish", F.gelu: "gelu"}
ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu"}
# re-applies an activation that a norm module held (timm's BatchNormAct2d) where the new layer does not take it in
ACTIVATION_CALLS = {"relu": F.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish, "gelu": F.gelu}


class ConversionError(ValueError):
    pass


@dataclass(frozen=True)
class Position:
    """A norm the conversion replaces: its name (the new layer's too), channels and class, the activation applied to
    its output alone (None: none; ``feeds`` says where its output goes) and whether the new layer takes it in."""
    name: str
    channels: int
    norm: str
    activation: str | None
    folded: bool
    feeds: str = ""


@dataclass
class Conversion:
    """What ``convert`` did (or, in a dry run, would do): the positions it converts and the norms it left."""
    model: str
    layer: str
    takes_in: tuple[str, ...]  # the activations the layer takes in: its own, or all for EvoNorm / FRN-TLU
    positions: list[Position] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)  # norm name -> why it was left as it is
    dropouts: list[str] = field(default_factory=list)  # F.dropout(training=self.training) calls made nn.Dropout

    @property
    def folded(self) -> list[Position]:
        return [p for p in self.positions if p.folded]

    @property
    def replaced(self) -> list[Position]:
        """Positions whose activation (not ReLU) the layer's own nonlinearity replaces."""
        own_nonlinearity = len(self.takes_in) > 1
        return [p for p in self.folded if own_nonlinearity and p.activation != "relu"]

    @property
    def kept(self) -> list[Position]:
        """Positions whose activation the layer does not take in: it stays after an ``apply_act=False`` layer."""
        return [p for p in self.positions if p.activation and not p.folded]

    def note(self, p: Position) -> str:
        if p in self.replaced:
            return f"{p.activation} replaced by {self.layer}'s own nonlinearity"
        if p.activation and not p.folded:
            return f"{p.activation} kept after it ({self.layer} takes in only {', '.join(self.takes_in)})"
        return "" if p.folded else f"its output feeds {p.feeds}"

    def summary(self) -> str:
        kinds = Counter(p.activation for p in self.folded)
        text = (f"{self.model}: {len(self.positions)} norm(s) converted to {self.layer}, {len(self.folded)} with the "
                f"activation after them folded in ({', '.join(f'{n} {k}' for k, n in kinds.items()) or 'none'}), "
                f"{len(self.positions) - len(self.folded)} with apply_act=False")
        if self.replaced:
            text += (f"; {', '.join(sorted({p.activation for p in self.replaced}))} replaced by {self.layer}'s own "
                     "nonlinearity (the paper's protocol)")
        if self.kept:
            text += (f"; {', '.join(sorted({p.activation for p in self.kept}))} kept after apply_act=False layers "
                     f"({self.layer} takes in only {', '.join(self.takes_in)})")
        if self.dropouts:
            text += (f"; {', '.join(self.dropouts)}: F.dropout(training=self.training), now nn.Dropout modules "
                     "(the graph follows the model's mode)")
        if self.left:
            text += f"; {len(self.left)} left as they are: " + "; ".join(f"{k}: {v}" for k, v in self.left.items())
        return text

    def table(self) -> str:
        """One line per position (name, channels, norm, activation folded or not, note), then the norms left."""
        lines = ["\t".join([p.name, str(p.channels), p.norm, f"folded {p.activation}" if p.folded else
                            "apply_act=False", self.note(p)]).rstrip() for p in self.positions]
        return "\n".join(lines + [f"{name}\tleft: {why}" for name, why in self.left.items()])


def activation_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The activation a graph node applies ("relu", "silu", ...), None for anything else (exact GELU only)."""
    if node.op == "call_module":
        return module_activation(modules[node.target])
    if node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS:
        exact = node.kwargs.get("approximate", "none") == "none" and len(node.args) < 2
        return ACTIVATION_FUNCTIONS[node.target] if exact else None
    return ACTIVATION_METHODS.get(node.target) if node.op == "call_method" else None


def module_activation(module: nn.Module) -> str | None:
    kind = next((k for t, k in ACTIVATION_MODULES.items() if isinstance(module, t)), None)
    return None if kind == "gelu" and module.approximate != "none" else kind


def layer_activations(factory: Callable[..., nn.Module]) -> tuple[str, ...]:
    """The activations a layer takes in: its own (``bn_relu``: relu), or all of them for a layer whose
    nonlinearity is its own (EvoNorm, FRN-TLU)."""
    act = getattr(factory(8), "act", None)
    return (module_activation(act),) if isinstance(act, nn.Module) else tuple(ACTIVATION_CALLS)


def layer_label(factory: Callable[..., nn.Module]) -> str:
    return factory.args[0] if isinstance(factory, partial) and factory.args else getattr(factory, "__name__", "layer")


class NormTracer(fx.Tracer):
    """Traces into the modules that hold a norm; keeps each norm and every module without one a single call (no
    norm inside: nothing to convert, and tracing into it could only fail or fix its training-mode branches).
    A failure names the innermost module whose forward it happened in."""

    def __init__(self, norm_holders: set[int]):
        super().__init__()
        self.norm_holders = norm_holders

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, NORMS) or id(m) not in self.norm_holders

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except TraceFailure:
            raise
        except Exception as e:
            raise TraceFailure(f"{self.path_of_module(m)} ({type(m).__name__})") from e


class TraceFailure(Exception):
    pass


def trace(model: nn.Module) -> tuple[fx.Graph, list[fx.Node]]:
    """The model's graph in its current mode, after checking that training and eval mode trace alike (a module
    with norms whose forward branches on ``self.training`` would be fixed in one mode), but for functional dropouts
    given ``training=self.training`` (timm's ``drop_rate``): those nodes are returned, for ``nn.Dropout`` modules
    to take their place."""
    holders = {id(m) for m in model.modules() if any(isinstance(sub, NORMS) for sub in m.modules())}
    name, training = type(model).__name__, model.training
    graphs = {}
    try:
        for mode in (True, False):
            graphs[mode] = NormTracer(holders).trace(model.train(mode))
    except Exception as e:
        where = f"in {e}" if isinstance(e, TraceFailure) else "in its own forward"
        cause = e.__cause__ if isinstance(e, TraceFailure) else e
        raise ConversionError(
            f"{name} cannot be traced with torch.fx, which the conversion needs to see where each norm's output "
            f"goes: {where}: {type(cause).__name__}: {cause}. Make that forward traceable (no Python control flow "
            "on tensor values, see torch.fx's limitations), or convert the model's traceable submodules one by one "
            "(model.<part> = convert(model.<part>, ...)[0])") from e
    finally:
        model.train(training)
    pairs = list(zip(graphs[True].nodes, graphs[False].nodes))
    differing = [(a, b) for a, b in pairs if a.format_node() != b.format_node()]
    if len(graphs[True].nodes) != len(graphs[False].nodes) or not all(
            mode_dropout(model, a, b) for a, b in differing):
        differs = next(((a.format_node(), b.format_node()) for a, b in differing if not mode_dropout(model, a, b)),
                       (f"{len(graphs[True].nodes)} nodes", f"{len(graphs[False].nodes)} nodes"))
        raise ConversionError(
            f"{name} traces differently in training and eval mode (a module with norms branches on self.training "
            f"in its forward: training {differs[0]!r}, eval {differs[1]!r}), so a converted graph would compute "
            "one mode's code in both. Convert its submodules that trace alike one by one "
            "(model.<part> = convert(model.<part>, ...)[0])")
    return graphs[training], [pair[0 if training else 1] for pair in differing]


def mode_dropout(model: nn.Module, a: fx.Node, b: fx.Node) -> bool:
    """Whether two nodes are one ``F.dropout`` call whose ``training`` alone differs."""
    if not (a.op == b.op == "call_function" and a.target is b.target is F.dropout):
        return False
    other = [{k: str(v) for k, v in n.normalized_arguments(model, normalize_to_only_use_kwargs=True).kwargs.items()
              if k != "training"} for n in (a, b)]
    return other[0] == other[1]


def follow_mode(model: fx.GraphModule, dropouts: list[fx.Node]) -> None:
    """Replace functional dropouts with ``nn.Dropout`` modules of the same options, which follow the mode."""
    for node in dropouts:
        options = node.normalized_arguments(model, normalize_to_only_use_kwargs=True).kwargs
        name = node.name
        while hasattr(model, name):
            name += "_"
        model.add_submodule(name, nn.Dropout(options["p"], options["inplace"]))
        with model.graph.inserting_before(node):
            node.replace_all_uses_with(model.graph.call_module(name, (options["input"],)))
        model.graph.erase_node(node)


def unsupported(norm: nn.Module, calls: int, convertible: tuple[type, ...]) -> str | None:
    """Why a norm module cannot be converted, or None."""
    if isinstance(norm, nn.SyncBatchNorm):
        return "a SyncBatchNorm: convert the model before synchronising its norms"
    if not isinstance(norm, convertible):
        return (f"a {type(norm).__name__}" + (" (the layers take (N, C, H, W) inputs)" if isinstance(
            norm, _BatchNorm) else " (convert with groupnorm=True)"))
    if calls > 1:
        return f"called at {calls} places (one layer cannot be two positions)"
    if isinstance(norm, _BatchNorm) and not norm.track_running_stats:
        return "track_running_stats=False: it normalizes with batch statistics in eval mode, which no layer here does"
    if not isinstance(getattr(norm, "drop", None), (nn.Identity, type(None))):
        return f"holds a {type(norm.drop).__name__} between norm and activation"
    act = held_activation(norm)
    if act is not None and module_activation(act) is None:
        return f"holds the activation {type(act).__name__}, which the conversion can neither fold nor re-apply"
    return None


def user_text(users: list[fx.Node]) -> str:
    if len(users) != 1:
        return f"{len(users)} nodes" if users else "nothing"
    user = users[0]
    if user.op == "output":
        return "the model's output"
    return getattr(user.target, "__name__", str(user.target)) if user.op != "call_module" else user.target


def past_identities(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """The last of the ``nn.Identity`` calls that take ``node``'s output alone (timm's drop_block when off), or
    ``node``."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_module" or not isinstance(modules[user.target], nn.Identity):
            break
        node = user
    return node


def held_activation(norm: nn.Module) -> nn.Module | None:
    """The activation a norm module applies itself (timm's BatchNormAct2d, this library's bn_relu), if any."""
    act = getattr(norm, "act", None)
    return act if isinstance(act, nn.Module) and not isinstance(act, nn.Identity) else None


def plan(graph: fx.Graph, modules: dict[str, nn.Module], takes_in: tuple[str, ...], convertible: tuple[type, ...]):
    """``(norm node, activation node to remove or None, Position)`` per convertible norm, and the norms left."""
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    planned = []
    left = {name: "not called in the model's forward" for name, m in modules.items()
            if isinstance(m, NORMS) and not calls[name]}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], NORMS):
            continue
        norm = modules[node.target]
        why = unsupported(norm, calls[node.target], convertible)
        if why:
            left[node.target] = why
            continue
        tail = past_identities(node, modules)
        users = list(tail.users)
        if held_activation(norm) is not None:
            act_node, kind = None, module_activation(held_activation(norm))
        else:
            act_node = users[0] if len(users) == 1 and users[0].all_input_nodes == [tail] else None
            kind = activation_kind(act_node, modules) if act_node is not None else None
        folded = kind in takes_in
        channels = norm.num_features if isinstance(norm, _BatchNorm) else norm.num_channels
        position = Position(node.target, channels, type(norm).__name__, kind, folded, user_text(users))
        planned.append((node, act_node if folded else None, position))
    return planned, left


def new_layer(factory: Callable[..., nn.Module], norm: nn.Module, position: Position) -> nn.Module:
    """The layer for one position, with the norm's state where names and shapes match (and the eps and momentum,
    or groups, of a norm of its own kind), in the norm's training mode, device and dtype."""
    layer = factory(position.channels, apply_act=position.folded)
    if isinstance(layer, _BatchNorm) and isinstance(norm, _BatchNorm):
        layer.eps, layer.momentum = norm.eps, norm.momentum
    elif isinstance(layer, nn.GroupNorm) and isinstance(norm, nn.GroupNorm):
        layer.eps, layer.num_groups = norm.eps, norm.num_groups
    theirs = norm.state_dict()
    like = next((t for t in theirs.values() if t.is_floating_point()), None)
    if like is not None:
        layer.to(device=like.device, dtype=like.dtype)
    with torch.no_grad():
        for key, mine in layer.state_dict(keep_vars=True).items():
            if key in theirs and theirs[key].shape == mine.shape:
                mine.copy_(theirs[key])
    return layer.train(norm.training)


def convert(model: nn.Module, layer: str | Callable[..., nn.Module], *, groupnorm: bool = False,
            dry_run: bool = False, **layer_kwargs) -> tuple[nn.Module, Conversion]:
    """Replace every BatchNorm2d of ``model`` (and GroupNorm with ``groupnorm=True``) with the norm-act layer
    ``layer``: a name of ``evonorm.NORM_ACT_NAMES`` with ``layer_kwargs``, or a ``norm_act_factory``.

    Returns the converted model, a ``torch.fx.GraphModule`` of ``model``'s class name that reuses ``model``'s
    other modules (deep-copy ``model`` first to keep it), and the ``Conversion``: every position (name, channels,
    activation folded or not, why) and the norms left as they are, with why (a BatchNorm1d, a norm called at two
    places, ...). ``dry_run=True`` returns ``model`` unchanged with that plan. A model that torch.fx cannot trace,
    or that traces differently in training and eval mode, raises ``ConversionError`` naming where.
    """
    if isinstance(layer, str):
        factory = norm_act_factory(layer, **layer_kwargs)
    elif layer_kwargs:
        raise TypeError(f"layer options {sorted(layer_kwargs)} go with a layer name; a factory has its own bound")
    else:
        factory = layer
    convertible = (nn.BatchNorm2d, nn.GroupNorm) if groupnorm else (nn.BatchNorm2d,)
    graph, dropouts = trace(model)
    modules = dict(model.named_modules())
    takes_in = layer_activations(factory)
    planned, left = plan(graph, modules, takes_in, convertible)
    conversion = Conversion(type(model).__name__, layer_label(factory), takes_in, [p for _, _, p in planned], left,
                            [node.name for node in dropouts])
    if dry_run:
        return model, conversion
    layers = {}
    for node, act_node, position in planned:
        norm = modules[position.name]
        layers[position.name] = new_layer(factory, norm, position)
        if act_node is not None:  # folded: the activation call goes
            act_node.replace_all_uses_with(act_node.all_input_nodes[0])
            graph.erase_node(act_node)
        elif held_activation(norm) is not None and not position.folded:  # the new layer lacks the norm's own
            with graph.inserting_after(node):
                act = graph.call_function(ACTIVATION_CALLS[position.activation], (node,))
            node.replace_all_uses_with(act, delete_user_cb=lambda user: user is not act)
    converted = fx.GraphModule(model, graph, class_name=type(model).__name__)
    for name, new in layers.items():
        converted.set_submodule(name, new)
    follow_mode(converted, dropouts)
    converted.delete_all_unused_submodules()  # folded activation modules that no call uses any more
    converted.recompile()
    converted.training = model.training
    log.info("%s", conversion.summary())
    return converted, conversion
