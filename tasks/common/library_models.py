"""torchvision and timm classifiers as models of this project's tasks (``arch="torchvision:efficientnet_b0"``,
``"timm:mnasnet_100"``): built from scratch (nothing is downloaded) or with weights from a local file, every norm
converted to the chosen layer (``evonorm.convert``), the input conv adapted to the data's channels; and, for
detection, the converted network cut into its feature maps at strides 4 to 32."""
from __future__ import annotations

import difflib
import logging

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from evonorm.convert import convert
from tasks.common.weights import adapt_input_channels, first_conv, load_weights, read_weights

log = logging.getLogger(__name__)
LIBRARIES = {"torchvision": "torchvision.models.list_models(module=torchvision.models)", "timm": "timm.list_models()"}
FEATURE_STRIDES = (4, 8, 16, 32)


def is_library_arch(arch: str) -> bool:
    return arch.partition(":")[0] in LIBRARIES and ":" in arch


def library_names(library: str) -> list[str]:
    if library == "torchvision":
        import torchvision
        return torchvision.models.list_models(module=torchvision.models)
    import timm
    return timm.list_models()


def build_library_model(arch: str, num_classes: int, kwargs: dict | None = None) -> nn.Module:
    """The library's classifier ``arch`` ("torchvision:<name>" or "timm:<name>") for 3-channel input, from scratch;
    ``kwargs`` go to its constructor (torchvision ``width_mult``, timm ``drop_rate``, ...)."""
    library, _, name = arch.partition(":")
    if library not in LIBRARIES:
        raise ValueError(f"unknown model library {library!r} in {arch!r}; give torchvision:<name> or timm:<name>")
    names = library_names(library)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        raise ValueError(f"{library} has no classifier {name!r}{f' (close: {close})' if close else ''}; "
                         f"{LIBRARIES[library]} lists them")
    try:
        if library == "torchvision":
            import torchvision
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **(kwargs or {}))
        import timm
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **(kwargs or {}))
    except TypeError as e:
        raise ValueError(f"{arch} does not take task.model.kwargs={kwargs}: {e}") from e


def model_name(arch: str, kwargs: dict | None) -> str:
    """A run record's model: the arch, with a library model's constructor options (the report tells them apart)."""
    return f"{arch}({', '.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs else arch


def library_model(arch: str, norm_act, num_classes: int, in_chans: int, weights: str | None = None,
                  kwargs: dict | None = None, weights_key: str = "task.model.weights") -> nn.Module:
    """``arch`` built with ``kwargs``, every norm converted to ``norm_act``'s layer, its input conv adapted to
    ``in_chans``. ``weights``: a file with the library model's tensors (a pretrained state dict: loaded before the
    conversion, which carries its norms' state into the new layers) or a checkpoint of a converted model (a
    classification run: loaded after it); a classifier of another class count stays at its init. ``weights_key``
    names the config key in messages."""
    model = build_library_model(arch, num_classes, kwargs)
    stem, classifier = first_conv(model), last_linear(model)
    state = read_weights(weights, weights_key) if weights else None
    library_file = state is not None and set(state) <= set(model.state_dict())
    if library_file:
        load_weights(model, state, f"{weights_key}={weights}", classifier=classifier)
    model, conversion = convert(model, norm_act)
    if not conversion.positions:  # the run would be recorded with a layer it does not have
        raise ValueError(f"{arch} has no BatchNorm2d for the layer to replace"
                         f"{' (left: ' + '; '.join(conversion.left.values()) + ')' if conversion.left else ''}: "
                         "choose a model with BatchNorm (python run.py --help says where the names are listed)")
    adapt_input_channels(model, in_chans, stem)
    if state is not None and not library_file:
        load_weights(model, state, f"{weights_key}={weights}", classifier=classifier)
    return model


def last_linear(model: nn.Module) -> str | None:
    """The classifier: the last ``nn.Linear`` among the model's modules."""
    return next((n for n, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear)), None)


def feature_nodes(model: fx.GraphModule, in_chans: int, size: int = 64) -> dict[int, fx.Node]:
    """Per stride of ``FEATURE_STRIDES``, the last node at that stride through which all later computation
    passes: a ResNet's stage output (not the first conv of the next stage's branch, which the shortcut bypasses);
    in a MobileNet, the expansion of the block whose depthwise conv strides on (as torchvision's SSDLite takes it).
    Shapes from a ``size`` px forward in eval mode (``ShapeProp``)."""
    training = model.training
    with torch.no_grad():
        ShapeProp(model.eval()).propagate(torch.zeros(1, in_chans, size, size))
    model.train(training)
    nodes = [n for n in model.graph.nodes if n.op != "get_attr"]
    order = {n: i for i, n in enumerate(nodes)}
    # a node is a cut when no later node reads an earlier one: the earliest input of everything after it
    earliest_after, earliest = [len(nodes)] * (len(nodes) + 1), len(nodes)
    for i in range(len(nodes) - 1, -1, -1):
        earliest_after[i + 1] = earliest
        earliest = min([earliest] + [order[a] for a in nodes[i].all_input_nodes if a in order])
    found = {}
    for i, node in enumerate(nodes):
        meta = node.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        if shape is None or len(shape) != 4 or earliest_after[i + 1] < i:
            continue
        for stride in FEATURE_STRIDES:
            if shape[-2:] == (size // stride, size // stride):
                found[stride] = node
    missing = [s for s in FEATURE_STRIDES if s not in found]
    if missing:
        raise ValueError(f"{type(model).__name__} has no feature map at stride(s) {missing} that all later layers "
                         "read; a detection backbone needs strides 4, 8, 16 and 32")
    return found


def feature_extractor(model: fx.GraphModule, in_chans: int = 3) -> tuple[fx.GraphModule, list[int]]:
    """The converted classifier's graph cut after its feature maps at strides 4 to 32 (``feature_nodes``): it
    returns them as a dict "0".."3" (the FPN's input), and their channels. Modules after the last map (the
    classifier) are gone; the others keep their names."""
    chosen = feature_nodes(model, in_chans)
    graph, copies = fx.Graph(), {}
    for node in model.graph.nodes:
        if node.op != "output":
            copies[node] = graph.node_copy(node, copies.__getitem__)
    graph.output({str(i): copies[chosen[s]] for i, s in enumerate(FEATURE_STRIDES)})
    body = fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Features")
    body.graph.eliminate_dead_code()
    body.delete_all_unused_submodules()
    body.recompile()
    channels = [chosen[s].meta["tensor_meta"].shape[1] for s in FEATURE_STRIDES]
    log.info("feature maps of %s: %s", type(model).__name__,
             ", ".join(f"stride {s}: {chosen[s].name} ({c} channels)" for s, c in zip(FEATURE_STRIDES, channels)))
    return body, channels
