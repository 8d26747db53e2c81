"""A layer graph compiled into a norm-act module: ``GraphNormAct(C, graph="x * sigmoid(v1 * x) / std_hwg(x)")``.

Same contract as the hand-written EvoNorms (evonorm.common.EvoNormParams): ``weight`` (ones) and ``bias`` (zeros)
close the formula; ``apply_act=False`` is affine only (no v0/v1, no statistics); the graph's v0 (zeros) and v1
(ones) exist only where the output uses them. Each batch aggregation (over N, H, W, of something that depends on x)
keeps a running buffer of its pre-sqrt quantity (std_nhw: ``running_var``, ones, biased, as EvoNormB0's; rms_nhw:
``running_sq_mean``, ones; mean_nhw: ``running_mean``, zeros), updated with ``momentum`` in training (a non-finite
batch value is never written) and used in eval. Statistics and the whole graph run in float32 for half inputs.
"""
from __future__ import annotations

import logging

import torch

from ..common import EvoNormParams, check_input, check_range, per_channel, resolve_groups, stats_dtype
from ..fused import update_running_var
from .graph import Graph, as_graph
from .primitives import COMPUTE, OPS, PARAMETERS, RUNNING, finish, moment

log = logging.getLogger(__name__)


class GraphNormAct(EvoNormParams):
    """The layer of ``graph`` (a Graph or a formula, see evonorm.space), then ``* weight + bias`` per channel."""

    def __init__(
        self,
        num_features: int,
        *,
        graph: Graph | str | None = None,
        apply_act: bool = True,
        groups: int = 32,
        eps: float = 1e-5,
        momentum: float = 0.1,
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, apply_act, device, dtype)
        self.graph = as_graph(graph).normalize()
        self.groups = resolve_groups(num_features, groups)
        self.eps = check_range(eps, "eps", 0)
        self.momentum = check_range(momentum, "momentum", 0, 1)
        self._program: tuple[tuple, ...] = ()
        if apply_act:
            for name in self.graph.parameters:
                init = torch.full((num_features,), PARAMETERS[name], device=device, dtype=dtype)
                self.register_parameter(name, torch.nn.Parameter(init))
            self._program = self._compile(device, dtype)

    @property
    def formula(self) -> str:
        return self.graph.formula()

    @property
    def uses_batch_stats(self) -> bool:
        """Whether the output depends on the batch in training (and on running buffers in eval)."""
        return self.apply_act and self.graph.uses_batch_stats

    def _compile(self, device, dtype) -> tuple[tuple, ...]:
        """The evaluation order, one step per node (computed once: forward only walks it)."""
        g, steps, counts = self.graph, [], {}
        for i, (op, inputs) in enumerate(g.nodes):
            kind = OPS[op].kind
            if op == "x":
                steps.append(("x",))
            elif op in PARAMETERS:
                steps.append(("param", op))
            elif kind == "leaf":
                steps.append(("const", float(op)))
            elif kind == "elementwise":
                steps.append(("fn", COMPUTE[op], inputs))
            else:
                stat, axes = OPS[op].stat, OPS[op].axes
                buffer, shape = None, None
                if g.is_batch_aggregation(i):
                    stem, init = RUNNING[stat]
                    counts[stem] = counts.get(stem, 0) + 1
                    buffer = stem if counts[stem] == 1 else f"{stem}_{counts[stem] - 1}"
                    size = self.num_features if "c" in g.axes[inputs[0]] else 1
                    self.register_buffer(buffer, torch.full((size,), init, device=device, dtype=dtype))
                    shape = (1, size, 1, 1)
                steps.append(("agg", stat, axes, inputs[0], buffer, shape))
        return tuple(steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features)
        if not self.apply_act:
            return self.affine(x)
        if x.shape[0] == 0:
            return self.empty_batch(x)
        xs = x.to(stats_dtype(x))
        values: list[torch.Tensor] = []
        for step in self._program:
            kind = step[0]
            if kind == "x":
                value = xs
            elif kind == "param":
                value = per_channel(getattr(self, step[1]).to(xs.dtype))
            elif kind == "const":
                value = xs.new_full((1, 1, 1, 1), step[1])
            elif kind == "fn":
                value = step[1](self.eps, *[values[j] for j in step[2]])
            else:
                value = self._aggregate(values[step[3]], *step[1:3], *step[4:])
            values.append(value)
        return self.affine(values[-1]).to(x.dtype)

    def _aggregate(self, t: torch.Tensor, stat: str, axes: str, buffer: str | None, shape) -> torch.Tensor:
        if buffer is None:
            return finish(moment(t, stat, axes, self.groups), stat, self.eps)
        running = getattr(self, buffer)
        if self.training:
            m = moment(t, stat, axes, self.groups)
            update_running_var(running, m.flatten(), self.momentum)  # a lerp per channel; non-finite: kept
        else:
            m = running.to(t.dtype).view(shape)
        return finish(m, stat, self.eps)

    def empty_batch(self, x: torch.Tensor, *connected: torch.Tensor) -> torch.Tensor:
        return super().empty_batch(x, *(getattr(self, p) for p in self.graph.parameters if hasattr(self, p)),
                                   *connected)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, graph={self.formula!r}, apply_act={self.apply_act}, groups={self.groups}, "
                f"eps={self.eps}, momentum={self.momentum}")
