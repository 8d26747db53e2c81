"""Weights from a file into a model: a checkpoint of this project's runs or a library's weights file, with the
input conv adapted where only its input channels differ (a 1-channel Fashion-MNIST stem in a 3-channel detector)."""
from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path

import torch
from timm.models import adapt_input_conv, load_state_dict
from torch import nn

from tasks.common.checks import first_of

log = logging.getLogger(__name__)


class WeightsError(ValueError):
    pass


def read_weights(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The model tensors of a weights file: a checkpoint of this project's runs (its LightningModule's ``model.``
    tensors), a state dict (``torch.save``, ``.pth``, ``.bin``) or ``.safetensors`` (read with timm's
    ``load_state_dict``). ``what`` names the config key in errors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what}={path}: no such file (give a run's checkpoints/last.ckpt or best-*.ckpt, or "
                                "a state dict file: .pth, .bin, .safetensors)")
    if path.suffix != ".safetensors":
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        module_state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
        if isinstance(module_state, dict) and any(k.startswith("model.") for k in module_state):
            return {k.removeprefix("model."): v for k, v in module_state.items() if k.startswith("model.")}
    return load_state_dict(str(path), weights_only=False)


def first_conv(model: nn.Module) -> str:
    """The name of the model's input conv: the first ``nn.Conv2d`` among its modules (the stem, in the models of
    this project, torchvision and timm)."""
    name = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if name is None:
        raise ValueError(f"{type(model).__name__} has no Conv2d to take its input")
    return name


def adapt_input_channels(model: nn.Module, in_chans: int, conv_name: str | None = None) -> None:
    """Give the input conv ``in_chans`` input channels in place, its weights adapted by timm's
    ``adapt_input_conv`` (to 1 channel: the sum of the RGB filters, as for a gray image; from 1: the filter
    repeated and scaled)."""
    conv_name = conv_name or first_conv(model)
    conv = model.get_submodule(conv_name)
    if conv.in_channels == in_chans:
        return
    if conv.groups != 1:
        raise ValueError(f"input conv {conv_name} is grouped ({conv.groups} groups): its input channels cannot be "
                         "adapted")
    weight = adapt_input_conv(in_chans, conv.weight.detach(), base_chans=conv.in_channels)
    log.info("input conv %s adapted from %d to %d input channels (timm adapt_input_conv)", conv_name,
             conv.in_channels, in_chans)
    conv.in_channels, conv.weight = in_chans, nn.Parameter(weight.contiguous())


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str, *,
                 ignored: Collection[str] = (), classifier: str | None = None) -> None:
    """Load ``state`` (from ``source``, named in messages) into ``model``: the input conv's weight adapted where
    only its input channels differ, ``classifier`` (a module name) left at its init where its shape differs (another
    class count), the keys in ``ignored`` skipped. Any other difference is a ``WeightsError`` that names the
    tensors, with both shapes."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k not in ignored}
    conv = first_conv(model)
    problems, skipped = [], []
    for key in sorted(set(own) & set(state)):
        theirs, mine = state[key].shape, own[key].shape
        if theirs == mine:
            continue
        if key == f"{conv}.weight" and len(theirs) == 4 and (theirs[0], *theirs[2:]) == (mine[0], *mine[2:]):
            log.info("%s: input conv %s takes %d channels there and %d here: adapted (timm adapt_input_conv)",
                     source, conv, theirs[1], mine[1])
            state[key] = adapt_input_conv(mine[1], state[key], base_chans=theirs[1])
        elif classifier and key.startswith(classifier + "."):
            skipped.append(key)
        else:
            problems.append(f"{key} is {tuple(theirs)} there and {tuple(mine)} here")
    for what, keys in (("lacks", sorted(set(own) - set(state) - set(skipped))),
                       ("holds tensors this model lacks:", sorted(set(state) - set(own)))):
        if keys:
            problems.append(f"it {what} {first_of(keys, 3)}")
    if problems:
        raise WeightsError(f"{source} does not fit this {type(model).__name__}: {'; '.join(problems)}")
    for key in skipped:
        state[key] = own[key]
    if skipped:
        log.info("%s: classifier %s left at its init (another number of classes there)", source, classifier)
    model.load_state_dict(state)
    log.info("%s: %d tensors loaded", source, len(state) - len(skipped))
