"""EvoNorm layers (Liu et al., NeurIPS 2020) and norm-act baselines, pure PyTorch."""
from .baselines import BatchNormAct2d, FilterResponseNormTLU, GroupNormAct
from .batch import EvoNormB0, EvoNormB1, EvoNormB2
from .common import resolve_groups
from .convert import Conversion, ConversionError, convert
from .factory import NORM_ACT_LAYERS, NORM_ACT_NAMES, norm_act, norm_act_factory
from .param_groups import param_groups_weight_decay
from .sample import EvoNormS0, EvoNormS1, EvoNormS2
from .space import GraphNormAct

__all__ = [
    "EvoNormB0", "EvoNormB1", "EvoNormB2", "EvoNormS0", "EvoNormS1", "EvoNormS2",
    "BatchNormAct2d", "GroupNormAct", "FilterResponseNormTLU", "GraphNormAct",
    "norm_act", "norm_act_factory", "NORM_ACT_LAYERS", "NORM_ACT_NAMES",
    "param_groups_weight_decay", "resolve_groups", "convert", "Conversion", "ConversionError",
]
